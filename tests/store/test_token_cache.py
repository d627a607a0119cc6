"""The in-process cache of valid tokens and its invalidation across replicas through Postgres LISTEN/NOTIFY.

Two `open_resources` on one database stand for two replicas: each has its own cache and its own listener, and they
share nothing but Postgres. Waits are bounded condition waits on what the cache reports, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock, asyncpg_dsn, import_body, make_settings, seed_athlete, seed_user
from tests.logcapture import captured_logs
from tokensvc.app import Resources, open_resources
from tokensvc.errors import ReauthRequired, TokensMissing
from tokensvc.models import user_tokens
from tokensvc.sandbox import SandboxState
from tokensvc.store import tokens as store
from tokensvc.store.reader import RowReader
from tokensvc.store.token_cache import CachedReader
from tokensvc.store.tokens import TokenRow

DEADLINE = 10.0


class _CountingReader:
    """The database reader under the cache, counting the reads that reached it."""

    def __init__(self, inner: RowReader, cache: ObservedCache) -> None:
        self._inner = inner
        self._cache = cache

    async def get(self, user_id: str) -> TokenRow | None:
        self._cache.reads += 1
        return await self._inner.get(user_id)

    def forget(self, user_id: str) -> None:
        self._inner.forget(user_id)

    def watch(self, user_id: str) -> asyncio.Event | None:
        return self._inner.watch(user_id)

    def unwatch(self, user_id: str, event: asyncio.Event) -> None:
        self._inner.unwatch(user_id, event)

    async def aclose(self) -> None:
        await self._inner.aclose()


class ObservedCache(CachedReader):
    """The production cache seen from outside, for tests: how many reads reached the database, which users it was
    told to forget, and its listener's ups and downs, as events to wait on instead of sleeping."""

    def __init__(self, inner: RowReader, **kwargs: Any) -> None:
        self.reads = 0
        self.forgotten: list[str] = []
        self.changed = asyncio.Event()
        self.listening = asyncio.Event()
        super().__init__(_CountingReader(inner, self), **kwargs)

    def forget(self, user_id: str) -> None:
        super().forget(user_id)
        self.forgotten.append(user_id)
        self.changed.set()

    def _reset(self, *, live: bool) -> None:
        super()._reset(live=live)
        if live:
            self.listening.set()
        else:
            self.listening.clear()
        self.changed.set()


def cache_of(res: Resources) -> ObservedCache:
    assert isinstance(res.rows, ObservedCache), "on Postgres the service reads through the cache"
    return res.rows


async def until(cache: ObservedCache, condition: Callable[[], bool]) -> None:
    """Wait (bounded) until `condition` holds, re-checking on every notification or reset the cache sees."""
    async with asyncio.timeout(DEADLINE):
        while not condition():
            cache.changed.clear()
            if not condition():
                await cache.changed.wait()


async def settle(*replicas: Resources, clear: bool = True) -> None:
    """Let every notification already sent reach these replicas (they arrive in commit order, so once a marker
    sent now has arrived, so has everything before it); then, with `clear`, start their lists of forgotten users
    afresh."""
    marker = f"settle-{uuid.uuid4().hex}"
    async with replicas[0].engine.begin() as conn:
        await conn.execute(sa.text("SELECT pg_notify('tokensvc_token_changes', :marker)"), {"marker": marker})
    for res in replicas:
        cache = cache_of(res)
        await until(cache, lambda cache=cache: marker in cache.forgotten)  # type: ignore[misc]
        if clear:
            cache.forgotten.clear()


@pytest.fixture
def observed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas opened in this test read through an ObservedCache."""
    monkeypatch.setattr("tokensvc.app.CachedReader", ObservedCache)


@pytest.fixture
async def replicas(
    observed: None, pg_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
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


async def from_memory(res: Resources, user_id: str) -> bool:
    """Serve the user's token once; True when no read reached the database for it."""
    cache = cache_of(res)
    reads = cache.reads
    await served(res, user_id)
    return cache.reads == reads


@pytest.mark.postgres
class TestAcrossReplicas:
    async def test_a_valid_token_is_served_from_memory_until_another_replica_replaces_it(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """B reads the row once, then serves it from memory; A's import reaches B as a notification, and B reads
        the new token."""
        a, b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        assert not await from_memory(b, user.user_id)  # a miss: read, then cached
        assert await from_memory(b, user.user_id)
        assert await served(b, user.user_id) == user.access_token

        newer = seed_athlete(sandbox, clock, expires_in=7 * 3600)  # later than the stored pair: not stale
        await a.service.import_tokens(user.user_id, import_body(newer))  # replica A writes
        await until(cache_of(b), lambda: user.user_id in cache_of(b).forgotten)
        assert await served(b, user.user_id) == newer.access_token

    async def test_a_waiter_on_a_refresh_claim_is_woken_by_another_replicas_commit(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """What a caller waiting on a claim held elsewhere wakes on (instead of its next poll): B's watch on a user
        is set by A's commit for that user, heard through NOTIFY, and not by A's commits for anyone else."""
        a, b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        changed = b.rows.watch(user.user_id)
        assert changed is not None
        await seed_user(a, sandbox, clock, expires_in=6 * 3600)  # another user's row
        await settle(a, b)
        assert not changed.is_set()
        newer = seed_athlete(sandbox, clock, expires_in=7 * 3600)
        await a.service.import_tokens(user.user_id, import_body(newer))
        await asyncio.wait_for(changed.wait(), DEADLINE)
        b.rows.unwatch(user.user_id, changed)

    async def test_a_deauthorization_written_anywhere_stops_the_token_at_once(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A flag written by hand-held SQL on A reaches B's cache: B refuses the token."""
        a, b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        await served(b, user.user_id)
        assert await from_memory(b, user.user_id)
        async with a.engine.begin() as conn:
            row = await store.lock_for_refresh(conn, user.user_id)
            assert row is not None
            await store.mark_needs_reauth(
                conn, user.user_id, reason="deauthorized", now=datetime.fromtimestamp(clock(), UTC), discard_tokens=True
            )
        await until(cache_of(b), lambda: user.user_id in cache_of(b).forgotten)
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
            assert await from_memory(b, user.user_id)
        async with a.engine.begin() as conn:
            await conn.execute(sa.update(user_tokens).where(user_tokens.c.user_id == kept.user_id).values(sweep_at=1))
        async with a.engine.begin() as conn:
            await conn.execute(
                sa.update(user_tokens)
                .where(user_tokens.c.user_id == changed.user_id)
                .values(version=user_tokens.c.version + 1)
            )
        await settle(b, clear=False)
        assert cache_of(b).forgotten.count(changed.user_id) == 1
        assert kept.user_id not in cache_of(b).forgotten
        assert await from_memory(b, kept.user_id)
        assert not await from_memory(b, changed.user_id)


async def without_notifications(res: Resources) -> None:
    """Switch off the triggers that NOTIFY the replicas (this test's own database): only a replica's own
    bookkeeping can keep its cache true now."""
    async with res.engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE user_tokens DISABLE TRIGGER USER"))


@pytest.mark.postgres
class TestOwnCommits:
    async def test_delete_then_access_token_on_the_same_replica_is_missing_even_without_a_notification(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """With the NOTIFY triggers off, A still forgets the user it deleted itself (409 tokens_missing at once),
        while B, told nothing, would hand out the deleted token from memory: what the notification is for."""
        a, b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        for res in (a, b):
            await served(res, user.user_id)
            assert await from_memory(res, user.user_id)
        await without_notifications(a)
        await a.service.delete(user.user_id)
        with pytest.raises(TokensMissing):
            await served(a, user.user_id)
        assert await served(b, user.user_id) == user.access_token  # stale: nobody told B

    async def test_import_and_refresh_are_served_at_once_by_the_replica_that_wrote_them(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Without notifications, A serves the pair it imported, then the one its forced refresh stored, at once."""
        a, _b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await served(a, user.user_id)
        await without_notifications(a)
        newer = seed_athlete(sandbox, clock, expires_in=7 * 3600)  # later than the stored pair: not stale
        await a.service.import_tokens(user.user_id, import_body(newer))
        assert await served(a, user.user_id) == newer.access_token
        assert await from_memory(a, user.user_id)
        await a.service.refresh(user.user_id, force=True)
        refreshed = sandbox.snapshot(newer.athlete_id)
        assert await served(a, user.user_id) == refreshed["access_token"]


@pytest.mark.postgres
class TestWhatIsCached:
    async def test_a_token_due_for_refresh_is_never_served_from_memory(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Once inside the buffer, every read goes to the database (and nothing is kept)."""
        a, b = replicas
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        await served(a, user.user_id)
        assert await from_memory(a, user.user_id)
        clock.advance(6 * 3600 - 1700)  # now inside the 30-minute buffer: expiring_soon
        for _ in range(2):
            reads = cache_of(a).reads
            await a.service.status(user.user_id)
            assert cache_of(a).reads == reads + 1
        assert cache_of(a).size == 0

    async def test_losing_the_listener_empties_and_bypasses_the_cache_until_it_is_back(
        self, replicas: tuple[Resources, Resources], sandbox: SandboxState, clock: FakeClock, pg_url: str
    ) -> None:
        """Both listeners killed: the caches are emptied and not used; once reconnected, they fill again."""
        a, b = replicas
        cache = cache_of(a)
        user = await seed_user(a, sandbox, clock, expires_in=6 * 3600)
        await settle(a, b)
        await served(a, user.user_id)
        assert await from_memory(a, user.user_id)
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
        assert cache.size == 0
        await asyncio.wait_for(cache.listening.wait(), DEADLINE)  # reconnected
        assert await served(a, user.user_id) == user.access_token
        assert await from_memory(a, user.user_id)


def a_row(user_id: str, expires_at: int) -> TokenRow:
    return TokenRow(
        user_id=user_id,
        access_token_enc="x",
        refresh_token_enc="y",
        key_id="k",
        expires_at=expires_at,
        athlete_id=1,
        scopes="read",
        reauth_reason=None,
        last_refreshed_at=None,
        version=1,
        failure_count=0,
        sweep_at=0,
    )


class _Rows:
    """A database of fixed rows; a read may run `during` before it returns (a change racing the read)."""

    def __init__(self, *user_ids: str) -> None:
        self.rows = {u: a_row(u, 1_900_000_000) for u in user_ids}
        self.during: Callable[[str], None] = lambda _user_id: None

    async def get(self, user_id: str) -> TokenRow | None:
        self.during(user_id)
        return self.rows.get(user_id)

    def forget(self, user_id: str) -> None:
        return None

    def watch(self, user_id: str) -> asyncio.Event | None:
        return None

    def unwatch(self, user_id: str, event: asyncio.Event) -> None:
        return None

    async def aclose(self) -> None:
        return None


def live_cache(inner: RowReader, **kwargs: Any) -> ObservedCache:
    cache = ObservedCache(inner, dsn="postgresql://unused", keep=lambda _row: True, **kwargs)
    cache._reset(live=True)  # as if the listener were connected
    return cache


class TestWatchers:
    def test_a_watch_is_set_by_its_users_change_and_by_a_reset_and_ends_with_unwatch(self) -> None:
        """A change heard for the user (a notification or an own commit both come as `forget`) sets the watch,
        another user's does not; a listener reset sets every watch (a change may have gone unheard)."""
        cache = live_cache(_Rows("u1", "u2"))
        changed = cache.watch("u1")
        assert changed is not None
        cache.forget("u2")
        assert not changed.is_set()
        cache.forget("u1")
        assert changed.is_set()
        changed.clear()
        cache._reset(live=False)
        assert changed.is_set()
        cache.unwatch("u1", changed)
        changed.clear()
        cache.forget("u1")
        assert not changed.is_set()
        assert cache._watchers == {}


class TestBounds:
    async def test_a_read_that_raced_a_change_is_not_cached(self) -> None:
        """The row changed while it was being read: what the read saw is returned but not kept."""
        rows = _Rows("u")
        cache = live_cache(rows)
        rows.during = cache.forget
        assert await cache.get("u") == rows.rows["u"]
        assert cache.size == 0

    async def test_a_full_cache_evicts_the_oldest_entry_first(self) -> None:
        """max_entries=3 and a fourth user: the first one stored leaves; the others are still served from memory."""
        rows = _Rows("u1", "u2", "u3", "u4")
        cache = live_cache(rows, max_entries=3)
        for user_id in ("u1", "u2", "u3", "u4"):
            await cache.get(user_id)
        assert cache.size == 3
        reads = cache.reads
        for user_id in ("u2", "u3", "u4"):
            await cache.get(user_id)
        assert cache.reads == reads
        await cache.get("u1")
        assert cache.reads == reads + 1

    async def test_stale_entries_are_reaped_even_if_nobody_asks_for_them_again(self) -> None:
        """Entries older than max_age go the next time anything is stored, not only when their user is asked."""
        now = [0.0]
        rows = _Rows("old-1", "old-2", "young")
        cache = live_cache(rows, max_age_seconds=30, monotonic=lambda: now[0])
        await cache.get("old-1")
        await cache.get("old-2")
        now[0] = 31.0
        await cache.get("young")
        assert cache.size == 1
        reads = cache.reads
        await cache.get("young")
        assert cache.reads == reads

    async def test_eviction_costs_the_same_at_the_bound_as_when_empty(self) -> None:
        """Storing into a cache full at 100,000 entries takes O(1): 20,000 stores at the bound cost less than five
        times 20,000 stores into a cache far from it (a scan of the dict per store was 70 times slower)."""
        user_ids = [f"u{i}" for i in range(140_000)]
        rows = _Rows(*user_ids)
        cache = live_cache(rows, max_entries=100_000)

        async def store(batch: list[str]) -> float:
            started = time.perf_counter()
            for user_id in batch:
                await cache.get(user_id)
            return time.perf_counter() - started

        empty = await store(user_ids[:20_000])
        await store(user_ids[20_000:120_000])
        assert cache.size == 100_000
        full = await store(user_ids[120_000:])
        assert cache.size == 100_000
        assert full < 5 * empty, (full, empty)


class _FailingListener(CachedReader):
    """A cache whose every connection attempt fails as `failures` says (an exception class each), in order; it
    notes when each attempt was made."""

    def __init__(self, failures: list[type[Exception]]) -> None:
        super().__init__(_Rows(), dsn="postgresql://unused", keep=lambda _row: True)
        self.failures = failures
        self.attempts: list[float] = []
        self.all_made = asyncio.Event()

    async def _listen_once(self) -> None:
        self.attempts.append(time.monotonic())
        if len(self.attempts) == len(self.failures):
            self.all_made.set()
        raise self.failures[min(len(self.attempts), len(self.failures)) - 1]("connection attempt failed")


class TestListenerBackoff:
    async def test_every_failure_in_a_row_doubles_the_wait_expected_or_not(self) -> None:
        """A lost database (OSError) and an unexpected error both double the wait before the next connection,
        0.1 s, 0.2, 0.4, 0.8: a listener that keeps failing never spins. The expected failure is logged
        `token_cache.listener_down`, the unexpected one `background.job_failed` with its traceback."""
        cache = _FailingListener([OSError, RuntimeError, RuntimeError, OSError, OSError])
        with captured_logs() as logs:
            cache.start()
            try:
                async with asyncio.timeout(10):
                    await cache.all_made.wait()
            finally:
                await cache.aclose()
        gaps = [later - earlier for earlier, later in itertools.pairwise(cache.attempts)]
        assert len(gaps) >= 4
        for gap, wait in zip(gaps, [0.1, 0.2, 0.4, 0.8], strict=False):
            assert gap >= wait * 0.9, (gaps, wait)
        assert [line["retry_in_seconds"] for line in logs.events("token_cache.listener_down")][:2] == [0.1, 0.8]
        unexpected = logs.events("background.job_failed")
        assert [line["error"] for line in unexpected] == ["RuntimeError", "RuntimeError"]
        assert all("Traceback" in line["exception"] for line in unexpected)
