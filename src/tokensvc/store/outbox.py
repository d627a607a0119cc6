"""All SQL of notification delivery: claim what is due, then record how each attempt ended.

The rows are written by `store.journal.enqueue` inside the transaction of the change they report. A claim leases
rows by moving `next_attempt_at` past the delivery's timeout, so no other claim takes them meanwhile; on Postgres
`FOR UPDATE SKIP LOCKED` keeps two replicas' concurrent claims disjoint. A deliverer that dies mid-attempt leaves the
lease to run out, and the row is delivered again then (at least once; the stable `webhook-id` lets receivers drop
the duplicate).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import notifications as n
from tokensvc.store.housekeeping import batch_delete


@dataclass(frozen=True, slots=True)
class Claimed:
    """A notification leased for one delivery attempt. `attempts` counts the attempts before this one."""

    id: str
    event_type: str
    payload: str
    attempts: int


async def claim_due(conn: AsyncConnection, *, now: int, limit: int, lease_until: int) -> list[Claimed]:
    """Take up to `limit` undelivered notifications due at `now`, oldest first, leased until `lease_until`."""
    stmt = (
        sa.select(n.c.id, n.c.event_type, n.c.payload, n.c.attempts)
        .where(n.c.delivered_at.is_(None), n.c.next_attempt_at <= now)
        # the index's order (ix_notifications_due): the longest due first, without sorting a backlog
        .order_by(n.c.next_attempt_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    claimed = [Claimed(**row._mapping) for row in (await conn.execute(stmt)).all()]
    if claimed:
        await conn.execute(sa.update(n).where(n.c.id.in_([c.id for c in claimed])).values(next_attempt_at=lease_until))
    return claimed


async def mark_delivered(conn: AsyncConnection, message_id: str, *, at: datetime) -> None:
    """The receiver answered 2xx: the row leaves the outbox's due set for good."""
    await conn.execute(
        sa.update(n)
        .where(n.c.id == message_id, n.c.delivered_at.is_(None))
        .values(delivered_at=at, attempts=n.c.attempts + 1, last_error=None)
    )


async def mark_failed(conn: AsyncConnection, message_id: str, *, error: str, retry_at: int) -> None:
    """An attempt failed; try again at `retry_at`. `error` is a status code or an exception class, never a body."""
    await conn.execute(
        sa.update(n)
        .where(n.c.id == message_id, n.c.delivered_at.is_(None))
        .values(attempts=n.c.attempts + 1, next_attempt_at=retry_at, last_error=error[:200])
    )


async def purge_delivered(conn: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Forget up to `limit` notifications delivered before `before` (undelivered ones are never purged)."""
    delivered = sa.and_(n.c.delivered_at.is_not(None), n.c.delivered_at < before)
    result = await conn.execute(batch_delete(n, n.c.id, delivered, limit=limit))
    return int(result.rowcount or 0)
