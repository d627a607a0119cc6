"""Tokens at rest: AES-256-GCM with a key id per ciphertext, bound to the user id and the field.

A ciphertext reads `v1.<key_id>.<base64url(nonce || ciphertext+tag)>`. The associated data is
`<user_id>\\x00<field>`, so a ciphertext moved into another user's row, or from the access to the refresh column,
fails authentication instead of being served. Keys come newest first: the first one encrypts, all of them decrypt,
which is what lets `rotate-keys` retire an old key later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = structlog.get_logger(__name__)

Field = Literal["access", "refresh"]
_VERSION = "v1"


class Sealed(Protocol):
    """A row holding a user's two ciphertexts (a token row, a tombstone)."""

    @property
    def user_id(self) -> str: ...
    @property
    def access_token_enc(self) -> str | None: ...
    @property
    def refresh_token_enc(self) -> str | None: ...


class KeyConfigError(ValueError):
    """An encryption key in the settings is not a 32-byte url-safe base64 string."""


class DecryptionError(Exception):
    """A stored ciphertext cannot be read: unknown key, tampered, or moved from another row."""


def generate_key() -> str:
    """A fresh 256-bit key, url-safe base64, as `TOKENSVC_ENCRYPTION_KEYS` takes it."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def _decode_key(text: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise KeyConfigError("an encryption key is not url-safe base64 (make one with `tokensvc gen-key`)") from exc
    if len(raw) != 32:
        raise KeyConfigError(
            f"an encryption key decodes to {len(raw)} bytes, not 32 (make one with `tokensvc gen-key`)"
        )
    return raw


def check_key(text: str) -> None:
    """Raises KeyConfigError (saying what is wrong) unless `text` is a key `tokensvc gen-key` could have made."""
    _decode_key(text)


def key_id_of_key(text: str) -> str:
    """The key id of a configured key (raises KeyConfigError for a malformed one)."""
    return key_id(_decode_key(text))


def key_id(raw: bytes) -> str:
    """A short public name for a key: enough to pick the right one, nothing about the key itself."""
    return hashlib.sha256(b"tokensvc-key-id" + raw).hexdigest()[:8]


class TokenCipher:
    """Encrypts and decrypts token fields with the configured keys (newest first)."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise KeyConfigError("no encryption key configured")
        raws = [_decode_key(k) for k in keys]
        self._keys = {key_id(raw): AESGCM(raw) for raw in raws}
        self.current_key_id = key_id(raws[0])

    def encrypt(self, plaintext: str, *, user_id: str, field: Field) -> str:
        nonce = os.urandom(12)
        sealed = self._keys[self.current_key_id].encrypt(nonce, plaintext.encode(), _aad(user_id, field))
        body = base64.urlsafe_b64encode(nonce + sealed).decode()
        return f"{_VERSION}.{self.current_key_id}.{body}"

    def decrypt(self, token: str, *, user_id: str, field: Field) -> str:
        """Raises DecryptionError when the key is unknown or the ciphertext does not belong to this user and field."""
        try:
            version, kid, body = token.split(".", 2)
            blob = base64.urlsafe_b64decode(body)
        except (ValueError, binascii.Error) as exc:
            raise DecryptionError("ciphertext is not in the v1.<key>.<data> form") from exc
        if version != _VERSION:
            raise DecryptionError(f"unknown ciphertext version {version!r}")
        aead = self._keys.get(kid)
        if aead is None:
            raise DecryptionError(f"ciphertext was made with key {kid}, which is not configured")
        if len(blob) < 12 + 16:  # nonce + tag: anything shorter was truncated
            raise DecryptionError("ciphertext is too short to be one of ours")
        try:
            return aead.decrypt(blob[:12], blob[12:], _aad(user_id, field)).decode()
        except InvalidTag as exc:
            raise DecryptionError("ciphertext failed authentication (tampered, or moved from another row)") from exc

    def open(self, row: Sealed, field: Field) -> str:
        """The row's `field` in clear text. Raises DecryptionError (logged as `token.decrypt_failed`) when it does
        not decrypt with the configured keys, or is missing."""
        ciphertext = row.access_token_enc if field == "access" else row.refresh_token_enc
        try:
            return self.decrypt(ciphertext or "", user_id=row.user_id, field=field)
        except DecryptionError as exc:
            log.error("token.decrypt_failed", user_id=row.user_id, field=field, error=str(exc))
            raise


def _aad(user_id: str, field: Field) -> bytes:
    return f"{user_id}\x00{field}".encode()


def load_or_create_key_file(path: Path) -> tuple[str, bool]:
    """The SQLite zero-setup key: read it from `path`, or create it there with mode 0600. Returns (key, created).

    Safe when several processes start at once: the key is written to a private temporary file and linked into
    place, which fails for all but the first; the others then read the complete file.
    """
    if path.is_symlink() or path.exists():
        return read_key_file(path), False
    key = generate_key()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        os.link(tmp, path)
    except FileExistsError:
        return read_key_file(path), False
    finally:
        tmp.unlink(missing_ok=True)
    return key, True


class KeyFileError(Exception):
    """The SQLite key file may have been read or replaced by someone else; the message says what to fix."""


def read_key_file(path: Path) -> str:
    """The key in an existing key file, only when it is a regular file (no symlink), owned by this user and
    readable by nobody else (mode 0600 or stricter). Raises KeyFileError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if path.is_symlink():
            raise KeyFileError(f"the key file {path} is a symbolic link; put the key file itself there") from None
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"the key file {path} is not a regular file")
        if info.st_uid != os.getuid():
            raise KeyFileError(f"the key file {path} belongs to another user (uid {info.st_uid}); chown it to yours")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"the key file {path} is readable or writable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run `chmod 600 {path}`"
            )
        return handle.read().strip()


NOTIFY_SECRET_PREFIX = "whsec_"


def generate_notify_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return NOTIFY_SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


def check_notify_secret(secret: str) -> None:
    """Refuse a signing secret that is not `whsec_` and 24 to 64 bytes in standard base64 (the Standard Webhooks
    format every receiver's library expects).

    Raises ValueError saying what to set.
    """
    hint = "make one with `tokensvc gen-key --notify`"
    if not secret.startswith(NOTIFY_SECRET_PREFIX):
        raise ValueError(f"TOKENSVC_NOTIFY_SECRET must start with {NOTIFY_SECRET_PREFIX!r}; {hint}")
    try:
        raw = base64.b64decode(secret.removeprefix(NOTIFY_SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError(f"TOKENSVC_NOTIFY_SECRET is not valid base64 after {NOTIFY_SECRET_PREFIX!r}; {hint}") from None
    if not 24 <= len(raw) <= 64:
        raise ValueError(f"TOKENSVC_NOTIFY_SECRET must hold 24 to 64 random bytes, got {len(raw)}; {hint}")
