"""Audit retention and state-nonce cleanup in bounded batches, one replica at a time, with the FakeClock, on SQLite and
Postgres."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock, asyncpg_dsn
from tokensvc.app import Resources
from tokensvc.db import make_engine
from tokensvc.models import notifications, oauth_state_uses, refresh_counts, token_events
from tokensvc.service.housekeeping import Housekeeping
from tokensvc.service.journal import Journal
from tokensvc.store import journal, oauth_states, outbox, webhook_events
from tokensvc.store.housekeeping import HOUSEKEEPING_LOCK_KEY

pytestmark = pytest.mark.dialects("sqlite", "postgres")

DAY = 86_400


async def event_users(res: Resources) -> list[str]:
    async with res.engine.connect() as conn:
        return list((await conn.execute(sa.select(token_events.c.user_id).order_by(token_events.c.id))).scalars())


async def note(res: Resources, user_id: str) -> None:
    async with res.engine.begin() as conn:
        await res.service.journal.note(conn, user_id, kind="imported")


class TestRetention:
    async def test_only_events_older_than_the_retention_are_purged(
        self, resources: Resources, clock: FakeClock
    ) -> None:
        """With 30 days' retention: a 31-day-old row goes, a 29-day-old row and today's stay."""
        await note(resources, "old")
        clock.advance(2 * DAY)
        await note(resources, "middle")
        clock.advance(29 * DAY)
        await note(resources, "new")
        housekeeping = Housekeeping(resources.engine, clock=clock, retention_days=30)
        report = await housekeeping.run_once()
        assert report.events_purged == 1
        assert await event_users(resources) == ["middle", "new"]
        assert (await housekeeping.run_once()).events_purged == 0  # idempotent: replicas need no coordination

    async def test_expired_state_nonces_are_purged_and_live_ones_kept(
        self, resources: Resources, clock: FakeClock
    ) -> None:
        """A used nonce whose state has expired is forgotten; one still inside its ten minutes is kept."""
        used_at = datetime.fromtimestamp(clock(), UTC)
        async with resources.engine.begin() as conn:
            await oauth_states.consume(conn, "gone", user_id="u", expires_at=int(clock()) - 1, now=used_at)
            await oauth_states.consume(conn, "kept", user_id="u", expires_at=int(clock()) + 600, now=used_at)
        report = await Housekeeping(resources.engine, clock=clock, retention_days=90).run_once()
        assert report.states_purged == 1
        async with resources.engine.connect() as conn:
            nonces = (await conn.execute(sa.select(oauth_state_uses.c.nonce))).scalars().all()
        assert nonces == ["kept"]

    async def test_delivered_notifications_and_processed_webhook_events_go_after_the_retention(
        self, resources: Resources, clock: FakeClock
    ) -> None:
        """Old delivered notifications and processed events are purged; undelivered and pending ones never are."""
        old = datetime.fromtimestamp(clock(), UTC)
        async with resources.engine.begin() as conn:
            for message_id in ("msg_delivered", "msg_pending"):
                await journal.enqueue(
                    conn,
                    message_id=message_id,
                    event_type="token.needs_reauth",
                    user_id="u",
                    payload="{}",
                    created_at=old,
                    deliver_at=int(clock()),
                )
            await outbox.mark_delivered(conn, "msg_delivered", at=old)
            for event_time in (1, 2):
                event = webhook_events.NewEvent(
                    f"athlete:7:{event_time}:1", 7, "athlete", "update", event_time, 1, "{}"
                )
                await webhook_events.insert(conn, event, received_at=old, due_at=int(clock()))
            processed = (await webhook_events.list_recent(conn, limit=10))[-1]
            claimed = webhook_events.PendingEvent(processed.id, 7, 0, old)
            await webhook_events.finish(
                conn, claimed, state="confirmed", result="ok", processed_at=old, recheck_at=int(clock())
            )
        clock.advance(31 * DAY)
        report = await Housekeeping(resources.engine, clock=clock, retention_days=30).run_once()
        assert (report.notifications_purged, report.webhook_events_purged) == (1, 1)
        async with resources.engine.connect() as conn:
            assert (await conn.execute(sa.select(notifications.c.id))).scalars().all() == ["msg_pending"]
            assert [e.state for e in await webhook_events.list_recent(conn, limit=10)] == ["pending"]


class TestBatches:
    async def test_a_purge_goes_in_bounded_batches_until_nothing_is_left(
        self, resources: Resources, clock: FakeClock
    ) -> None:
        """Five old rows with batches of two: three batches of audit rows (2, 2, 1), every old row gone, the
        young one kept."""
        for i in range(5):
            await note(resources, f"old-{i}")
        clock.advance(31 * DAY)
        await note(resources, "young")
        housekeeping = Housekeeping(resources.engine, clock=clock, retention_days=30, batch_size=2)
        report = await housekeeping.run_once()
        assert report.events_purged == 5
        # 3 batches of audit rows, then one batch for each of the four other kinds (nothing to purge there)
        assert report.batches == 3 + 4
        assert report.complete
        assert report.slowest_batch_ms > 0
        assert await event_users(resources) == ["young"]

    async def test_a_pass_out_of_time_stops_between_batches_and_says_so(
        self, resources: Resources, clock: FakeClock
    ) -> None:
        """With no time left after the first batch, the pass ends there: one batch done, `complete` False, and
        the next pass takes the rest."""
        for i in range(3):
            await note(resources, f"old-{i}")
        clock.advance(31 * DAY)
        housekeeping = Housekeeping(resources.engine, clock=clock, retention_days=30, batch_size=2, pass_seconds=0)
        first = await housekeeping.run_once()
        assert (first.events_purged, first.batches, first.complete) == (2, 1, False)
        second = await Housekeeping(resources.engine, clock=clock, retention_days=30, batch_size=2).run_once()
        assert (second.events_purged, second.complete) == (1, True)
        assert await event_users(resources) == []

    async def test_old_hourly_counts_go_with_the_retention(self, resources: Resources, clock: FakeClock) -> None:
        """The rollup of refresh attempts is purged like the audit trail: an hour older than the retention goes."""
        async with resources.engine.begin() as conn:
            await resources.service.journal.refresh_attempt(conn, "u", trigger="api", outcome="succeeded")
        clock.advance(31 * DAY)
        async with resources.engine.begin() as conn:
            await resources.service.journal.refresh_attempt(conn, "u", trigger="api", outcome="succeeded")
        report = await Housekeeping(resources.engine, clock=clock, retention_days=30).run_once()
        assert report.counts_purged == 1
        async with resources.engine.connect() as conn:
            hours = (await conn.execute(sa.select(refresh_counts.c.hour))).scalars().all()
        assert hours == [int(clock()) - int(clock()) % 3600]


@pytest.mark.postgres
class TestOneReplicaAtATime:
    async def test_a_replica_skips_while_another_one_is_purging(self, pg_url: str, clock: FakeClock) -> None:
        """While another session holds the housekeeping lock a pass purges nothing and says it skipped; once the
        lock is free the same pass purges."""
        engine = make_engine(pg_url)
        try:
            async with engine.begin() as conn:
                await Journal(clock=clock).note(conn, "ancient", kind="imported")
            clock.advance(91 * DAY)
            housekeeping = Housekeeping(engine, clock=clock, retention_days=90)
            other = await asyncpg.connect(asyncpg_dsn(pg_url))
            try:
                assert await other.fetchval("SELECT pg_try_advisory_lock($1)", HOUSEKEEPING_LOCK_KEY)
                skipped = await housekeeping.run_once()
                assert skipped.skipped
                assert skipped.events_purged == 0
                await other.execute("SELECT pg_advisory_unlock($1)", HOUSEKEEPING_LOCK_KEY)
            finally:
                await other.close()
            done = await housekeeping.run_once()
            assert (done.skipped, done.events_purged) == (False, 1)
            # the lock was given back: another session can take it at once
            probe = await asyncpg.connect(asyncpg_dsn(pg_url))
            try:
                assert await probe.fetchval("SELECT pg_try_advisory_lock($1)", HOUSEKEEPING_LOCK_KEY)
            finally:
                await probe.close()
        finally:
            await engine.dispose()


class TestSchedule:
    async def test_start_runs_a_pass_at_once_and_stop_ends_the_loop(
        self, resources: Resources, clock: FakeClock
    ) -> None:
        """The periodic job purges on start (then hourly) and stops promptly when asked."""
        await note(resources, "ancient")
        clock.advance(91 * DAY)
        housekeeping = Housekeeping(resources.engine, clock=clock, retention_days=90)
        housekeeping.start()
        try:
            async with asyncio.timeout(10):  # a bounded condition wait on what the pass leaves in the database
                while True:
                    if not await event_users(resources):
                        break
                    await asyncio.sleep(0.01)
        finally:
            await asyncio.wait_for(housekeeping.stop(), timeout=5)
        assert not housekeeping.job.running
