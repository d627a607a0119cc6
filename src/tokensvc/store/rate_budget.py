"""All SQL about the shared Strava rate budget: one row, updated atomically by every replica."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import strava_rate_budget as t

_ROW = t.c.id == 1


@dataclass(frozen=True, slots=True)
class BudgetRow:
    window_start: int
    window_used: int
    day_start: int
    day_used: int
    paused_until: int


def _used_in(start: sa.ColumnElement[int], used: sa.ColumnElement[int], current: int) -> sa.ColumnElement[int]:
    """Usage in the current window: the stored count if it belongs to it, else nothing yet."""
    return sa.case((start == current, used), else_=0)


async def take(
    conn: AsyncConnection, *, now: int, window_start: int, day_start: int, limit_15min: int, limit_daily: int
) -> bool:
    """Count one call if neither window is full and no pause is on; False otherwise. One atomic statement."""
    window_used = _used_in(t.c.window_start, t.c.window_used, window_start)
    day_used = _used_in(t.c.day_start, t.c.day_used, day_start)
    stmt = (
        sa.update(t)
        .where(_ROW, t.c.paused_until <= now, window_used < limit_15min, day_used < limit_daily)
        .values(window_start=window_start, window_used=window_used + 1, day_start=day_start, day_used=day_used + 1)
    )
    return bool((await conn.execute(stmt)).rowcount)


async def give_back(conn: AsyncConnection, *, window_start: int, day_start: int) -> None:
    """Return one call that was taken but not made."""
    await conn.execute(
        sa.update(t)
        .where(_ROW, t.c.window_start == window_start, t.c.window_used > 0)
        .values(window_used=t.c.window_used - 1)
    )
    await conn.execute(
        sa.update(t).where(_ROW, t.c.day_start == day_start, t.c.day_used > 0).values(day_used=t.c.day_used - 1)
    )


async def pause(conn: AsyncConnection, *, until: int) -> None:
    """Hold every replica's calls back until `until` (never shortening a longer pause)."""
    await conn.execute(sa.update(t).where(_ROW, t.c.paused_until < until).values(paused_until=until))


async def observe(
    conn: AsyncConnection, *, window_start: int, day_start: int, used_15min: int, used_daily: int
) -> None:
    """Raise our counts to what Strava's headers report (other clients of the same app count too)."""
    window_used = _used_in(t.c.window_start, t.c.window_used, window_start)
    day_used = _used_in(t.c.day_start, t.c.day_used, day_start)
    await conn.execute(
        sa.update(t)
        .where(_ROW)
        .values(
            window_start=window_start,
            window_used=sa.case((window_used < used_15min, used_15min), else_=window_used),
            day_start=day_start,
            day_used=sa.case((day_used < used_daily, used_daily), else_=day_used),
        )
    )


async def read(conn: AsyncConnection) -> BudgetRow:
    row = (
        await conn.execute(
            sa.select(t.c.window_start, t.c.window_used, t.c.day_start, t.c.day_used, t.c.paused_until).where(_ROW)
        )
    ).one()
    return BudgetRow(*row)
