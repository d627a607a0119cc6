"""The in-process cache of valid tokens and its invalidation across replicas through Postgres LISTEN/NOTIFY.

Two `open_resources` on one database stand for two replicas: each has its own cache and its own listener, and they
share nothing but Postgres. Waits are bounded condition waits on what the cache reports, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock, asyncpg_dsn, import_body, make_settings, seed_athlete, seed_user
from tokensvc.app import Resources, open_resources
from tokensvc.errors import ReauthRequired
from tokensvc.models import user_tokens
from tokensvc.sandbox import SandboxState
from tokensvc.store import tokens as store
from tokensvc.store.reader import RowReader
from tokensvc.store.token_cache import CachedReader
from tokensvc.store.tokens import TokenRow

pytestmark = pytest.mark.postgres
DEADLINE = 10.0


def cache_of(res: Resources) -> CachedReader:
    assert isinstance(res.rows, CachedReader), "on Postgres the service reads through the cache"
    return res.rows


async def until(cache: CachedReader, condition: Callable[[], bool]) -> None:
    """Wait (bounded) until `condition` holds, re-checking on every notification or reset the cache sees."""
    async with asyncio.timeout(DEADLINE):
        while not condition():
            cache.changed.clear()
            if not condition():
                await cache.changed.wait()


async def settle(*replicas: Resources) -> None:
    """Let every notification already sent reach these replicas: they arrive in commit order, so once a marker
    sent now has arrived, so has everything before it."""
    marker = f"settle-{uuid.uuid4().hex}"
    async with replicas[0].engine.begin() as conn:
        await conn.execute(sa.text("SELECT pg_notify('tokensvc_token_changes', :marker)"), {"marker": marker})
    for res in replicas:
        cache = cache_of(res)
        await until(cache, lambda cache=cache: cache.last_notified == marker)  # type: ignore[misc]


@pytest.fixture
async def replicas(
    pg_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
) -> AsyncIterator[tuple[Resources, Resources]]:
    settings = make_settings(pg_url)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_resources(settings, clock=clock, strava_transport=strava_transport))
        b = await stack.enter_async_context(open_resources(settings, clock=clock, strava_transport=strava_transport))
        for res in (a, b):
            await asyncio.wait_for(cache_of(res).listening.wait(), DEADLINE)
        yield a, b


async def served(res: Resources, user_id: str) -> str:
    return (await res.service.access_token(user_id, min_ttl=60)).access_token


class TestAcrossReplicas:
    async def test_a_valid_token_is_served_from_memory_until_another_replica_replaces_it(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        a, b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        assert await served(b, user.user_id) == user.access_token  # a miss: read, then cached
        hits = cache_of(b).hits
        assert await served(b, user.user_id) == user.access_token
        assert cache_of(b).hits == hits + 1

        newer = seed_athlete(sandbox, clock, expires_in=5 * 3600)
        await a.service.import_tokens(user.user_id, import_body(newer))  # replica A writes
        await until(cache_of(b), lambda: not cache_of(b).holds(user.user_id))
        assert await served(b, user.user_id) == newer.access_token

    async def test_a_deauthorization_written_anywhere_stops_the_token_at_once(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        a, b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        await served(b, user.user_id)
        assert cache_of(b).holds(user.user_id)
        async with a.engine.begin() as conn:
            row = await store.lock_for_refresh(conn, user.user_id)
            assert row is not None
            await store.mark_needs_reauth(
                conn, user.user_id, reason="deauthorized", now=datetime.fromtimestamp(clock(), UTC), discard_tokens=True
            )
        await until(cache_of(b), lambda: not cache_of(b).holds(user.user_id))
        with pytest.raises(ReauthRequired):
            await served(b, user.user_id)

    async def test_an_operators_sql_counts_but_bookkeeping_does_not(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The trigger, not the application, notifies: a hand-written UPDATE of the tokens drops the entry; an
        update of the sweep schedule alone does not (notifications arrive in commit order, so once a later one
        has arrived, an earlier one would have too)."""
        a, b = replicas
        kept = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        changed = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        for user in (kept, changed):
            await served(b, user.user_id)
            assert cache_of(b).holds(user.user_id)
        async with a.engine.begin() as conn:
            await conn.execute(sa.update(user_tokens).where(user_tokens.c.user_id == kept.user_id).values(sweep_at=1))
        async with a.engine.begin() as conn:
            await conn.execute(
                sa.update(user_tokens)
                .where(user_tokens.c.user_id == changed.user_id)
                .values(version=user_tokens.c.version + 1)
            )
        await settle(b)
        assert not cache_of(b).holds(changed.user_id)
        assert cache_of(b).holds(kept.user_id)


class TestWhatIsCached:
    async def test_a_token_due_for_refresh_is_never_served_from_memory(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        a, b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        await served(a, user.user_id)
        assert cache_of(a).holds(user.user_id)
        clock.advance(6 * 3600 - 1700)  # now inside the 30-minute buffer: expiring_soon
        misses = cache_of(a).misses
        await a.service.status(user.user_id)
        assert cache_of(a).misses == misses + 1
        assert not cache_of(a).holds(user.user_id)

    async def test_losing_the_listener_empties_and_bypasses_the_cache_until_it_is_back(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock, pg_url: str
    ) -> None:
        a, b = replicas
        cache = cache_of(a)
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        await served(a, user.user_id)
        assert cache.holds(user.user_id)
        conn = await asyncpg.connect(asyncpg_dsn(pg_url))
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'tokensvc-token-cache'"
            )
        finally:
            await conn.close()
        assert killed == 2  # both replicas' listeners
        await until(cache, lambda: not cache.live)
        assert not cache.holds(user.user_id)
        await asyncio.wait_for(cache.listening.wait(), DEADLINE)  # reconnected
        assert await served(a, user.user_id) == user.access_token


class _RacingReader:
    """A database read during which the row changes (the notification arrives before the read returns)."""

    def __init__(self, row: TokenRow) -> None:
        self.row = row
        self.cache: CachedReader | None = None

    async def get(self, user_id: str) -> TokenRow | None:
        assert self.cache is not None
        self.cache.forget(user_id)
        return self.row

    async def aclose(self) -> None:
        return None


async def test_a_read_that_raced_a_change_is_not_cached(sandbox: SandboxState, clock: FakeClock) -> None:
    row = TokenRow(
        user_id="u",
        access_token_enc="x",
        refresh_token_enc="y",
        key_id="k",
        expires_at=int(clock()) + 6 * 3600,
        athlete_id=1,
        scopes="read",
        reauth_reason=None,
        last_refreshed_at=None,
        version=1,
        failure_count=0,
        sweep_at=0,
    )
    inner = _RacingReader(row)
    reader: RowReader = inner
    cache = CachedReader(reader, dsn="postgresql://unused", keep=lambda _row: True)
    inner.cache = cache
    cache._reset(live=True)  # as if the listener were connected
    assert await cache.get("u") == row
    assert not cache.holds("u")
