"""Settings (CONTRACT.md "Settings"): parsing, validation, URL normalisation, and what `prepare()` fills in."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from tokensvc.config import (
    DEFAULT_SQLITE_URL,
    SANDBOX_API_KEY,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    ConfigError,
    Settings,
    check_connection_budget,
    encryption_keys,
    normalize_database_url,
    prepare,
    sqlite_key_path,
    sweep_workers,
)
from tokensvc.crypto import TokenCipher, generate_key

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/tokensvc"


# No TOKENSVC_* from the caller's shell, and no `.env` file: each test sees only what it sets.
pytestmark = pytest.mark.usefixtures("no_tokensvc_env")


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def secrets_of(values: list[SecretStr]) -> list[str]:
    return [v.get_secret_value() for v in values]


def strava_ready(**values: Any) -> Settings:
    """Settings that `prepare(sandbox=False)` accepts, unless a test overrides a value."""
    base: dict[str, Any] = {
        "strava_client_id": "12345",
        "strava_client_secret": "strava-secret",
        "api_keys": "key-1-0123456789abc",
        "encryption_keys": generate_key(),
        "database_url": DEFAULT_SQLITE_URL,
        "session_secret": "session-secret-" + "s" * 32,
    }
    return settings(**(base | values))


class TestDefaults:
    def test_nothing_set_gives_the_documented_defaults(self) -> None:
        """Unset variables take the defaults in CONTRACT.md's table."""
        s = Settings()
        assert s.database_url == DEFAULT_SQLITE_URL
        assert s.strava_base_url == "https://www.strava.com"
        assert s.scopes == ["read", "activity:read_all"]
        assert s.refresh_buffer_seconds == 1800
        assert s.sweep_interval_seconds == 300
        assert s.api_keys == []
        assert s.encryption_keys == []
        assert s.cors_origins == []
        assert s.redirect_allowlist == []
        assert s.public_url is None
        assert s.session_secret is None


class TestCommaSeparatedLists:
    @pytest.mark.parametrize(
        ("variable", "attribute", "items"),
        [
            ("TOKENSVC_API_KEYS", "api_keys", ["first", "second", "third"]),
            ("TOKENSVC_ENCRYPTION_KEYS", "encryption_keys", [generate_key() for _ in range(3)]),
            ("TOKENSVC_DECRYPTION_KEYS", "decryption_keys", [generate_key() for _ in range(3)]),
        ],
        ids=["api-keys", "encryption-keys", "decryption-keys"],
    )
    def test_secret_lists_from_the_environment_split_on_commas_and_drop_blanks(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, attribute: str, items: list[str]
    ) -> None:
        """`a, b,,c ` reads as three secrets in order, trimmed, with the empty item dropped."""
        monkeypatch.setenv(variable, f" {items[0]}, {items[1]},,{items[2]} ")
        if variable == "TOKENSVC_DECRYPTION_KEYS":
            monkeypatch.setenv("TOKENSVC_ENCRYPTION_KEYS", generate_key())
        value = getattr(Settings(), attribute)
        assert all(isinstance(item, SecretStr) for item in value)
        assert secrets_of(value) == items

    @pytest.mark.parametrize(
        ("variable", "attribute", "raw", "expected"),
        [
            (
                "TOKENSVC_CORS_ORIGINS",
                "cors_origins",
                "https://app.example.com, http://localhost:3000",
                ["https://app.example.com", "http://localhost:3000"],
            ),
            (
                "TOKENSVC_REDIRECT_ALLOWLIST",
                "redirect_allowlist",
                "https://app.example.com/settings,https://app.example.com/onboarding/",
                ["https://app.example.com/settings", "https://app.example.com/onboarding/"],
            ),
        ],
    )
    def test_plain_lists_from_the_environment_split_on_commas(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, attribute: str, raw: str, expected: list[str]
    ) -> None:
        """Origins and redirect prefixes are comma-separated, each trimmed, not parsed as JSON."""
        monkeypatch.setenv(variable, raw)
        assert getattr(Settings(), attribute) == expected

    def test_a_single_value_without_a_comma_is_a_one_item_list(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """One key needs no comma."""
        monkeypatch.setenv("TOKENSVC_API_KEYS", "only-key")
        assert secrets_of(Settings().api_keys) == ["only-key"]

    def test_an_empty_variable_is_an_empty_list(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`TOKENSVC_API_KEYS=` means no keys, not one empty key."""
        monkeypatch.setenv("TOKENSVC_API_KEYS", "")
        monkeypatch.setenv("TOKENSVC_CORS_ORIGINS", " , ")
        s = Settings()
        assert s.api_keys == []
        assert s.cors_origins == []

    def test_lists_passed_to_the_constructor_as_strings_split_too(self) -> None:
        """The same comma form works for values given in code."""
        s = settings(api_keys="a,b", cors_origins="https://x.example,https://y.example")
        assert secrets_of(s.api_keys) == ["a", "b"]
        assert s.cors_origins == ["https://x.example", "https://y.example"]

    def test_secrets_do_not_show_in_the_settings_repr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """API and encryption keys are SecretStr, so printing the settings does not leak them."""
        key = generate_key()
        monkeypatch.setenv("TOKENSVC_API_KEYS", "very-secret-api-key")
        monkeypatch.setenv("TOKENSVC_ENCRYPTION_KEYS", key)
        text = repr(Settings())
        assert "very-secret-api-key" not in text
        assert key not in text


class TestRefreshBufferRange:
    @pytest.mark.parametrize("value", ["60", "1800", "3600"])
    def test_values_from_60_to_3600_are_accepted(self, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
        """Both ends of 60..3600 are allowed."""
        monkeypatch.setenv("TOKENSVC_REFRESH_BUFFER_SECONDS", value)
        assert Settings().refresh_buffer_seconds == int(value)

    @pytest.mark.parametrize("value", ["59", "3601", "0", "-1"])
    def test_values_outside_the_range_are_refused_naming_the_variable(
        self, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        """Just outside 60..3600 refuses to load, with a message that names the variable and the range."""
        monkeypatch.setenv("TOKENSVC_REFRESH_BUFFER_SECONDS", value)
        with pytest.raises(ValidationError) as caught:
            Settings()
        message = str(caught.value)
        assert "TOKENSVC_REFRESH_BUFFER_SECONDS" in message
        assert "60" in message
        assert "3600" in message

    def test_a_non_number_is_refused_and_attributed_to_the_buffer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`abc` fails validation of refresh_buffer_seconds (the CLI turns the field into the variable name)."""
        monkeypatch.setenv("TOKENSVC_REFRESH_BUFFER_SECONDS", "abc")
        with pytest.raises(ValidationError) as caught:
            Settings()
        errors = caught.value.errors()
        assert [e["loc"] for e in errors] == [("refresh_buffer_seconds",)]
        assert "refresh_buffer_seconds" in str(caught.value)


class TestRevokeEndpoint:
    def test_auto_is_the_default(self) -> None:
        """Unset: revoke, falling back to deauthorize on a 404; retried every minute."""
        assert (Settings().strava_revoke_endpoint, Settings().revoke_poll_interval_seconds) == ("auto", 60)

    @pytest.mark.parametrize("value", ["auto", "revoke", "deauthorize"])
    def test_each_endpoint_can_be_pinned(self, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
        monkeypatch.setenv("TOKENSVC_STRAVA_REVOKE_ENDPOINT", value)
        assert Settings().strava_revoke_endpoint == value

    def test_anything_else_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A typo stops the start rather than silently picking one."""
        monkeypatch.setenv("TOKENSVC_STRAVA_REVOKE_ENDPOINT", "oauth/revoke")
        with pytest.raises(ValidationError) as caught:
            Settings()
        assert [e["loc"] for e in caught.value.errors()] == [("strava_revoke_endpoint",)]


class TestDatabaseUrlNormalisation:
    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            ("postgres://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
            ("postgresql://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
            ("postgresql+psycopg2://u@db/app", "postgresql+asyncpg://u@db/app"),
            ("postgresql+psycopg://u@db/app", "postgresql+asyncpg://u@db/app"),
            ("postgresql+asyncpg://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
            ("sqlite:///./tokensvc.db", "sqlite+aiosqlite:///./tokensvc.db"),
            ("sqlite:////var/lib/tokensvc.db", "sqlite+aiosqlite:////var/lib/tokensvc.db"),
            ("sqlite://", "sqlite+aiosqlite://"),
            ("sqlite+aiosqlite:///./tokensvc.db", "sqlite+aiosqlite:///./tokensvc.db"),
        ],
    )
    def test_pasted_urls_map_to_their_async_drivers(self, given: str, expected: str) -> None:
        """Sync-looking URLs become asyncpg / aiosqlite ones; async URLs are left as they are."""
        assert normalize_database_url(given) == expected

    def test_the_settings_normalise_the_environment_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`TOKENSVC_DATABASE_URL=postgres://…` is read as asyncpg."""
        monkeypatch.setenv("TOKENSVC_DATABASE_URL", "postgres://u@db/app")
        s = Settings()
        assert s.database_url == "postgresql+asyncpg://u@db/app"
        assert not s.is_sqlite

    def test_sqlite_urls_are_recognised_as_sqlite(self) -> None:
        """A plain `sqlite://` URL still counts as SQLite after normalisation."""
        assert settings(database_url="sqlite:///x.db").is_sqlite


class TestPrepareInSandbox:
    def test_sandbox_points_strava_at_the_built_in_emulator(self) -> None:
        """The Strava base URL becomes `<public_url>/sandbox/strava` with the emulator's credentials."""
        prepared = prepare(settings(encryption_keys=generate_key()), sandbox=True, port=8123)
        assert prepared.public_url == "http://127.0.0.1:8123"
        assert prepared.strava_base_url == "http://127.0.0.1:8123/sandbox/strava"
        assert prepared.strava_client_id == SANDBOX_CLIENT_ID
        assert prepared.strava_client_secret is not None
        assert prepared.strava_client_secret.get_secret_value() == SANDBOX_CLIENT_SECRET

    def test_sandbox_gives_the_sandbox_api_key_when_none_is_set(self) -> None:
        """Without TOKENSVC_API_KEYS the sandbox accepts `sandbox-key`."""
        prepared = prepare(settings(encryption_keys=generate_key()), sandbox=True)
        assert secrets_of(prepared.api_keys) == [SANDBOX_API_KEY] == ["sandbox-key"]

    def test_sandbox_keeps_configured_api_keys(self) -> None:
        """Keys set by the operator win over the sandbox default."""
        prepared = prepare(settings(encryption_keys=generate_key(), api_keys="mine"), sandbox=True)
        assert secrets_of(prepared.api_keys) == ["mine"]

    def test_sandbox_generates_a_session_secret_per_start(self) -> None:
        """With no TOKENSVC_SESSION_SECRET a random one is made, different on every start."""
        base = settings(encryption_keys=generate_key())
        first = prepare(base, sandbox=True).session_secret
        second = prepare(base, sandbox=True).session_secret
        assert first is not None
        assert second is not None
        assert len(first.get_secret_value()) >= 32
        assert first.get_secret_value() != second.get_secret_value()

    def test_sandbox_keeps_a_configured_session_secret(self) -> None:
        """An operator's session secret is not replaced."""
        prepared = prepare(settings(encryption_keys=generate_key(), session_secret="fixed-" + "f" * 32), sandbox=True)
        assert prepared.session_secret is not None
        assert prepared.session_secret.get_secret_value() == "fixed-" + "f" * 32

    def test_sandbox_uses_the_configured_public_url_without_its_trailing_slash(self) -> None:
        """A public URL behind a proxy is the base of the emulator's URL too."""
        prepared = prepare(
            settings(encryption_keys=generate_key(), public_url="https://tokens.example.com/"), sandbox=True
        )
        assert prepared.public_url == "https://tokens.example.com"
        assert prepared.strava_base_url == "https://tokens.example.com/sandbox/strava"

    def test_prepare_leaves_the_given_settings_untouched(self) -> None:
        """`prepare` returns a copy; the settings it was given are not modified."""
        base = settings(encryption_keys=generate_key())
        prepare(base, sandbox=True)
        assert base.public_url is None
        assert base.strava_base_url == "https://www.strava.com"
        assert base.api_keys == []


class TestPreparePublicUrl:
    def test_public_url_defaults_to_localhost_and_the_port(self) -> None:
        """Unset, the public URL is `http://127.0.0.1:<port>`."""
        prepared = prepare(strava_ready(), sandbox=False, port=9001)
        assert prepared.public_url == "http://127.0.0.1:9001"

    def test_a_configured_public_url_is_kept(self) -> None:
        """TOKENSVC_PUBLIC_URL wins over the listening address."""
        prepared = prepare(strava_ready(public_url="https://tokens.example.com"), sandbox=False, port=9001)
        assert prepared.public_url == "https://tokens.example.com"

    @pytest.mark.parametrize("host", ["0.0.0.0", "::"])
    def test_listening_on_every_interface_still_defaults_to_a_reachable_url(self, host: str) -> None:
        """`--host 0.0.0.0` / `--host ::` bind everywhere; the default public URL stays `http://127.0.0.1:<port>`."""
        prepared = prepare(strava_ready(), sandbox=False, host=host, port=9001)
        assert prepared.public_url == "http://127.0.0.1:9001"


class TestPrepareOutsideSandbox:
    def test_complete_settings_keep_the_real_strava(self) -> None:
        """With credentials and API keys nothing points at the emulator."""
        prepared = prepare(strava_ready(), sandbox=False)
        assert prepared.strava_base_url == "https://www.strava.com"
        assert prepared.strava_client_id == "12345"
        assert secrets_of(prepared.api_keys) == ["key-1-0123456789abc"]

    @pytest.mark.parametrize(
        "missing",
        [
            {"strava_client_id": None, "strava_client_secret": None},
            {"strava_client_id": None},
            {"strava_client_secret": None},
            {"strava_client_id": ""},
        ],
    )
    def test_without_strava_credentials_it_refuses_and_says_what_to_set(self, missing: dict[str, Any]) -> None:
        """No Strava app credentials: ConfigError naming TOKENSVC_STRAVA_CLIENT_ID and offering --sandbox."""
        with pytest.raises(ConfigError) as caught:
            prepare(strava_ready(**missing), sandbox=False)
        message = str(caught.value)
        assert "TOKENSVC_STRAVA_CLIENT_ID" in message
        assert "TOKENSVC_STRAVA_CLIENT_SECRET" in message
        assert "--sandbox" in message

    def test_without_api_keys_it_refuses_and_says_what_to_set(self) -> None:
        """No API keys outside the sandbox: ConfigError naming TOKENSVC_API_KEYS."""
        with pytest.raises(ConfigError, match="TOKENSVC_API_KEYS"):
            prepare(strava_ready(api_keys=""), sandbox=False)


class TestSecretLengths:
    """Issue 14: `TOKENSVC_ADMIN_PASSWORD=b` and `TOKENSVC_API_KEYS=a` were accepted."""

    @pytest.mark.parametrize("keys", ["a", "long-enough-key-0001,short"])
    def test_a_short_api_key_refuses_to_start(self, keys: str) -> None:
        """Any key under 16 characters: ConfigError naming the variable and which key."""
        with pytest.raises(ConfigError, match=r"TOKENSVC_API_KEYS: key number \d+ is shorter than 16"):
            prepare(strava_ready(api_keys=keys), sandbox=False)

    def test_a_short_admin_password_refuses_to_start(self) -> None:
        """An admin password under 12 characters: ConfigError naming it."""
        with pytest.raises(ConfigError, match="TOKENSVC_ADMIN_PASSWORD is shorter than 12"):
            prepare(strava_ready(admin_password="b"), sandbox=False)
        prepare(strava_ready(admin_password="twelve-chars"), sandbox=False)

    def test_the_sandbox_takes_short_secrets_and_signs_in_with_its_key(self) -> None:
        """`--sandbox` is for trying out: short secrets pass; without a password the form takes `sandbox-key`."""
        prepare(strava_ready(api_keys="a", admin_password="b"), sandbox=True)
        prepared = prepare(settings(encryption_keys=generate_key()), sandbox=True)
        assert prepared.admin_password is not None
        assert prepared.admin_password.get_secret_value() == "sandbox-key"


class TestCorsOrigins:
    @pytest.mark.parametrize("value", ["*", "https://app.example,*", "https://*.example"])
    def test_a_wildcard_is_refused(self, value: str) -> None:
        """`*` was accepted and then reflected any origin with credentials (issue 14)."""
        with pytest.raises(ValidationError, match="exact origins"):
            settings(cors_origins=value)


class TestTrustedProxies:
    def test_addresses_and_networks_are_accepted(self) -> None:
        assert settings(trusted_proxies="10.0.0.5, 10.1.0.0/16,::1").trusted_proxies == [
            "10.0.0.5",
            "10.1.0.0/16",
            "::1",
        ]

    @pytest.mark.parametrize("value", ["*", "proxy.internal", "10.0.0.0/33"])
    def test_anything_else_is_refused(self, value: str) -> None:
        """Only explicit addresses: `*` would let any client claim any address."""
        with pytest.raises(ValidationError, match="not an IP address or network"):
            settings(trusted_proxies=value)


class TestEncryptionKeysForPostgres:
    @pytest.mark.parametrize("sandbox", [False, True])
    def test_postgres_without_keys_refuses_and_points_at_gen_key(self, sandbox: bool) -> None:
        """A non-SQLite database needs TOKENSVC_ENCRYPTION_KEYS; the message says how to make one."""
        with pytest.raises(ConfigError) as caught:
            prepare(strava_ready(database_url=PG_URL, encryption_keys=""), sandbox=sandbox)
        message = str(caught.value)
        assert "TOKENSVC_ENCRYPTION_KEYS" in message
        assert "tokensvc gen-key" in message

    def test_postgres_with_keys_keeps_them_newest_first(self) -> None:
        """Configured keys pass through in the order given (the first one encrypts)."""
        new, old = generate_key(), generate_key()
        prepared = prepare(strava_ready(database_url=PG_URL, encryption_keys=f"{new},{old}"), sandbox=False)
        assert secrets_of(prepared.encryption_keys) == [new, old]

    def test_configured_keys_are_used_for_sqlite_too_and_no_file_is_made(self, tmp_path: Path) -> None:
        """With keys set, SQLite does not generate a key file."""
        key = generate_key()
        db = tmp_path / "app.db"
        prepared = prepare(strava_ready(database_url=f"sqlite:///{db}", encryption_keys=key), sandbox=False)
        assert secrets_of(prepared.encryption_keys) == [key]
        assert not (tmp_path / "app.db.key").exists()


class TestSqliteKeyFile:
    def test_a_key_file_is_created_beside_the_database_with_mode_0600(self, tmp_path: Path) -> None:
        """SQLite without keys: a fresh key is written to `<db>.key`, readable by the owner only."""
        db = tmp_path / "data" / "app.db"
        db.parent.mkdir()
        prepared = prepare(strava_ready(database_url=f"sqlite:///{db}", encryption_keys=""), sandbox=False)
        key_file = tmp_path / "data" / "app.db.key"
        assert key_file.is_file()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert secrets_of(prepared.encryption_keys) == [key]
        TokenCipher([key])  # a real 32-byte key, not a placeholder

    def test_the_key_file_is_reused_on_the_next_start(self, tmp_path: Path) -> None:
        """The second start reads the same key, so tokens written before stay readable."""
        url = f"sqlite:///{tmp_path / 'app.db'}"
        first = prepare(strava_ready(database_url=url, encryption_keys=""), sandbox=False)
        second = prepare(strava_ready(database_url=url, encryption_keys=""), sandbox=True)
        assert secrets_of(first.encryption_keys) == secrets_of(second.encryption_keys)
        cipher_one = TokenCipher(secrets_of(first.encryption_keys))
        cipher_two = TokenCipher(secrets_of(second.encryption_keys))
        sealed = cipher_one.encrypt("a-token", user_id="u1", field="access")
        assert cipher_two.decrypt(sealed, user_id="u1", field="access") == "a-token"

    def test_a_relative_database_gets_its_key_file_relative_to_the_working_directory(self, tmp_path: Path) -> None:
        """The default `./tokensvc.db` keeps its key in `./tokensvc.db.key`."""
        encryption_keys(settings())
        assert (tmp_path / "tokensvc.db.key").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tokensvc.db.key"]

    def test_a_key_file_another_process_creates_at_the_same_moment_is_shared(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two processes starting together on one SQLite file end up with the same key, and neither crashes."""
        key_file = tmp_path / "app.db.key"
        other_process_key = generate_key()
        real_exists = Path.exists

        def exists_then_the_other_process_wins(self: Path, *args: Any, **kwargs: Any) -> bool:
            # The other process makes the same "is there a key file?" check, then creates the file first.
            found = real_exists(self, *args, **kwargs)
            if self == key_file and not found:
                key_file.write_text(other_process_key + "\n")
                key_file.chmod(0o600)  # as tokensvc makes it
            return found

        monkeypatch.setattr(Path, "exists", exists_then_the_other_process_wins)
        keys = encryption_keys(settings(database_url=f"sqlite:///{tmp_path / 'app.db'}"))
        assert keys == [other_process_key]

    def test_a_key_file_others_may_read_refuses_to_start(self, tmp_path: Path) -> None:
        """Issue 14: the key file was read whatever its mode; the start is refused, saying what to run."""
        key_file = tmp_path / "app.db.key"
        key_file.write_text(generate_key())
        key_file.chmod(0o644)
        with pytest.raises(ConfigError, match="chmod 600"):
            encryption_keys(settings(database_url=f"sqlite:///{tmp_path / 'app.db'}"))


class TestInMemorySqlite:
    @pytest.mark.parametrize("url", ["sqlite://", "sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"])
    def test_an_in_memory_database_gets_an_ephemeral_key_and_no_file(self, tmp_path: Path, url: str) -> None:
        """The data dies with the process, so may its key: a valid key, nothing written to disk."""
        prepared = prepare(settings(database_url=url), sandbox=True)
        keys = secrets_of(prepared.encryption_keys)
        assert len(keys) == 1
        TokenCipher(keys)
        assert list(tmp_path.iterdir()) == []

    def test_each_start_gets_a_new_ephemeral_key(self) -> None:
        """Nothing is remembered between two in-memory starts."""
        s = settings(database_url="sqlite+aiosqlite:///:memory:")
        assert encryption_keys(s) != encryption_keys(s)


class TestSqliteKeyPath:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("sqlite+aiosqlite:///./tokensvc.db", Path("tokensvc.db.key")),
            ("sqlite+aiosqlite:///tokensvc.db", Path("tokensvc.db.key")),
            ("sqlite+aiosqlite:///data/app.sqlite3", Path("data/app.sqlite3.key")),
            ("sqlite+aiosqlite:////var/lib/tokensvc/app.db", Path("/var/lib/tokensvc/app.db.key")),
        ],
    )
    def test_the_key_sits_beside_the_database_file(self, url: str, expected: Path) -> None:
        """`<db>` → `<db>.key` in the same directory."""
        assert sqlite_key_path(url) == expected

    @pytest.mark.parametrize(
        "url",
        [
            "sqlite+aiosqlite://",
            "sqlite+aiosqlite:///:memory:",
            "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true",
        ],
    )
    def test_in_memory_databases_have_no_key_path(self, url: str) -> None:
        """No file, no key path."""
        assert sqlite_key_path(url) is None

    def test_a_uri_filename_keeps_its_key_beside_the_database_file(self) -> None:
        """`file:/path/app.db?…&uri=true` names the file `/path/app.db`, so the key is `/path/app.db.key`."""
        assert sqlite_key_path("sqlite+aiosqlite:///file:/var/lib/app.db?mode=rwc&uri=true") == Path(
            "/var/lib/app.db.key"
        )


class TestSessionSecret:
    def test_serving_without_a_session_secret_is_refused(self) -> None:
        """Outside the sandbox, browser sessions and OAuth state need a secret shared by every replica."""
        with pytest.raises(ConfigError, match="TOKENSVC_SESSION_SECRET"):
            prepare(strava_ready(session_secret=None), sandbox=False)

    def test_a_short_session_secret_is_refused(self) -> None:
        """Placeholders such as `changeme` are not secrets: at least 32 characters."""
        with pytest.raises(ValidationError, match="at least 32 characters"):
            settings(session_secret="changeme")


class TestDecryptionKeys:
    def test_the_encrypting_key_comes_first_then_the_decrypt_only_ones(self) -> None:
        """The cipher gets TOKENSVC_ENCRYPTION_KEYS (the first one encrypts) and then TOKENSVC_DECRYPTION_KEYS."""
        new, old, older = generate_key(), generate_key(), generate_key()
        settings = Settings(encryption_keys=[SecretStr(new)], decryption_keys=[SecretStr(old), SecretStr(older)])
        assert settings.all_encryption_keys == [new, old, older]
        cipher = TokenCipher(settings.all_encryption_keys)
        assert cipher.current_key_id == TokenCipher([new]).current_key_id
        under_old = TokenCipher([old]).encrypt("secret", user_id="u", field="access")
        assert cipher.decrypt(under_old, user_id="u", field="access") == "secret"

    def test_decrypt_only_keys_without_an_encrypting_one_are_refused(self) -> None:
        """Nothing could encrypt: the sentence says which variable to set."""
        with pytest.raises(ValidationError, match="TOKENSVC_DECRYPTION_KEYS is set but TOKENSVC_ENCRYPTION_KEYS"):
            Settings(decryption_keys=[SecretStr(generate_key())])

    @pytest.mark.parametrize("where", ["both-lists", "twice-in-one-list"])
    def test_a_key_listed_twice_is_refused(self, where: str) -> None:
        """A key either encrypts or only decrypts; listing it twice is a mistake worth stopping for."""
        key = generate_key()
        lists = (
            {"encryption_keys": [SecretStr(key)], "decryption_keys": [SecretStr(key)]}
            if where == "both-lists"
            else {"encryption_keys": [SecretStr(generate_key()), SecretStr(key), SecretStr(key)]}
        )
        with pytest.raises(ValidationError, match="listed twice"):
            Settings(**lists)  # type: ignore[arg-type]

    @pytest.mark.parametrize("variable", ["TOKENSVC_ENCRYPTION_KEYS", "TOKENSVC_DECRYPTION_KEYS"])
    def test_a_malformed_key_stops_at_once_naming_its_place(
        self, monkeypatch: pytest.MonkeyPatch, variable: str
    ) -> None:
        """A key that is not 32 bytes of url-safe base64 is refused when the settings are read, not at first use."""
        monkeypatch.setenv("TOKENSVC_ENCRYPTION_KEYS", generate_key())
        monkeypatch.setenv(variable, f"{generate_key()},{generate_key()[:20]}")
        with pytest.raises(ValidationError, match=r"key number 2 of the list is not usable: .* 15 bytes, not 32"):
            Settings()


class TestConnectionBudget:
    """Issue 12 item 1: one replica opens at most 8 Postgres connections at defaults; a sweep cannot take the pool."""

    def test_defaults_open_at_most_eight_connections(self) -> None:
        """Engine pool 5 + reader pool 1 + the token cache's listener 1 + readiness 1: ten replicas fit in 80 of 100."""
        s = settings(database_url=PG_URL)
        assert (s.db_pool_size, s.db_reader_pool_size, s.token_cache) == (5, 1, True)
        assert s.connection_budget == 8

    def test_what_is_not_opened_is_not_counted(self) -> None:
        """No listener without the token cache; no reader pool behind a pooler (reads go through the engine)."""
        assert settings(database_url=PG_URL, token_cache=False).connection_budget == 7
        assert settings(database_url=PG_URL, db_statement_cache=False, token_cache=False).connection_budget == 6
        assert settings(database_url=PG_URL, db_pool_size=20, db_reader_pool_size=4).connection_budget == 26

    def test_the_default_sweep_leaves_token_slots_to_users_and_fits_the_default_pool(self) -> None:
        """The sweep keeps 6 calls at Strava, of the 32 token slots (the rest stay free for users waiting on a
        refresh); its workers outnumber the pool of 5, which is fine: none holds a connection across a call."""
        s = settings(database_url=PG_URL)
        assert (s.sweep_concurrency, s.strava_token_concurrency) == (6, 32)
        assert sweep_workers(s.sweep_concurrency) > s.db_pool_size == 5
        check_connection_budget(s)  # no error
        assert s.connection_budget == 8

    def test_a_large_sweep_is_not_held_against_the_pool(self) -> None:
        prepared = prepare(
            strava_ready(database_url=PG_URL, encryption_keys=generate_key(), sweep_concurrency=50), sandbox=False
        )
        assert prepared.connection_budget == 8

    def test_a_pool_with_no_connection_beside_the_reserve_stops_serve_with_a_sentence(self) -> None:
        with pytest.raises(ConfigError) as caught:
            prepare(strava_ready(database_url=PG_URL, db_pool_size=1), sandbox=False)
        message = str(caught.value)
        assert "TOKENSVC_DB_POOL_SIZE=1 leaves the sweep no connection" in message
        assert "TOKENSVC_DB_POOL_SIZE to at least 2." in message

    def test_the_smallest_pool_that_fits_starts(self) -> None:
        check_connection_budget(settings(database_url=PG_URL, db_pool_size=2, sweep_concurrency=20))

    def test_sqlite_has_no_pool_to_budget(self) -> None:
        check_connection_budget(settings(db_pool_size=1, sweep_concurrency=50))
