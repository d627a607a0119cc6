"""All SQL about the shared Strava rate budget: one row, updated atomically by every replica.

The overall and the read windows share their starts (`window_start`, `day_start`): every statement that moves a
start to the current window zeroes the counts of both kinds that belonged to the old one. The service's own calls
(`service_window_used`, `service_day_used`) are counted there too, within the overall counts, and roll likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import strava_rate_budget as t

_ROW = t.c.id == 1

PauseKind = Literal["overall", "read", "token"]
_PAUSE_COLUMN = {"overall": t.c.paused_until, "read": t.c.read_paused_until, "token": t.c.token_paused_until}


@dataclass(frozen=True, slots=True)
class BudgetRow:
    window_start: int
    window_used: int
    day_start: int
    day_used: int
    paused_until: int
    read_window_used: int = 0
    read_day_used: int = 0
    read_paused_until: int = 0
    token_paused_until: int = 0
    service_window_used: int = 0
    service_day_used: int = 0


@dataclass(frozen=True, slots=True)
class Reserve:
    """A call of the service's own: counted as such, and allowed past its share of a window while the service's
    own calls in that window are fewer than the reserve for it, up to the window's whole limit."""

    whole: Limits
    calls: Limits  # the reserve, per window (the service's reads are counted with its overall calls)


@dataclass(frozen=True, slots=True)
class Limits:
    """The (already shared-out) limits a call must stay under; `read` None for a call that is not a read;
    `reserve` for the service's own calls only."""

    limit_15min: int
    limit_daily: int
    read: tuple[int, int] | None = None
    reserve: Reserve | None = None


def _used_in(start: sa.ColumnElement[int], used: sa.ColumnElement[int], current: int) -> sa.ColumnElement[int]:
    """Usage in the current window: the stored count if it belongs to it, else nothing yet."""
    return sa.case((start == current, used), else_=0)


def _current(window_start: int, day_start: int) -> dict[str, sa.ColumnElement[int]]:
    return {
        "window_used": _used_in(t.c.window_start, t.c.window_used, window_start),
        "read_window_used": _used_in(t.c.window_start, t.c.read_window_used, window_start),
        "day_used": _used_in(t.c.day_start, t.c.day_used, day_start),
        "read_day_used": _used_in(t.c.day_start, t.c.read_day_used, day_start),
        "service_window_used": _used_in(t.c.window_start, t.c.service_window_used, window_start),
        "service_day_used": _used_in(t.c.day_start, t.c.service_day_used, day_start),
    }


def _room(used: dict[str, sa.ColumnElement[int]], limits: Limits) -> list[sa.ColumnElement[bool]]:
    """Each window the call needs is under its limit (or, for the service's own call, under the whole limit while
    the service's own usage in that window is under its reserve)."""
    checks = [
        ("window_used", limits.limit_15min, "service_window_used"),
        ("day_used", limits.limit_daily, "service_day_used"),
    ]
    if limits.read is not None:
        checks += [("read_window_used", limits.read[0], "service_window_used")]
        checks += [("read_day_used", limits.read[1], "service_day_used")]
    reserve = limits.reserve
    if reserve is None:
        return [used[name] < limit for name, limit, _own in checks]
    whole, calls = _flat(reserve.whole), _flat(reserve.calls)
    return [
        sa.or_(used[name] < limit, sa.and_(used[own] < calls[i], used[name] < whole[i]))
        for i, (name, limit, own) in enumerate(checks)
    ]


def _flat(limits: Limits) -> tuple[int, int, int, int]:
    read = limits.read or (0, 0)
    return limits.limit_15min, limits.limit_daily, read[0], read[1]


async def take(conn: AsyncConnection, *, now: int, window_start: int, day_start: int, limits: Limits) -> bool:
    """Count one rate-counted call (and one read, for a read; and one of the service's own, for one) if no window
    it needs is full and no pause is on; False otherwise. One atomic statement."""
    used = _current(window_start, day_start)
    conditions = [_ROW, t.c.paused_until <= now, *_room(used, limits)]
    read = 1 if limits.read is not None else 0
    own = 1 if limits.reserve is not None else 0
    if limits.read is not None:
        conditions.append(t.c.read_paused_until <= now)
    stmt = (
        sa.update(t)
        .where(*conditions)
        .values(
            window_start=window_start,
            day_start=day_start,
            window_used=used["window_used"] + 1,
            day_used=used["day_used"] + 1,
            read_window_used=used["read_window_used"] + read,
            read_day_used=used["read_day_used"] + read,
            service_window_used=used["service_window_used"] + own,
            service_day_used=used["service_day_used"] + own,
        )
    )
    return bool((await conn.execute(stmt)).rowcount)


def _less(column: sa.Column[int], by: int) -> sa.ColumnElement[int]:
    return sa.case((column >= by, column - by), else_=0)


async def give_back(
    conn: AsyncConnection, *, window_start: int, day_start: int, read: bool = False, service: bool = False
) -> None:
    """Return one call that was taken but not made (a read, the service's own, as it was taken)."""
    one, own = (1 if read else 0), (1 if service else 0)
    await conn.execute(
        sa.update(t)
        .where(_ROW, t.c.window_start == window_start, t.c.window_used > 0)
        .values(
            window_used=t.c.window_used - 1,
            read_window_used=_less(t.c.read_window_used, one),
            service_window_used=_less(t.c.service_window_used, own),
        )
    )
    await conn.execute(
        sa.update(t)
        .where(_ROW, t.c.day_start == day_start, t.c.day_used > 0)
        .values(
            day_used=t.c.day_used - 1,
            read_day_used=_less(t.c.read_day_used, one),
            service_day_used=_less(t.c.service_day_used, own),
        )
    )


async def pause(conn: AsyncConnection, *, until: int, kind: PauseKind = "overall") -> None:
    """Hold every replica's calls of `kind` back until `until` (never shortening a longer pause)."""
    column = _PAUSE_COLUMN[kind]
    await conn.execute(sa.update(t).where(_ROW, column < until).values({column.name: until}))


async def observe(
    conn: AsyncConnection,
    *,
    window_start: int,
    day_start: int,
    used_15min: int,
    used_daily: int,
    read_15min: int | None = None,
    read_daily: int | None = None,
) -> None:
    """Raise our counts to what Strava's headers report (other clients of the same app count too): in each window
    the larger of ours and Strava's."""
    used = _current(window_start, day_start)
    reported = {
        "window_used": used_15min,
        "day_used": used_daily,
        "read_window_used": read_15min,
        "read_day_used": read_daily,
    }
    values: dict[str, sa.ColumnElement[int]] = {}
    for name, ours in used.items():
        theirs = reported.get(name)  # none for the service's own counts: only rolled to the current window
        values[name] = ours if theirs is None else sa.case((ours < theirs, theirs), else_=ours)
    await conn.execute(sa.update(t).where(_ROW).values(window_start=window_start, day_start=day_start, **values))


async def read(conn: AsyncConnection) -> BudgetRow:
    row = (
        await conn.execute(
            sa.select(
                t.c.window_start,
                t.c.window_used,
                t.c.day_start,
                t.c.day_used,
                t.c.paused_until,
                t.c.read_window_used,
                t.c.read_day_used,
                t.c.read_paused_until,
                t.c.token_paused_until,
                t.c.service_window_used,
                t.c.service_day_used,
            ).where(_ROW)
        )
    ).one()
    return BudgetRow(*row)


async def token_paused_until(conn: AsyncConnection) -> int:
    """The shared pause of `/oauth/token` calls (0: none)."""
    return int((await conn.execute(sa.select(t.c.token_paused_until).where(_ROW))).scalar_one())
