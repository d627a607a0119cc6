"""All SQL about the gateway's hourly counts by outcome (`gateway_counts`): batched adds, the 24-hour totals, and
the purge at the audit retention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import gateway_counts as g


@dataclass(frozen=True, slots=True)
class Tally:
    """`count` calls that ended in `outcome` within the hour starting at `hour` (epoch seconds), added to `slot`."""

    hour: int
    outcome: str
    slot: int
    count: int


async def add(conn: AsyncConnection, tallies: Sequence[Tally]) -> None:
    """Add each tally to its (hour, outcome, slot) row: one upsert statement per tally, in the caller's
    transaction."""
    insert = pg_insert(g) if conn.dialect.name == "postgresql" else sqlite_insert(g)
    for tally in tallies:
        stmt = insert.values(hour=tally.hour, outcome=tally.outcome, slot=tally.slot, count=tally.count)
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[g.c.hour, g.c.outcome, g.c.slot], set_={"count": g.c.count + stmt.excluded.count}
            )
        )


async def totals(conn: AsyncConnection, *, since_hour: int, hours: int = 24) -> dict[str, int]:
    """Calls per outcome in the `hours` hourly buckets from `since_hour` (every replica's, as flushed)."""
    in_window = sa.and_(g.c.hour >= since_hour, g.c.hour < since_hour + hours * 3600)
    stmt = sa.select(g.c.outcome, sa.func.sum(g.c.count)).where(in_window).group_by(g.c.outcome)
    return {outcome: int(count) for outcome, count in (await conn.execute(stmt)).all()}


async def purge(conn: AsyncConnection, *, before_hour: int) -> int:
    """Drop the rows of hours before `before_hour` (a few dozen rows a day: no batches needed)."""
    result = await conn.execute(sa.delete(g).where(g.c.hour < before_hour))
    return int(result.rowcount or 0)
