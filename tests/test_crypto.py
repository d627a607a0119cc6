"""Tokens at rest: AES-GCM ciphertexts bound to one user and one field, key rotation, and key configuration."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import ciphertext_key_id
from tokensvc.crypto import (
    DecryptionError,
    KeyConfigError,
    KeyFileError,
    TokenCipher,
    generate_key,
    load_or_create_key_file,
)

SECRET = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex Strava-like token
USER = "user-1"


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def cipher(key: str) -> TokenCipher:
    return TokenCipher([key])


def urlsafe(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class TestRoundTrip:
    @pytest.mark.parametrize("plaintext", [SECRET, "", "é✓ unicode", "x" * 10_000])
    def test_what_is_encrypted_decrypts_to_the_same_text(self, cipher: TokenCipher, plaintext: str) -> None:
        """decrypt(encrypt(p)) == p for the same user and field."""
        token = cipher.encrypt(plaintext, user_id=USER, field="refresh")

        assert cipher.decrypt(token, user_id=USER, field="refresh") == plaintext

    def test_a_new_cipher_with_the_same_key_reads_old_ciphertexts(self, key: str) -> None:
        """A restart (a new TokenCipher from the same configured key) decrypts what the previous one wrote."""
        token = TokenCipher([key]).encrypt(SECRET, user_id=USER, field="access")

        assert TokenCipher([key]).decrypt(token, user_id=USER, field="access") == SECRET

    def test_the_ciphertext_reads_v1_key_id_data(self, cipher: TokenCipher) -> None:
        """A ciphertext is `v1.<current key id>.<url-safe base64>`."""
        token = cipher.encrypt(SECRET, user_id=USER, field="access")

        version, kid, body = token.split(".", 2)
        assert version == "v1"
        assert kid == cipher.current_key_id
        assert len(base64.urlsafe_b64decode(body)) == 12 + len(SECRET) + 16  # nonce + data + tag


class TestConfidentiality:
    def test_each_encryption_of_the_same_text_differs(self, cipher: TokenCipher) -> None:
        """A random nonce per call: encrypting the same token twice never gives the same ciphertext."""
        tokens = {cipher.encrypt(SECRET, user_id=USER, field="access") for _ in range(50)}

        assert len(tokens) == 50

    def test_the_ciphertext_never_contains_the_plaintext(self, cipher: TokenCipher) -> None:
        """Neither the token nor its base64 form appears inside the stored string."""
        token = cipher.encrypt(SECRET, user_id=USER, field="access")

        assert SECRET not in token
        assert urlsafe(SECRET.encode()) not in token
        assert SECRET[:16] not in token


class TestWrongKey:
    def test_a_cipher_without_the_key_names_the_unknown_key_id(self, cipher: TokenCipher) -> None:
        """Decrypting with a key set that lacks the writer's key raises DecryptionError naming that key id."""
        token = cipher.encrypt(SECRET, user_id=USER, field="access")
        other = TokenCipher([generate_key()])

        with pytest.raises(DecryptionError, match=cipher.current_key_id):
            other.decrypt(token, user_id=USER, field="access")

    def test_a_forged_key_id_does_not_select_another_key(self, cipher: TokenCipher) -> None:
        """Relabelling a ciphertext with another configured key's id fails authentication."""
        old = generate_key()
        both = TokenCipher([generate_key(), old])
        token = both.encrypt(SECRET, user_id=USER, field="access")
        old_id = TokenCipher([old]).current_key_id
        relabelled = token.replace(f".{both.current_key_id}.", f".{old_id}.", 1)

        with pytest.raises(DecryptionError):
            both.decrypt(relabelled, user_id=USER, field="access")


class TestCiphertextBoundToItsRow:
    def test_a_ciphertext_moved_to_another_user_does_not_decrypt(self, cipher: TokenCipher) -> None:
        """User B's row holding user A's ciphertext raises DecryptionError instead of serving A's token."""
        token = cipher.encrypt(SECRET, user_id="user-a", field="access")

        with pytest.raises(DecryptionError):
            cipher.decrypt(token, user_id="user-b", field="access")

    def test_user_ids_are_not_confused_by_the_separator(self, cipher: TokenCipher) -> None:
        """The user/field binding is not a plain concatenation that two different user ids could share."""
        token = cipher.encrypt(SECRET, user_id="user-1", field="access")

        with pytest.raises(DecryptionError):
            cipher.decrypt(token, user_id="user-1\x00", field="access")

    def test_a_ciphertext_moved_from_access_to_refresh_does_not_decrypt(self, cipher: TokenCipher) -> None:
        """An access-token ciphertext placed in the refresh column raises DecryptionError."""
        token = cipher.encrypt(SECRET, user_id=USER, field="access")

        with pytest.raises(DecryptionError):
            cipher.decrypt(token, user_id=USER, field="refresh")

    def test_a_ciphertext_moved_from_refresh_to_access_does_not_decrypt(self, cipher: TokenCipher) -> None:
        """And the other way round."""
        token = cipher.encrypt(SECRET, user_id=USER, field="refresh")

        with pytest.raises(DecryptionError):
            cipher.decrypt(token, user_id=USER, field="access")


class TestTamperedCiphertext:
    @pytest.mark.parametrize("position", [0, 11, 12, 20, -17, -1])
    def test_one_flipped_byte_anywhere_fails_authentication(self, cipher: TokenCipher, position: int) -> None:
        """Flipping one bit in the nonce, the data or the tag raises DecryptionError."""
        token = cipher.encrypt(SECRET, user_id=USER, field="access")
        prefix, body = token.rsplit(".", 1)
        blob = bytearray(base64.urlsafe_b64decode(body))
        blob[position] ^= 0x01
        tampered = f"{prefix}.{base64.urlsafe_b64encode(bytes(blob)).decode()}"

        with pytest.raises(DecryptionError):
            cipher.decrypt(tampered, user_id=USER, field="access")

    def test_a_truncated_tag_fails_authentication(self, cipher: TokenCipher) -> None:
        """Cutting bytes off the end raises DecryptionError."""
        token = cipher.encrypt(SECRET, user_id=USER, field="access")
        prefix, body = token.rsplit(".", 1)
        blob = base64.urlsafe_b64decode(body)[:-4]

        with pytest.raises(DecryptionError):
            cipher.decrypt(f"{prefix}.{base64.urlsafe_b64encode(blob).decode()}", user_id=USER, field="access")


class TestGarbage:
    @pytest.mark.parametrize(
        "token",
        [
            pytest.param("", id="empty"),
            pytest.param("not a ciphertext", id="no-dots"),
            pytest.param("v1.only-two", id="two-parts"),
            pytest.param("v1.deadbeef.%%%", id="unknown-key"),
            pytest.param("v1.deadbeef.é", id="non-ascii-body"),
            pytest.param(SECRET, id="a-plaintext-token"),
        ],
    )
    def test_a_string_that_is_not_a_ciphertext_raises_decryption_error(self, cipher: TokenCipher, token: str) -> None:
        """Anything that is not `v1.<key>.<data>` raises DecryptionError, never another exception."""
        with pytest.raises(DecryptionError):
            cipher.decrypt(token, user_id=USER, field="access")

    @pytest.mark.parametrize("version", ["v0", "v2", "V1", ""])
    def test_an_unknown_version_raises_decryption_error(self, cipher: TokenCipher, version: str) -> None:
        """A ciphertext whose version is not `v1` raises DecryptionError naming the version."""
        token = cipher.encrypt(SECRET, user_id=USER, field="access")
        other = version + token[len("v1") :]

        with pytest.raises(DecryptionError, match="version"):
            cipher.decrypt(other, user_id=USER, field="access")

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(b"", id="empty-body"),
            pytest.param(b"abc", id="shorter-than-a-nonce"),
            pytest.param(b"\x00" * 12, id="nonce-only"),
            pytest.param(b"\x00" * 20, id="nonce-and-short-tag"),
        ],
    )
    def test_a_truncated_body_with_a_known_key_id_raises_decryption_error(
        self, cipher: TokenCipher, raw: bytes
    ) -> None:
        """A body too short to hold a nonce and a tag, under a configured key id, raises DecryptionError."""
        token = f"v1.{cipher.current_key_id}.{base64.urlsafe_b64encode(raw).decode()}"

        with pytest.raises(DecryptionError):
            cipher.decrypt(token, user_id=USER, field="access")


class TestKeyRotation:
    def test_new_keys_decrypt_what_the_old_key_encrypted(self) -> None:
        """With keys [new, old], ciphertexts written under [old] still decrypt."""
        old, new = generate_key(), generate_key()
        before = TokenCipher([old])
        token = before.encrypt(SECRET, user_id=USER, field="refresh")

        after = TokenCipher([new, old])

        assert after.decrypt(token, user_id=USER, field="refresh") == SECRET
        assert ciphertext_key_id(token) == before.current_key_id

    def test_the_first_key_encrypts(self) -> None:
        """With keys [new, old], new ciphertexts carry the new key's id, and [new] alone can read them."""
        old, new = generate_key(), generate_key()
        after = TokenCipher([new, old])

        token = after.encrypt(SECRET, user_id=USER, field="access")

        assert after.current_key_id == TokenCipher([new]).current_key_id
        assert after.current_key_id != TokenCipher([old]).current_key_id
        assert ciphertext_key_id(token) == after.current_key_id
        assert TokenCipher([new]).decrypt(token, user_id=USER, field="access") == SECRET
        with pytest.raises(DecryptionError):
            TokenCipher([old]).decrypt(token, user_id=USER, field="access")

    def test_every_configured_key_is_known_newest_first(self) -> None:
        """With keys [new, old], what either key wrote is read, and the newest key writes."""
        old, new = generate_key(), generate_key()
        cipher = TokenCipher([new, old])

        for key in (new, old):
            token = TokenCipher([key]).encrypt(SECRET, user_id=USER, field="access")
            assert cipher.decrypt(token, user_id=USER, field="access") == SECRET
        written = cipher.encrypt(SECRET, user_id=USER, field="access")
        assert ciphertext_key_id(written) == TokenCipher([new]).current_key_id

    def test_a_key_id_reveals_nothing_of_the_key(self, key: str) -> None:
        """The key id is a short, stable name that is not a piece of the key."""
        kid = TokenCipher([key]).current_key_id

        assert kid == TokenCipher([key]).current_key_id
        assert len(kid) == 8
        assert kid not in key
        assert kid not in base64.urlsafe_b64decode(key + "=").hex()


class TestKeyConfiguration:
    def test_generated_keys_are_32_random_bytes_in_url_safe_base64(self) -> None:
        """`generate_key` gives distinct, unpadded url-safe base64 strings of 32 bytes, accepted by TokenCipher."""
        keys = {generate_key() for _ in range(20)}

        assert len(keys) == 20
        for key in keys:
            assert "=" not in key
            assert len(base64.urlsafe_b64decode(key + "=")) == 32
            TokenCipher([key])

    def test_padded_keys_are_accepted_too(self) -> None:
        """A key written with its `=` padding is the same key."""
        raw = bytes(range(32))
        padded = base64.urlsafe_b64encode(raw).decode()

        assert padded.endswith("=")
        assert TokenCipher([padded]).current_key_id == TokenCipher([padded.rstrip("=")]).current_key_id

    @pytest.mark.parametrize(
        "bad",
        [
            pytest.param("a", id="one-char"),
            pytest.param("not base64 at all!", id="prose"),
            pytest.param("ключ", id="non-ascii"),
            pytest.param(urlsafe(b"\x00" * 16), id="16-bytes"),
            pytest.param(urlsafe(b"\x00" * 64), id="64-bytes"),
            pytest.param("", id="empty-string"),
        ],
    )
    def test_a_bad_key_is_refused_with_a_pointer_to_gen_key(self, bad: str) -> None:
        """A key that is not 32 bytes of url-safe base64 raises KeyConfigError telling the operator to run gen-key."""
        with pytest.raises(KeyConfigError, match="tokensvc gen-key"):
            TokenCipher([bad])

    def test_a_16_byte_key_is_named_by_its_length(self) -> None:
        """The message for a short key says how many bytes it decodes to."""
        with pytest.raises(KeyConfigError, match="16 bytes, not 32"):
            TokenCipher([urlsafe(b"\x01" * 16)])

    def test_one_bad_key_among_good_ones_is_refused(self) -> None:
        """Every configured key is validated, not just the current one."""
        with pytest.raises(KeyConfigError):
            TokenCipher([generate_key(), urlsafe(b"\x01" * 16)])

    def test_no_key_at_all_is_refused(self) -> None:
        """An empty key list raises KeyConfigError."""
        with pytest.raises(KeyConfigError, match="no encryption key"):
            TokenCipher([])

    def test_key_config_error_is_a_value_error(self) -> None:
        """Settings validators can let KeyConfigError surface as a validation error (it is a ValueError)."""
        assert issubclass(KeyConfigError, ValueError)


class TestKeyFile:
    def test_a_missing_key_file_is_created_with_owner_only_permissions(self, tmp_path: Path) -> None:
        """The first call writes a fresh valid key with mode 0600 and reports created=True."""
        path = tmp_path / "tokensvc.key"

        key, created = load_or_create_key_file(path)

        assert created is True
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == key
        TokenCipher([key])

    def test_an_existing_key_file_is_reused(self, tmp_path: Path) -> None:
        """The second call returns the same key and created=False, leaving the file as it was."""
        path = tmp_path / "tokensvc.key"
        first, _ = load_or_create_key_file(path)
        content = path.read_bytes()

        second, created = load_or_create_key_file(path)

        assert created is False
        assert second == first
        assert path.read_bytes() == content
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_a_key_file_written_by_hand_is_read_without_its_newline(self, tmp_path: Path, key: str) -> None:
        """An operator-provided key file is used as is (surrounding whitespace stripped), not replaced."""
        path = tmp_path / "tokensvc.key"
        path.write_text(f"{key}\n")
        path.chmod(0o600)

        loaded, created = load_or_create_key_file(path)

        assert (loaded, created) == (key, False)

    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
    def test_a_key_file_others_may_read_or_write_is_refused(self, tmp_path: Path, key: str, mode: int) -> None:
        """Issue 14: an existing key file was read whatever its mode; now anything beyond 0600 is refused."""
        path = tmp_path / "tokensvc.key"
        path.write_text(key)
        path.chmod(mode)
        with pytest.raises(KeyFileError, match="chmod 600"):
            load_or_create_key_file(path)

    def test_a_symlinked_key_file_is_refused(self, tmp_path: Path, key: str) -> None:
        """A link (perhaps to a key someone else controls) is not followed, even to a 0600 file."""
        target = tmp_path / "elsewhere.key"
        target.write_text(key)
        target.chmod(0o600)
        path = tmp_path / "tokensvc.key"
        path.symlink_to(target)
        with pytest.raises(KeyFileError, match="symbolic link"):
            load_or_create_key_file(path)
        dangling = tmp_path / "dangling.key"
        dangling.symlink_to(tmp_path / "nothing-here")
        with pytest.raises(KeyFileError, match="symbolic link"):
            load_or_create_key_file(dangling)

    @pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
    def test_a_key_file_of_another_user_is_refused(self, tmp_path: Path, key: str) -> None:
        path = tmp_path / "tokensvc.key"
        path.write_text(key)
        path.chmod(0o600)
        os.chown(path, 4242, -1)
        with pytest.raises(KeyFileError, match="belongs to another user"):
            load_or_create_key_file(path)

    def test_a_ciphertext_survives_a_restart_through_the_key_file(self, tmp_path: Path) -> None:
        """What one process encrypts with the file's key, the next process (same file) decrypts."""
        path = tmp_path / "tokensvc.key"
        token = TokenCipher([load_or_create_key_file(path)[0]]).encrypt(SECRET, user_id=USER, field="access")

        assert TokenCipher([load_or_create_key_file(path)[0]]).decrypt(token, user_id=USER, field="access") == SECRET
