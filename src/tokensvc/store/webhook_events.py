"""All SQL about Strava push events: store one (Strava's retries are one row), claim pending ones across
replicas, and record how each ended. Functions take the caller's connection; the caller owns the transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import PROCESSED_EVENT
from tokensvc.models import strava_webhook_events as w
from tokensvc.models import user_tokens as t
from tokensvc.store.housekeeping import batch_delete

PENDING = "pending"


@dataclass(frozen=True, slots=True)
class NewEvent:
    dedupe_key: str
    owner_id: int
    object_type: str
    aspect_type: str
    event_time: int
    subscription_id: int | None
    payload: str


@dataclass(frozen=True, slots=True)
class PendingEvent:
    id: int
    owner_id: int
    attempts: int


@dataclass(frozen=True, slots=True)
class StoredWebhookEvent:
    id: int
    dedupe_key: str
    owner_id: int
    state: str
    attempts: int
    next_attempt_at: int
    processed_at: datetime | None
    result: str | None


async def insert(conn: AsyncConnection, event: NewEvent, *, received_at: datetime, due_at: int) -> bool:
    """Store an event as pending, due at `due_at`; False (and nothing written) when its dedupe key is known."""
    insert_ = pg_insert(w) if conn.dialect.name == "postgresql" else sqlite_insert(w)
    stmt = (
        insert_.values(
            dedupe_key=event.dedupe_key,
            owner_id=event.owner_id,
            object_type=event.object_type,
            aspect_type=event.aspect_type,
            event_time=event.event_time,
            subscription_id=event.subscription_id,
            payload=event.payload,
            received_at=received_at,
            state=PENDING,
            attempts=0,
            next_attempt_at=due_at,
        )
        .on_conflict_do_nothing(index_elements=[w.c.dedupe_key])
        .returning(w.c.id)
    )
    return (await conn.execute(stmt)).first() is not None


async def claim_pending(conn: AsyncConnection, *, now: int, limit: int, lease_until: int) -> list[PendingEvent]:
    """Take up to `limit` pending events that are due, oldest first, and lease them until `lease_until`.

    On Postgres `FOR UPDATE SKIP LOCKED` lets replicas claim disjoint events; the lease keeps a claimed event from
    every other claim until it is finished or retried (or the lease runs out, if this process dies). A range scan
    on ix_strava_webhook_events_pending.
    """
    stmt = (
        sa.select(w.c.id, w.c.owner_id, w.c.attempts)
        .where(w.c.state == PENDING, w.c.next_attempt_at <= now)
        .order_by(w.c.next_attempt_at, w.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    events = [PendingEvent(**row._mapping) for row in (await conn.execute(stmt)).all()]
    if events:
        await conn.execute(sa.update(w).where(w.c.id.in_([e.id for e in events])).values(next_attempt_at=lease_until))
    return events


async def finish(conn: AsyncConnection, event_id: int, *, state: str, result: str, processed_at: datetime) -> None:
    """Record how an event ended (`confirmed`, `unconfirmed`, `no_user`); it is never taken again."""
    await conn.execute(
        sa.update(w)
        .where(w.c.id == event_id)
        .values(state=state, result=result[:200], processed_at=processed_at, attempts=w.c.attempts + 1)
    )


async def retry_later(conn: AsyncConnection, event_id: int, *, next_attempt_at: int, result: str) -> None:
    """Count a failed attempt and leave the event pending until `next_attempt_at`."""
    await conn.execute(
        sa.update(w)
        .where(w.c.id == event_id)
        .values(attempts=w.c.attempts + 1, next_attempt_at=next_attempt_at, result=result[:200])
    )


async def get(conn: AsyncConnection, event_id: int) -> StoredWebhookEvent | None:
    row = (await conn.execute(sa.select(*_COLUMNS).where(w.c.id == event_id))).first()
    return StoredWebhookEvent(**row._mapping) if row is not None else None


async def list_recent(conn: AsyncConnection, *, limit: int) -> list[StoredWebhookEvent]:
    """The newest events first (operations and tests)."""
    stmt = sa.select(*_COLUMNS).order_by(w.c.id.desc()).limit(limit)
    return [StoredWebhookEvent(**row._mapping) for row in (await conn.execute(stmt)).all()]


async def users_of_athlete(conn: AsyncConnection, athlete_id: int) -> list[str]:
    """Every user connected as this Strava athlete (an index scan on ix_user_tokens_athlete_id)."""
    stmt = sa.select(t.c.user_id).where(t.c.athlete_id == athlete_id).order_by(t.c.user_id)
    return list((await conn.execute(stmt)).scalars())


_COLUMNS = (
    w.c.id,
    w.c.dedupe_key,
    w.c.owner_id,
    w.c.state,
    w.c.attempts,
    w.c.next_attempt_at,
    w.c.processed_at,
    w.c.result,
)


async def purge_processed(conn: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Forget up to `limit` events processed before `before` (Strava's retries come within minutes, so the dedupe
    key need not outlive the retention); pending events are never purged."""
    processed = sa.and_(sa.text(PROCESSED_EVENT), w.c.processed_at < before)
    result = await conn.execute(batch_delete(w, w.c.id, processed, limit=limit))
    return int(result.rowcount or 0)
