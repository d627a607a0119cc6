"""All SQL about what happened: the audit trail (`token_events`) and the notification outbox (`notifications`).

Both are written with the caller's connection, inside the transaction of the change they record, so a change is
never committed without its record and its notification, and neither exists for a change that rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import notifications as n
from tokensvc.models import refresh_counts as c
from tokensvc.models import token_events as e
from tokensvc.store import rollup
from tokensvc.store.dialect import insert_into
from tokensvc.store.housekeeping import batch_delete


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One audit row. Never a token: ids, labels, status codes and durations only."""

    user_id: str
    kind: str
    occurred_at: datetime
    trigger: str | None = None
    outcome: str | None = None
    strava_status: int | None = None
    duration_ms: int | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    user_id: str
    kind: str
    occurred_at: datetime
    trigger: str | None
    outcome: str | None
    strava_status: int | None
    duration_ms: int | None
    detail: str | None


async def append(conn: AsyncConnection, record: EventRecord) -> None:
    values = {
        "user_id": record.user_id,
        "kind": record.kind,
        "occurred_at": record.occurred_at,
        "trigger": record.trigger,
        "outcome": record.outcome,
        "strava_status": record.strava_status,
        "duration_ms": record.duration_ms,
        "detail": record.detail[:200] if record.detail else None,
    }
    await conn.execute(sa.insert(e).values(**values))


async def enqueue(
    conn: AsyncConnection,
    *,
    message_id: str,
    event_type: str,
    user_id: str,
    payload: str,
    created_at: datetime,
    deliver_at: int,
    once: bool = False,
) -> bool:
    """Put a notification in the outbox, not yet attempted; a deliverer in any replica sends it once the transaction
    commits. With `once` (a forwarded event, whose id derives from the event so that Strava's retries are one row),
    False, and nothing written, when that id is there already."""
    stmt = insert_into(conn, n).values(
        {
            "id": message_id,
            "event_type": event_type,
            "user_id": user_id,
            "payload": payload,
            "created_at": created_at,
            "next_attempt_at": deliver_at,
            "attempts": 0,
        }
    )
    if not once:
        await conn.execute(stmt)
        return True
    first = stmt.on_conflict_do_nothing(index_elements=[n.c.id]).returning(n.c.id)
    return (await conn.execute(first)).first() is not None


_EVENT_COLUMNS = (
    e.c.id,
    e.c.user_id,
    e.c.kind,
    e.c.occurred_at,
    e.c.trigger,
    e.c.outcome,
    e.c.strava_status,
    e.c.duration_ms,
    e.c.detail,
)


async def list_for_user(
    conn: AsyncConnection, user_id: str, *, limit: int, before_id: int | None = None
) -> list[StoredEvent]:
    """A user's history, newest first, keyset-paginated on the event id (a range scan on ix_token_events_user)."""
    stmt = sa.select(*_EVENT_COLUMNS).where(e.c.user_id == user_id)
    if before_id is not None:
        stmt = stmt.where(e.c.id < before_id)
    stmt = stmt.order_by(e.c.id.desc()).limit(limit)
    return [StoredEvent(**row._mapping) for row in (await conn.execute(stmt)).all()]


async def count_attempt(conn: AsyncConnection, *, hour: int, outcome: str, slot: int) -> None:
    """Add one refresh attempt to the hourly rollup (`hour`: epoch seconds at its start)."""
    await rollup.add(conn, c, hour=hour, outcome=outcome, slot=slot, count=1)


async def purge_events(conn: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Drop up to `limit` audit rows older than the retention (the only way rows leave the trail)."""
    result = await conn.execute(batch_delete(e, e.c.id, e.c.occurred_at < before, limit=limit))
    return int(result.rowcount or 0)
