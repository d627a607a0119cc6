"""Strava's rate limits as a budget shared by every replica through the database.

Each Strava call takes one unit from the current 15-minute and daily windows (they reset at :00/:15/:30/:45 and at
midnight UTC). The sweeper may use only `sweep_share` of each window, so on-demand requests always find room. A 429
pauses every replica until the window resets (or Retry-After); while paused no call is made at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokensvc.clock import Clock
from tokensvc.db import Autocommit
from tokensvc.errors import ProviderRateLimited
from tokensvc.providers.strava import RateLimitUsage, seconds_to_next_window
from tokensvc.store import rate_budget as store

log = structlog.get_logger(__name__)

Priority = Literal["on_demand", "sweep"]
WINDOW = 900
DAY = 86_400


@dataclass(frozen=True, slots=True)
class BudgetState:
    limit_15min: int
    limit_daily: int
    used_15min: int
    used_daily: int
    paused_until: int


class RateBudget:
    def __init__(
        self, engine: AsyncEngine, *, limit_15min: int, limit_daily: int, clock: Clock, sweep_share: float = 0.8
    ) -> None:
        # Single statements: autocommit, so the hot row is never held across anything else.
        self._engine = Autocommit(engine)
        self.limit_15min = limit_15min
        self.limit_daily = limit_daily
        self._clock = clock
        self._sweep_share = sweep_share
        self._paused_until = 0  # a local hint, so a paused replica does not even ask the database
        self._spent_until: dict[Priority, int] = {}  # likewise for a window found spent, until it resets
        # Strava's latest count, noted synchronously when a response carries it (possibly inside a transaction
        # that holds a lock) and written with the next budget statement.
        self._reported: RateLimitUsage | None = None

    def _windows(self) -> tuple[int, int, int]:
        now = int(self._clock())
        return now, now - now % WINDOW, now - now % DAY

    async def acquire(self, priority: Priority) -> None:
        """Take one call from the budget. Raises ProviderRateLimited (with Retry-After) when paused or spent."""
        now, window_start, day_start = self._windows()
        if now < self._paused_until:
            raise self._limited(self._paused_until - now, "Strava asked us to slow down; calls are paused")
        if now < self._spent_until.get(priority, 0):
            raise self._limited(self._spent_until[priority] - now, f"the Strava budget for {priority} calls is spent")
        share = 1.0 if priority == "on_demand" else self._sweep_share
        limit_15, limit_day = int(self.limit_15min * share), int(self.limit_daily * share)
        async with self._engine.connect() as conn:
            await self._write_reported(conn, window_start, day_start)
            if await store.take(
                conn,
                now=now,
                window_start=window_start,
                day_start=day_start,
                limit_15min=limit_15,
                limit_daily=limit_day,
            ):
                return
            row = await store.read(conn)
        if row.paused_until > now:
            self._paused_until = row.paused_until
            raise self._limited(row.paused_until - now, "Strava asked us to slow down; calls are paused")
        if row.day_start == day_start and row.day_used >= limit_day:
            self._spent_until[priority] = day_start + DAY
            raise self._limited(day_start + DAY - now, f"the daily Strava budget for {priority} calls is spent")
        self._spent_until[priority] = window_start + WINDOW
        raise self._limited(seconds_to_next_window(now), f"the 15-minute Strava budget for {priority} calls is spent")

    async def refund(self) -> None:
        """Give back a unit taken for a call that turned out not to be needed."""
        _now, window_start, day_start = self._windows()
        async with self._engine.connect() as conn:
            await store.give_back(conn, window_start=window_start, day_start=day_start)

    async def pause(self, retry_after: int | None) -> int:
        """After a 429: pause every replica until `retry_after` seconds from now, else the next window. Returns the
        seconds paused."""
        now = int(self._clock())
        seconds = retry_after if retry_after else seconds_to_next_window(now)
        self._paused_until = max(self._paused_until, now + seconds)
        async with self._engine.connect() as conn:
            await store.pause(conn, until=now + seconds)
        log.warning("strava.rate_limited.paused", seconds=seconds)
        return seconds

    def note_usage(self, usage: RateLimitUsage) -> None:
        """Strava's own count (headers) will raise ours: other clients of the same app spend the same budget. A
        lower limit than configured (Strava's say) wins at once."""
        self._reported = usage
        self.limit_15min = min(self.limit_15min, usage.limit_15min) or self.limit_15min
        self.limit_daily = min(self.limit_daily, usage.limit_daily) or self.limit_daily

    async def _write_reported(self, conn: AsyncConnection, window_start: int, day_start: int) -> None:
        usage, self._reported = self._reported, None
        if usage is not None:
            await store.observe(
                conn,
                window_start=window_start,
                day_start=day_start,
                used_15min=usage.usage_15min,
                used_daily=usage.usage_daily,
            )

    async def state(self) -> BudgetState:
        now, window_start, day_start = self._windows()
        async with self._engine.connect() as conn:
            await self._write_reported(conn, window_start, day_start)
            row = await store.read(conn)
        return BudgetState(
            limit_15min=self.limit_15min,
            limit_daily=self.limit_daily,
            used_15min=row.window_used if row.window_start == window_start else 0,
            used_daily=row.day_used if row.day_start == day_start else 0,
            paused_until=row.paused_until if row.paused_until > now else 0,
        )

    @staticmethod
    def _limited(seconds: int, detail: str) -> ProviderRateLimited:
        return ProviderRateLimited(detail, retry_after=max(1, seconds))
