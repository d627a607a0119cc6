"""All SQL about Strava push events: one pending deauthorization check per athlete (every event for the athlete
coalesces into it), claim pending ones across replicas, record how each ended; forwarded events put in the outbox
once (Strava's retries are one row) and counted per athlete and hour; the app's own subscription id. Functions take
the caller's connection; the caller owns the transaction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import PROCESSED_EVENT
from tokensvc.models import strava_event_windows as win
from tokensvc.models import strava_subscription as sub
from tokensvc.models import strava_webhook_events as w
from tokensvc.models import user_tokens as t
from tokensvc.store.dialect import Upsert, insert_into
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
    received_at: datetime


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


def _pending(conn: AsyncConnection, event: NewEvent, *, payload: str, received_at: datetime, due_at: int) -> Upsert:
    """The INSERT of `event` (its fields are columns) as a pending row, not yet attempted, due at `due_at`."""
    pending = {
        "payload": payload,
        "received_at": received_at,
        "state": PENDING,
        "attempts": 0,
        "next_attempt_at": due_at,
    }
    return insert_into(conn, w).values({**asdict(event), **pending})


async def insert(conn: AsyncConnection, event: NewEvent, *, received_at: datetime, due_at: int) -> bool:
    """Store an event as pending, due at `due_at`; False (and nothing written) when its dedupe key is known."""
    stmt = _pending(conn, event, payload=event.payload, received_at=received_at, due_at=due_at)
    new = stmt.on_conflict_do_nothing(index_elements=[w.c.dedupe_key]).returning(w.c.id)
    return (await conn.execute(new)).first() is not None


async def arm_check(conn: AsyncConnection, event: NewEvent, *, received_at: datetime, due_at: int) -> bool:
    """Make sure the athlete has one pending check, due no earlier than `due_at` nor before the re-check time its
    last check left (`next_attempt_at` of a finished row). True when a check was armed now, False when one was
    pending already (the event coalesces into it). One row per athlete, whatever the caller sends."""
    stmt = _pending(conn, event, payload="", received_at=received_at, due_at=due_at)
    upsert = stmt.on_conflict_do_update(
        index_elements=[w.c.dedupe_key],
        set_={
            "state": PENDING,
            "attempts": 0,
            "event_time": stmt.excluded.event_time,
            "received_at": stmt.excluded.received_at,
            "next_attempt_at": sa.case(
                (w.c.next_attempt_at > due_at, w.c.next_attempt_at), else_=sa.literal(due_at, sa.BigInteger)
            ),
            "processed_at": None,
            "result": None,
        },
        # A finished check is re-armed. A pending one that is not due now (claimed by a processor, or waiting for a
        # retry) is touched once a second at most: the new `received_at` tells `finish` that an event came while the
        # check ran, so the check runs again rather than the event being lost in a check that started before it.
        where=sa.or_(w.c.state != PENDING, sa.and_(w.c.next_attempt_at > due_at, w.c.received_at < received_at)),
    ).returning(w.c.id)
    return (await conn.execute(upsert)).first() is not None


async def claim_pending(conn: AsyncConnection, *, now: int, limit: int, lease_until: int) -> list[PendingEvent]:
    """Take up to `limit` pending events that are due, oldest first, and lease them until `lease_until`.

    On Postgres `FOR UPDATE SKIP LOCKED` lets replicas claim disjoint events; the lease keeps a claimed event from
    every other claim until it is finished or retried (or the lease runs out, if this process dies). A range scan
    on ix_strava_webhook_events_pending.
    """
    stmt = (
        sa.select(w.c.id, w.c.owner_id, w.c.attempts, w.c.received_at)
        .where(w.c.state == PENDING, w.c.next_attempt_at <= now)
        .order_by(w.c.next_attempt_at, w.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    events = [PendingEvent(**row._mapping) for row in (await conn.execute(stmt)).all()]
    if events:
        await conn.execute(sa.update(w).where(w.c.id.in_([e.id for e in events])).values(next_attempt_at=lease_until))
    return events


async def finish(
    conn: AsyncConnection,
    event: PendingEvent,
    *,
    state: str,
    result: str,
    processed_at: datetime,
    recheck_at: int,
) -> bool:
    """Record how a check ended (`confirmed`, `unconfirmed`, `no_user`); it is not taken again until an event re-arms
    it (`arm_check`), and then not before `recheck_at`. When an event came while the check ran (its `received_at`
    moved), the check stays pending, due at `recheck_at`, and False is returned."""
    finished = await conn.execute(
        sa.update(w)
        .where(w.c.id == event.id, w.c.received_at == event.received_at)
        .values(
            state=state,
            result=result[:200],
            processed_at=processed_at,
            attempts=w.c.attempts + 1,
            next_attempt_at=recheck_at,
        )
    )
    if finished.rowcount:
        return True
    await conn.execute(
        sa.update(w)
        .where(w.c.id == event.id)
        .values(attempts=w.c.attempts + 1, next_attempt_at=recheck_at, result=f"again: {result}"[:200])
    )
    return False


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


# -- forwarded events --------------------------------------------------------------------------------------------


async def forwarded_count(conn: AsyncConnection, athlete_id: int, *, window_start: int) -> int:
    """The athlete's forwarded events in the hour starting at `window_start` (a primary key lookup)."""
    stmt = sa.select(win.c.count).where(win.c.athlete_id == athlete_id, win.c.window_start == window_start)
    return int((await conn.execute(stmt)).scalar_one_or_none() or 0)


async def count_forwarded(conn: AsyncConnection, athlete_id: int, *, window_start: int) -> int:
    """Add one forwarded event to the athlete's count for the hour starting at `window_start` (an older hour's
    count starts over) and return the new count."""
    stmt = insert_into(conn, win).values(athlete_id=athlete_id, window_start=window_start, count=1)
    upsert = stmt.on_conflict_do_update(
        index_elements=[win.c.athlete_id],
        set_={
            "count": sa.case((win.c.window_start == window_start, win.c.count + 1), else_=1),
            "window_start": window_start,
        },
    ).returning(win.c.count)
    return int((await conn.execute(upsert)).scalar_one())


# -- the app's own subscription ----------------------------------------------------------------------------------


async def known_subscription(conn: AsyncConnection) -> int | None:
    """The app's push subscription id, if the service has learned it."""
    return (await conn.execute(sa.select(sub.c.subscription_id).where(sub.c.slot == 1))).scalar_one_or_none()


async def learn_subscription(conn: AsyncConnection, subscription_id: int | None, *, now: datetime) -> None:
    """Record the app's push subscription id (None: there is none any more, so no event is dropped for its id)."""
    if subscription_id is None:
        await conn.execute(sa.delete(sub).where(sub.c.slot == 1))
        return
    stmt = insert_into(conn, sub).values(slot=1, subscription_id=subscription_id, learned_at=now)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[sub.c.slot], set_={"subscription_id": subscription_id, "learned_at": now}
        )
    )
