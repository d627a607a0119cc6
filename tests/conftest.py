"""Shared fixtures: real databases (SQLite file and Postgres) built by the migrations, a fake clock, and the
Strava sandbox reached over HTTP (in-process ASGI here; real processes in tests/e2e).

Postgres: `TOKENSVC_TEST_POSTGRES_URL` (default the local server) is the admin URL; each test gets its own database
cloned from a migrated template. Unreachable Postgres skips its tests, unless `TOKENSVC_REQUIRE_POSTGRES=1`
(CI), where it fails them.

Which databases a test runs on: a test that uses `database_url` (directly or through `settings`, `resources`,
`client`) runs on SQLite only, as `test_x[sqlite]`. A test whose outcome can depend on the dialect opts in to both
with `@pytest.mark.dialects("sqlite", "postgres")` (on the test, its class or the module's `pytestmark`), and is
collected twice, `[sqlite]` and `[postgres]`; `@pytest.mark.dialects("postgres")` runs it on Postgres alone. Opt in
when the test is about what the database does: claims, locks, concurrent writers or replicas, migrations,
constraints and upserts (one athlete one user, imports that never go backwards, single-use nonces), ordering and
cursors, aggregates, anything in store/ that branches on the dialect (`conn.dialect.name`, the asyncpg row reader,
the token cache), and Postgres-only features (LISTEN/NOTIFY, SKIP LOCKED, advisory locks, pgbouncer). Tests that use
`pg_url` or `empty_pg_url` directly are Postgres tests anyway; mark them `postgres`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy.engine import make_url

import tokensvc
from tokensvc.app import Resources, create_app, open_resources
from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Settings
from tokensvc.crypto import generate_key
from tokensvc.db import make_engine, migrate
from tokensvc.sandbox import SandboxState, create_sandbox_app
from tokensvc.schemas import TokenImport

PG_ADMIN_URL = os.environ.get("TOKENSVC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("TOKENSVC_REQUIRE_POSTGRES") == "1"
API_KEY = "test-api-key"
STRAVA_TEST_BASE = "http://strava.test"
APP_ORIGIN = "http://app.test"  # the application's frontend, another origin than tokensvc's
TOKENSVC_PACKAGE = Path(tokensvc.__file__).parent
T0 = 1_800_000_000.0  # a fixed "now" (2027-01-15) so expiry arithmetic reads plainly


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI (TOKENSVC_REQUIRE_POSTGRES=1) a skipped Postgres test is a failure, not a quiet pass."""
    report = yield
    if REQUIRE_POSTGRES and report.skipped and item.get_closest_marker("postgres") is not None:
        report.outcome = "failed"
        report.longrepr = f"Postgres test skipped in CI: {report.longrepr}"
    return report


class FakeClock:
    """Injected time: tests move it instead of sleeping."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ciphertext_key_id(ciphertext: str) -> str | None:
    """The key id a stored ciphertext names (`v1.<key id>.<data>`, see crypto.py), or None for any other form."""
    parts = ciphertext.split(".", 2)
    return parts[1] if len(parts) == 3 and parts[0] == "v1" else None


def run_isolated(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on a private loop, leaving the test's loop policy untouched (for session fixtures)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_pg_url(admin_url: str, database: str) -> str:
    return (
        make_url(admin_url)
        .set(drivername="postgresql+asyncpg", database=database)
        .render_as_string(hide_password=False)
    )


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def wait_for_lock_waiter(database_url: str, deadline: float = 10.0, *, application_name: str = "%") -> None:
    """A bounded condition wait (Postgres offers no event for it): until a backend of this database (whose
    application_name is LIKE `application_name`) waits on a lock. Used to order a seeded race without guessing at
    sleeps."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        " AND application_name LIKE $1"
    )
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with asyncio.timeout(deadline):
            while True:
                if await conn.fetchval(query, application_name):
                    return
                await asyncio.sleep(0.01)
    finally:
        await conn.close()


@asynccontextmanager
async def tasks_finished(deadline: float = 10.0) -> AsyncIterator[None]:
    """On the way out of the block, wait (bounded) until every task of tokensvc's code started inside it has
    finished: the background refresh an access-token call leaves running, for one. Loops that ran before the block
    are not waited for, nor asyncio's own helper tasks (a loop's timed wake)."""
    before = asyncio.all_tasks()
    yield
    async with asyncio.timeout(deadline):
        while started := {task for task in asyncio.all_tasks() - before if _runs_tokensvc_code(task)}:
            await asyncio.wait(started)


def _runs_tokensvc_code(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and Path(code.co_filename).is_relative_to(TOKENSVC_PACKAGE)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database, cloned per test."""
    name = f"tokensvc_tpl_{os.getpid()}"
    try:
        run_isolated(_admin(f"DROP DATABASE IF EXISTS {name}"))
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"Postgres not reachable at {PG_ADMIN_URL}: {exc}"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    run_isolated(_admin(f"CREATE DATABASE {name}"))

    async def build() -> None:
        engine = make_engine(sqlalchemy_pg_url(PG_ADMIN_URL, name))
        await migrate(engine)
        await engine.dispose()

    run_isolated(build())
    yield name
    run_isolated(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@contextmanager
def temporary_database(prefix: str, *, template: str | None = None) -> Iterator[str]:
    """A Postgres database for one test (a copy of `template`, or empty), dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    run_isolated(_admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")))
    try:
        yield sqlalchemy_pg_url(PG_ADMIN_URL, name)
    finally:
        run_isolated(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated Postgres database for one test."""
    with temporary_database("tokensvc_t", template=pg_template) as url:
        yield url


@pytest.fixture
def empty_pg_url(pg_template: str) -> Iterator[str]:
    """A Postgres database with no schema (`pg_template` only brings the reachability check)."""
    with temporary_database("tokensvc_e") as url:
        yield url


@pytest.fixture
def no_tokensvc_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TOKENSVC_* from the caller's shell and no `.env` to pick up: for tests that read settings in-process."""
    for name in list(os.environ):
        if name.upper().startswith("TOKENSVC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh, migrated SQLite file for one test."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'tokensvc.db'}"

    async def build() -> None:
        engine = make_engine(url)
        await migrate(engine)
        await engine.dispose()

    run_isolated(build())
    return url


DIALECTS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`database_url` is SQLite's unless the test is marked `dialects(...)` (see the module's docstring)."""
    if "database_url" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("dialects")
    names = marker.args if marker is not None else ("sqlite",)
    if not names or any(name not in DIALECTS for name in names):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: dialects() takes some of {DIALECTS}, got {names}")
    params = [pytest.param(name, marks=pytest.mark.postgres) if name == "postgres" else name for name in names]
    metafunc.parametrize("database_url", params, indirect=True)


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database of the dialect `pytest_generate_tests` chose for this test (SQLite by default)."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox_app(clock: FakeClock) -> FastAPI:
    return create_sandbox_app(client_id=SANDBOX_CLIENT_ID, client_secret=SANDBOX_CLIENT_SECRET, clock=clock)


@pytest.fixture
def sandbox(sandbox_app: FastAPI) -> SandboxState:
    state: SandboxState = sandbox_app.state.sandbox
    return state


@pytest.fixture
def strava_transport(sandbox_app: FastAPI) -> httpx.AsyncBaseTransport:
    return httpx.ASGITransport(app=sandbox_app)


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "strava_base_url": STRAVA_TEST_BASE,
        "strava_client_id": SANDBOX_CLIENT_ID,
        "strava_client_secret": SecretStr(SANDBOX_CLIENT_SECRET),
        "api_keys": [SecretStr(API_KEY)],
        "encryption_keys": [SecretStr(generate_key())],
        "public_url": "http://tokensvc.test",
        "session_secret": SecretStr("test-session-secret-" + "x" * 32),
        "redirect_allowlist": [APP_ORIGIN + "/dashboard"],
        "cors_origins": [APP_ORIGIN],
        "sweep_interval_seconds": 0,  # tests sweep when they mean to (sweep_once), not on a timer
    }
    return Settings(_env_file=None, **(values | overrides))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def resources(
    settings: Settings, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
) -> AsyncIterator[Resources]:
    async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
        yield res


@pytest.fixture
async def client(
    settings: Settings, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
) -> AsyncIterator[httpx.AsyncClient]:
    """The service API over ASGI, authenticated; the app's own lifespan runs."""
    app = create_app(settings, clock=clock, strava_transport=strava_transport)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://tokensvc.test", headers={"Authorization": f"Bearer {API_KEY}"}
        ) as http:
            http.app = app  # type: ignore[attr-defined]
            yield http


@dataclass(frozen=True)
class Seeded:
    user_id: str
    athlete_id: int
    access_token: str
    refresh_token: str
    expires_at: int

    def with_pair(self, pair: Mapping[str, Any]) -> Seeded:
        """The same user and athlete with the pair a sandbox snapshot or rotation returned."""
        return Seeded(self.user_id, self.athlete_id, pair["access_token"], pair["refresh_token"], pair["expires_at"])


def seed_athlete(sandbox: SandboxState, clock: FakeClock, *, expires_in: int) -> Seeded:
    """A connected athlete in the sandbox whose current access token has `expires_in` seconds left."""
    athlete = sandbox.create_athlete(expires_in=expires_in)
    return Seeded(
        user_id=f"user-{athlete['athlete_id']}",
        athlete_id=athlete["athlete_id"],
        access_token=athlete["access_token"],
        refresh_token=athlete["refresh_token"],
        expires_at=athlete["expires_at"],
    )


def import_body(seeded: Seeded) -> TokenImport:
    return TokenImport(
        access_token=seeded.access_token,
        refresh_token=seeded.refresh_token,
        expires_at=seeded.expires_at,
        athlete_id=seeded.athlete_id,
        scopes=["read", "activity:read_all"],
    )


async def seed_user(res: Resources, sandbox: SandboxState, clock: FakeClock, *, expires_in: int) -> Seeded:
    """An athlete in the sandbox whose tokens tokensvc stores, `expires_in` seconds from expiry."""
    seeded = seed_athlete(sandbox, clock, expires_in=expires_in)
    await res.service.import_tokens(seeded.user_id, import_body(seeded))
    return seeded
