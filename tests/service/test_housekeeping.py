"""Audit retention and state-nonce cleanup, with the FakeClock, on SQLite and Postgres."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import sqlalchemy as sa

from tests.conftest import FakeClock
from tokensvc.app import Resources
from tokensvc.models import notifications, oauth_state_uses, token_events
from tokensvc.service.housekeeping import Housekeeping
from tokensvc.store import journal, oauth_states, outbox, webhook_events

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
            await webhook_events.finish(conn, processed.id, state="confirmed", result="ok", processed_at=old)
        clock.advance(31 * DAY)
        report = await Housekeeping(resources.engine, clock=clock, retention_days=30).run_once()
        assert (report.notifications_purged, report.webhook_events_purged) == (1, 1)
        async with resources.engine.connect() as conn:
            assert (await conn.execute(sa.select(notifications.c.id))).scalars().all() == ["msg_pending"]
            assert [e.state for e in await webhook_events.list_recent(conn, limit=10)] == ["pending"]


class TestSchedule:
    async def test_start_runs_a_pass_at_once_and_stop_ends_the_loop(
        self, resources: Resources, clock: FakeClock
    ) -> None:
        """The periodic task purges on start (then hourly) and stops promptly when asked."""
        await note(resources, "ancient")
        clock.advance(91 * DAY)
        housekeeping = Housekeeping(resources.engine, clock=clock, retention_days=90)
        housekeeping.start()
        try:
            await asyncio.wait_for(housekeeping.passed.wait(), timeout=10)
        finally:
            await asyncio.wait_for(housekeeping.stop(), timeout=5)
        assert await event_users(resources) == []
