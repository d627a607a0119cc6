"""Settings: one pydantic-settings class, read once at start-up and passed into factories."""

from __future__ import annotations

import ipaddress
import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

from tokensvc.crypto import (
    KeyConfigError,
    KeyFileError,
    check_key,
    check_notify_secret,
    generate_key,
    key_id_of_key,
    load_or_create_key_file,
)

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./tokensvc.db"
SANDBOX_API_KEY = "sandbox-key"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service can be told, from `TOKENSVC_*` environment variables or a `.env` file."""

    model_config = SettingsConfigDict(env_prefix="TOKENSVC_", env_file=".env", extra="ignore")

    database_url: str = DEFAULT_SQLITE_URL
    strava_client_id: str | None = None
    strava_client_secret: SecretStr | None = None
    strava_base_url: str = "https://www.strava.com"
    # v1.1: the Strava API the gateway calls (unset: the base URL + `/api/v3`; a host move is rumoured).
    strava_api_base_url: str | None = None
    # v1.1: the gateway's own request-body bound (an activity upload); every other endpoint keeps 64 KiB.
    gateway_max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    strava_scopes: str = "read,activity:read_all"
    strava_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # A token call's total deadline (retries included): generous, since no connection waits on it; shorter than
    # the refresh claim, so a live owner never loses its claim mid-call.
    strava_token_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    # How long a replica's claim on one user's refresh lasts; a claim this old is taken over (its owner died).
    refresh_claim_seconds: float = Field(default=45.0, ge=5, le=600)
    # After Strava answered, how long a refresh keeps retrying its write while the database is away.
    refresh_write_budget_seconds: float = Field(default=30.0, ge=1, le=600)
    # SIGTERM to exit: requests finish, in-flight refreshes finish or give their claim back, loops stop, the
    # client and the engine close, all within this (fits Kubernetes' default 30 s grace).
    shutdown_timeout_seconds: float = Field(default=25.0, ge=1, le=600)
    public_url: str | None = None
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    encryption_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Keys that only decrypt (never encrypt): how a new key reaches every replica before any replica writes with
    # it, and how an old one stays readable until rotate-keys has moved every row off it (docs/operations.md).
    decryption_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    refresh_buffer_seconds: int = 1800
    sweep_interval_seconds: int = Field(default=300, ge=0)
    # Strava calls a sweep keeps in flight (of the process's TOKENSVC_STRAVA_TOKEN_CONCURRENCY token slots, so that
    # a sweep leaves most of them to users waiting on a refresh). Its workers (`sweep_workers`: this, a quarter
    # more, and one) hold a pooled connection only for their short claim and store transactions, never while
    # Strava answers, so they may outnumber the pool (check_connection_budget).
    sweep_concurrency: int = Field(default=6, ge=1, le=200)
    sweep_batch_size: int = Field(default=100, ge=1, le=5000)
    # Must outlive a refresh (Strava timeout + lock wait): a claim this old is taken to be abandoned.
    sweep_lease_seconds: int = Field(default=300, ge=60)
    # v1.1: the sweeper refreshes only users whose token something asked for within this many days (0: everyone);
    # an idle user refreshes on demand, plus one keep-alive refresh every TOKENSVC_SWEEP_IDLE_KEEPALIVE_DAYS.
    sweep_active_days: int = Field(default=30, ge=0, le=3650)
    sweep_idle_keepalive_days: int = Field(default=14, ge=1, le=3650)
    strava_rate_limit: str = Field(default="200,2000", pattern=r"^\s*\d+\s*,\s*\d+\s*$")
    # Strava's read ("non-upload") limit, charged as well for every rate-counted GET (the athlete check).
    strava_read_rate_limit: str = Field(default="100,1000", pattern=r"^\s*\d+\s*,\s*\d+\s*$")
    # v1.1: how many connected athletes the Strava app may have (Strava: 1 for a new app, 10 self-serve, more after
    # review); /v1/stats, /metrics and the dashboard show connected athletes against it. Unset: not shown.
    strava_athlete_capacity: int | None = Field(default=None, ge=1, le=100_000_000)
    # How a deleted user's grant is ended at Strava: `auto` sends `POST /oauth/revoke` and falls back to the legacy
    # `/oauth/deauthorize` on a 404 (the latter is reported to retire on 2027-06-01); `revoke` or `deauthorize` pins
    # one endpoint.
    strava_revoke_endpoint: Literal["auto", "revoke", "deauthorize"] = "auto"
    # How often each replica retries the revocations Strava has not confirmed yet (tombstones); 0: none here.
    revoke_poll_interval_seconds: int = Field(default=60, ge=0, le=86_400)
    # /oauth/token calls (refresh, exchange) are not rate-counted by Strava: this bounds them per process instead.
    # Generous, since a caller waits for a slot no longer than its claim allows (13 s at defaults): with Strava
    # answering in 8 s, 32 let 50 on-demand refreshes on one process finish in two rounds; a sweep takes at most
    # TOKENSVC_SWEEP_CONCURRENCY of them.
    strava_token_concurrency: int = Field(default=32, ge=1, le=200)
    session_secret: SecretStr | None = None
    session_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=300, le=90 * 24 * 3600)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redirect_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    strava_webhook_verify_token: SecretStr | None = None
    # How often each replica looks for Strava webhook events due for (another) attempt; a new event wakes the
    # replica that received it at once. 0 turns processing off in this process.
    webhook_poll_interval_seconds: int = Field(default=30, ge=0)
    # A secret path segment for the callback (`/v1/webhooks/strava/{secret}`); the bare path then answers 404.
    strava_webhook_path_secret: SecretStr | None = None
    # Forwarded Strava events (activity and athlete updates) per athlete and clock hour; a burst beyond is counted
    # and dropped: events are unsigned, and the app's worker spends read units on each one.
    webhook_forward_per_athlete_hour: int = Field(default=100, ge=0, le=100_000)
    notify_url: str | None = None
    notify_secret: SecretStr | None = None
    # Delivery of notifications (service/notify.py): one POST's timeout; how often each replica looks for due rows
    # (a change is delivered within about this long); retries back off from the first delay, doubling, up to the cap.
    notify_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    notify_poll_seconds: float = Field(default=1.0, gt=0, le=300)
    notify_concurrency: int = Field(default=4, ge=1, le=100)
    notify_backoff_seconds: float = Field(default=5.0, gt=0, le=3600)
    notify_backoff_max_seconds: float = Field(default=3600.0, gt=0, le=86400)
    # Audit rows (refresh attempts, changes of state) older than this are purged by the background loop.
    audit_retention_days: int = Field(default=90, ge=1, le=3650)
    # Lets operators sign in to /dashboard with a password instead of an API key.
    admin_password: SecretStr | None = None
    log_level: str = "INFO"
    # The connection budget (Postgres; `connection_budget` computes it): one process opens at most
    #     TOKENSVC_DB_POOL_SIZE + TOKENSVC_DB_READER_POOL_SIZE + 1 (the token cache's listener) + 1 (/readyz's own)
    # connections whatever the load: 5 + 1 + 1 + 1 = 8 at defaults, so ten replicas hold at most 80 of the server's
    # default max_connections of 100. The reader pool is not opened with TOKENSVC_DB_STATEMENT_CACHE=false, the
    # listener not with TOKENSVC_TOKEN_CACHE=false. Migrations at start-up use one connection, closed before serving.
    # The engine's pool: every transaction (refreshes, imports, sweeps, webhooks, outbox, housekeeping, gauges).
    db_pool_size: int = Field(default=5, ge=1, le=500)
    # The hot path's own pool for single-row reads on a token-cache miss (access-token, status).
    db_reader_pool_size: int = Field(default=1, ge=1, le=500)
    # How long a request waits for a free pooled connection before it is answered 503 with Retry-After.
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Postgres: keep valid tokens in memory, dropped on every change through LISTEN/NOTIFY (one more connection).
    token_cache: bool = True
    # The token cache's bound: under 2 KB of memory per entry (bench/growth.py).
    token_cache_max_entries: int = Field(default=100_000, ge=1, le=10_000_000)
    # Postgres: asyncpg's prepared-statement caches (SQLAlchemy's and the hot reader's). Turn off behind a
    # transaction-mode pooler (PgBouncer), which hands each transaction whichever server connection is free.
    db_statement_cache: bool = True
    # How often each replica reads the DB-wide gauges of /metrics (a scrape never queries the database).
    gauge_interval_seconds: float = Field(default=10.0, ge=1, le=300)
    # Row-lock wait for a refresh: longer than one Strava call, so a waiter outlives the holder's HTTP timeout.
    lock_timeout_seconds: float = Field(default=30.0, gt=0)
    # Limits at the edge (edge.py, api/inflight.py, docs/security.md): the request line and headers (431 above),
    # the time to send them and then the body (408 after), the requests one process works on at once (503
    # `overloaded` above; the probes exempt), and the proxies whose X-Forwarded-For / -Proto are believed
    # (addresses or networks; none by default: the peer's address is the client's).
    max_header_bytes: int = Field(default=16 * 1024, ge=4096, le=1024 * 1024)
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    body_timeout_seconds: float = Field(default=20.0, gt=0, le=600)
    max_requests_in_flight: int = Field(default=2048, ge=1, le=1_000_000)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    _split = field_validator(
        "api_keys",
        "encryption_keys",
        "decryption_keys",
        "cors_origins",
        "redirect_allowlist",
        "trusted_proxies",
        mode="before",
    )(_split_csv)

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        if any("*" in origin for origin in value):
            raise ValueError(
                "list the exact origins of your apps (e.g. https://app.example.com): a wildcard would let any site "
                "call the browser endpoints with its visitors' session cookies"
            )
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/8)") from None
        return value

    @field_validator("encryption_keys", "decryption_keys")
    @classmethod
    def _keys_well_formed(cls, value: list[SecretStr]) -> list[SecretStr]:
        for number, key in enumerate(value, start=1):
            try:
                check_key(key.get_secret_value())
            except KeyConfigError as exc:
                raise ValueError(f"key number {number} of the list is not usable: {exc}") from None
        return value

    @model_validator(mode="after")
    def _keys_distinct(self) -> Settings:
        if self.decryption_keys and not self.encryption_keys:
            raise ValueError(
                "TOKENSVC_DECRYPTION_KEYS is set but TOKENSVC_ENCRYPTION_KEYS is not: set the key that encrypts "
                "in TOKENSVC_ENCRYPTION_KEYS and keep only keys that must still be read in TOKENSVC_DECRYPTION_KEYS"
            )
        seen: set[str] = set()
        for key in [*self.encryption_keys, *self.decryption_keys]:
            kid = key_id_of_key(key.get_secret_value())
            if kid in seen:
                raise ValueError(
                    f"the key with id {kid} is listed twice in TOKENSVC_ENCRYPTION_KEYS / TOKENSVC_DECRYPTION_KEYS: "
                    "a key either encrypts (TOKENSVC_ENCRYPTION_KEYS) or only decrypts (TOKENSVC_DECRYPTION_KEYS)"
                )
            seen.add(kid)
        return self

    @field_validator("refresh_buffer_seconds")
    @classmethod
    def _buffer_in_range(cls, value: int) -> int:
        if not 60 <= value <= 3600:
            raise ValueError(f"TOKENSVC_REFRESH_BUFFER_SECONDS must be between 60 and 3600 seconds, got {value}")
        return value

    @field_validator("session_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "TOKENSVC_SESSION_SECRET must be at least 32 characters (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)"
            )
        return value

    @field_validator("strava_webhook_path_secret")
    @classmethod
    def _path_secret_format(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", value.get_secret_value()):
            raise ValueError(
                "TOKENSVC_STRAVA_WEBHOOK_PATH_SECRET must be 16..128 characters of [A-Za-z0-9_-] (e.g. `python -c "
                "'import secrets; print(secrets.token_urlsafe(24))'`)"
            )
        return value

    @field_validator("notify_secret")
    @classmethod
    def _notify_secret_format(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_notify_secret(value.get_secret_value())
        return value

    @field_validator("notify_url")
    @classmethod
    def _notify_url_is_http(cls, value: str | None) -> str | None:
        if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc):
            raise ValueError(f"TOKENSVC_NOTIFY_URL must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        return normalize_database_url(value)

    @model_validator(mode="after")
    def _claim_outlives_token_call(self) -> Settings:
        if self.refresh_claim_seconds < self.strava_token_timeout_seconds + 5:
            raise ValueError(
                "TOKENSVC_REFRESH_CLAIM_SECONDS must be at least 5 s longer than "
                "TOKENSVC_STRAVA_TOKEN_TIMEOUT_SECONDS, so that a live refresh never loses its claim mid-call"
            )
        return self

    @model_validator(mode="after")
    def _lock_outlives_http(self) -> Settings:
        if self.lock_timeout_seconds <= self.strava_timeout_seconds:
            raise ValueError(
                "TOKENSVC_LOCK_TIMEOUT_SECONDS must be longer than TOKENSVC_STRAVA_TIMEOUT_SECONDS, "
                "so that a caller waiting for a refresh outlives the refresh's own HTTP call"
            )
        return self

    @model_validator(mode="after")
    def _notify_needs_secret(self) -> Settings:
        if self.notify_url and self.notify_secret is None:
            raise ValueError(
                "TOKENSVC_NOTIFY_URL is set but TOKENSVC_NOTIFY_SECRET is not: notifications are signed "
                "(Standard Webhooks); make a secret with `tokensvc gen-key --notify`"
            )
        return self

    @property
    def rate_limits(self) -> tuple[int, int]:
        """(15-minute, daily) Strava call budget."""
        fifteen, daily = (int(part) for part in self.strava_rate_limit.split(","))
        return fifteen, daily

    @property
    def api_base_url(self) -> str:
        """Where the gateway sends `/{path}`: TOKENSVC_STRAVA_API_BASE_URL, else the base URL + `/api/v3`."""
        return (self.strava_api_base_url or f"{self.strava_base_url.rstrip('/')}/api/v3").rstrip("/")

    @property
    def read_rate_limits(self) -> tuple[int, int]:
        """(15-minute, daily) Strava read-call budget."""
        fifteen, daily = (int(part) for part in self.strava_read_rate_limit.split(","))
        return fifteen, daily

    @property
    def all_encryption_keys(self) -> list[str]:
        """Every key the cipher takes: the encrypting one first, then every other one that decrypts."""
        return [k.get_secret_value() for k in (*self.encryption_keys, *self.decryption_keys)]

    @property
    def connection_budget(self) -> int:
        """The most Postgres connections this process opens at once (see the comment on `db_pool_size`)."""
        reader = self.db_reader_pool_size if self.db_statement_cache else 0
        return self.db_pool_size + reader + int(self.token_cache) + READINESS_CONNECTIONS

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @cached_property
    def scopes(self) -> list[str]:
        return [s.strip() for s in self.strava_scopes.split(",") if s.strip()]


def normalize_database_url(url: str) -> str:
    """Map the URLs people paste (`postgres://`, `postgresql://`, `sqlite://`) to their async drivers."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    return url


class ConfigError(Exception):
    """The settings cannot work; the message says what to set."""


# Engine connections beyond the sweep's one: for on-demand refreshes and the other loops. Since the refresh claim a
# sweep worker holds a connection only for its short claim and store transactions, never across the Strava call,
# so sweep workers and on-demand work take turns on the pool in milliseconds; no worker count can drain it for the
# length of a Strava call (TOKENSVC_DB_POOL_TIMEOUT_SECONDS is seconds).
SWEEP_RESERVED_CONNECTIONS = 1
# /readyz's own one-connection pool (app.py), so readiness answers however busy the other pools are.
READINESS_CONNECTIONS = 1


def sweep_workers(concurrency: int) -> int:
    """The sweep's workers for TOKENSVC_SWEEP_CONCURRENCY (service/sweeper.py): a few more than the Strava calls,
    so that the database work around each call overlaps other users' calls."""
    return concurrency + concurrency // 4 + 1


def check_connection_budget(settings: Settings) -> None:
    """Refuse an engine pool that leaves a sweep nothing beside SWEEP_RESERVED_CONNECTIONS (Postgres only).

    TOKENSVC_SWEEP_CONCURRENCY is not held against the pool: its workers queue for a connection for one short
    transaction at a time, never across a Strava call. Raises ConfigError with a sentence."""
    if settings.is_sqlite:
        return
    needed = 1 + SWEEP_RESERVED_CONNECTIONS
    if settings.db_pool_size >= needed:
        return
    raise ConfigError(
        f"TOKENSVC_DB_POOL_SIZE={settings.db_pool_size} leaves the sweep no connection beside the "
        f"{SWEEP_RESERVED_CONNECTIONS} kept for on-demand refreshes: set TOKENSVC_DB_POOL_SIZE to at least {needed}."
    )


# The built-in emulator's fixed credentials: public on purpose, useless against the real Strava. The id is numeric,
# as Strava's are, because clients such as stravalib do `int(client_id)`.
SANDBOX_CLIENT_ID = "12345"
SANDBOX_CLIENT_SECRET = "sandbox-secret"


def prepare(settings: Settings, *, sandbox: bool, host: str = "127.0.0.1", port: int = 8000) -> Settings:
    """Fill in what depends on how the service is run, and refuse settings that cannot work.

    Raises ConfigError with a sentence naming what to set.
    """
    update: dict[str, object] = {}
    public_url = (settings.public_url or f"http://{_reachable_host(host)}:{port}").rstrip("/")
    update["public_url"] = public_url
    if sandbox:
        update["strava_base_url"] = f"{public_url}/sandbox/strava"
        update["strava_client_id"] = settings.strava_client_id or SANDBOX_CLIENT_ID
        update["strava_client_secret"] = settings.strava_client_secret or SecretStr(SANDBOX_CLIENT_SECRET)
        if not settings.api_keys:
            update["api_keys"] = [SecretStr(SANDBOX_API_KEY)]
        if settings.session_secret is None:
            update["session_secret"] = SecretStr(secrets.token_urlsafe(32))
        if settings.admin_password is None:  # the dashboard's form takes the admin password only
            update["admin_password"] = SecretStr(SANDBOX_API_KEY)
    else:
        if not settings.strava_client_id or settings.strava_client_secret is None:
            raise ConfigError(
                "Set TOKENSVC_STRAVA_CLIENT_ID and TOKENSVC_STRAVA_CLIENT_SECRET (your Strava app's credentials), "
                "or run `tokensvc serve --sandbox` to try tokensvc offline against the built-in Strava emulator."
            )
        if not settings.api_keys:
            raise ConfigError(
                "Set TOKENSVC_API_KEYS (comma-separated bearer keys for the service API); without one no caller "
                "could use the service."
            )
        _refuse_short_secrets(settings)
    update["encryption_keys"] = [SecretStr(k) for k in encryption_keys(settings)]
    check_connection_budget(settings)
    if not sandbox and settings.session_secret is None:
        raise ConfigError(
            "Set TOKENSVC_SESSION_SECRET (at least 32 random characters, the same on every replica): it signs "
            "browser sessions and the OAuth state of the Connect with Strava flow."
        )
    return settings.model_copy(update=update)


MIN_API_KEY_LENGTH = 16
MIN_ADMIN_PASSWORD_LENGTH = 12


def _refuse_short_secrets(settings: Settings) -> None:
    """Outside the sandbox, API keys and the admin password long enough not to be guessed (ConfigError)."""
    for number, key in enumerate(settings.api_keys, start=1):
        if len(key.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ConfigError(
                f"TOKENSVC_API_KEYS: key number {number} is shorter than {MIN_API_KEY_LENGTH} characters; use "
                "random keys (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)."
            )
    password = settings.admin_password
    if password is not None and len(password.get_secret_value()) < MIN_ADMIN_PASSWORD_LENGTH:
        raise ConfigError(
            f"TOKENSVC_ADMIN_PASSWORD is shorter than {MIN_ADMIN_PASSWORD_LENGTH} characters; choose a longer one "
            "(or unset it: the dashboard then opens only with `Authorization: Bearer <api key>`)."
        )


def _reachable_host(host: str) -> str:
    """The listen address as a URL host: a wildcard means loopback; an IPv6 address goes in brackets."""
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def encryption_keys(settings: Settings) -> list[str]:
    """The configured keys; for SQLite with none set, a generated key kept in a 0600 file beside the database.

    Raises ConfigError for any other database without keys.
    """
    if settings.encryption_keys:
        return [k.get_secret_value() for k in settings.encryption_keys]
    if not settings.is_sqlite:
        raise ConfigError(
            "Set TOKENSVC_ENCRYPTION_KEYS (comma-separated, newest first; make one with `tokensvc gen-key`): "
            "tokens are stored encrypted, and only the SQLite default may generate its own key."
        )
    path = sqlite_key_path(settings.database_url)
    if path is None:  # an in-memory database dies with the process, and so may its key
        return [generate_key()]
    try:
        key, created = load_or_create_key_file(path)
    except KeyFileError as exc:
        raise ConfigError(f"{exc} (or set TOKENSVC_ENCRYPTION_KEYS)") from exc
    log = structlog.get_logger(__name__)
    if created:
        log.warning("encryption.key_generated", path=str(path), note="back this file up with the database")
    else:
        log.info("encryption.key_loaded", path=str(path))
    return [key]


def sqlite_key_path(database_url: str) -> Path | None:
    """`./tokensvc.db` → `./tokensvc.db.key`; None for an in-memory database."""
    return _sqlite_sibling(database_url, ".key")


def sandbox_state_path(settings: Settings) -> Path | None:
    """Where `serve --sandbox` keeps the emulator's world: `./tokensvc.db` → `./tokensvc.db.sandbox.json`.

    None (the sandbox then lives in memory only) for an in-memory SQLite database or any other database.
    """
    return _sqlite_sibling(settings.database_url, ".sandbox.json") if settings.is_sqlite else None


def _sqlite_sibling(database_url: str, suffix: str) -> Path | None:
    url = make_url(database_url)
    location = url.database
    if location and location.startswith("file:") and url.query.get("uri") in ("true", "1"):
        if "mode=memory" in location:
            return None
        location = urlsplit(location).path
    if not location or location == ":memory:" or location.startswith("file::memory:"):
        return None
    return Path(location).with_name(Path(location).name + suffix)
