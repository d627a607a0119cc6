"""Issue 12 item 1: with every pooled connection taken, a request waits at most TOKENSVC_DB_POOL_TIMEOUT_SECONDS and
is answered 503 `database_unavailable` with Retry-After, never 500, never an unbounded wait (Postgres: the pools)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from tests.api.test_tokens_api import assert_problem
from tests.conftest import API_KEY, FakeClock, asyncpg_dsn, make_settings, seed_athlete, wait_for_lock_waiter
from tokensvc.app import create_app
from tokensvc.sandbox.state import SandboxState

pytestmark = pytest.mark.postgres

READER_APPLICATION = "tokensvc-reader"  # the reader pool's connections, as pg_stat_activity names them
TIMEOUT = 2.0  # short, and long enough for the start-up's background jobs sharing the one connection


@pytest.fixture
async def app(pg_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport) -> AsyncIterator[FastAPI]:
    """One connection in each pool, no token cache (every read reaches the reader pool), a short pool wait."""
    settings = make_settings(
        pg_url, db_pool_size=1, db_reader_pool_size=1, db_pool_timeout_seconds=TIMEOUT, token_cache=False
    )
    app = create_app(settings, clock=clock, strava_transport=strava_transport)
    async with LifespanManager(app):
        yield app


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://tokensvc.test", headers=headers) as client:
        yield client


async def imported_user(http: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock) -> str:
    seeded = seed_athlete(sandbox, clock, expires_in=6 * 3600)
    body = {
        "access_token": seeded.access_token,
        "refresh_token": seeded.refresh_token,
        "expires_at": seeded.expires_at,
        "athlete_id": seeded.athlete_id,
    }
    assert (await http.put(f"/v1/users/{seeded.user_id}/tokens", json=body)).status_code == 200
    return seeded.user_id


async def test_a_full_engine_pool_is_503_with_retry_after(
    app: FastAPI, http: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
) -> None:
    user_id = await imported_user(http, sandbox, clock)
    async with app.state.engine.connect():  # the engine's only connection, held
        response = await http.post(f"/v1/users/{user_id}/refresh", params={"force": "true"})
    assert_problem(response, 503, "database_unavailable")
    assert int(response.headers["retry-after"]) > 0
    # the connection is back: the same call succeeds
    assert (await http.post(f"/v1/users/{user_id}/refresh", params={"force": "true"})).status_code == 200


@pytest.mark.parametrize("path", ["/v1/users/{user_id}/access-token", "/v1/users/{user_id}/token-status"])
async def test_a_full_reader_pool_is_503_with_retry_after(
    pg_url: str, http: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, path: str
) -> None:
    """The hot path's only connection is held by a first read stuck behind a table lock (seen waiting in
    pg_stat_activity under the reader's application_name): the next read waits the pool timeout and is a 503;
    once the lock goes, the first read answers and so does a new one."""
    user_id = await imported_user(http, sandbox, clock)
    url = path.format(user_id=user_id)
    locker = await asyncpg.connect(asyncpg_dsn(pg_url))
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE user_tokens IN ACCESS EXCLUSIVE MODE")
        first = asyncio.create_task(http.get(url))
        await wait_for_lock_waiter(pg_url, application_name=READER_APPLICATION)
        response = await asyncio.wait_for(http.get(url), TIMEOUT * 5)  # a pool wait, not the lock's
        await lock.rollback()
        assert (await asyncio.wait_for(first, TIMEOUT * 5)).status_code == 200
    finally:
        await locker.close()
    assert_problem(response, 503, "database_unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert (await http.get(url)).status_code == 200
