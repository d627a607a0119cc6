"""All SQL about the hourly rollups (`refresh_counts`, `gateway_counts`): a count per hour, outcome and slot, the
slot chosen at random so that concurrent commits seldom wait on one row; readers sum the slots."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.store.dialect import insert_into


async def add(conn: AsyncConnection, table: sa.Table, *, hour: int, outcome: str, slot: int, count: int) -> None:
    """Add `count` to the (hour, outcome, slot) row (`hour`: epoch seconds at its start), in the caller's
    transaction: one atomic upsert, so replicas never lose a count."""
    stmt = insert_into(conn, table).values(hour=hour, outcome=outcome, slot=slot, count=count)
    added = {"count": table.c.count + stmt.excluded.count}
    await conn.execute(
        stmt.on_conflict_do_update(index_elements=[table.c.hour, table.c.outcome, table.c.slot], set_=added)
    )


async def totals(conn: AsyncConnection, table: sa.Table, *, since_hour: int, hours: int) -> dict[str, int]:
    """The count per outcome in the `hours` hourly buckets from `since_hour` (every replica's)."""
    in_window = sa.and_(table.c.hour >= since_hour, table.c.hour < since_hour + hours * 3600)
    stmt = sa.select(table.c.outcome, sa.func.sum(table.c.count)).where(in_window).group_by(table.c.outcome)
    return {outcome: int(count) for outcome, count in (await conn.execute(stmt)).all()}


async def purge(conn: AsyncConnection, table: sa.Table, *, before_hour: int) -> int:
    """Drop the rows of hours before `before_hour` (a few dozen rows a day: no batches needed)."""
    result = await conn.execute(sa.delete(table).where(table.c.hour < before_hour))
    return int(result.rowcount or 0)
