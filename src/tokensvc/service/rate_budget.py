"""Strava's rate limits as a budget shared by every replica through the database, charged for what Strava counts.

- `/oauth/token` (refresh, exchange) is not rate-counted by Strava and takes no unit; such calls are bounded per
  process by `TOKENSVC_STRAVA_TOKEN_CONCURRENCY` instead (the provider's semaphore).
- Every other call (deauthorize, the athlete check) takes a unit of the overall 15-minute and daily windows, and a
  GET a unit of the read windows as well. They reset at :00/:15/:30/:45 and at midnight UTC. Gateway calls may spend
  their priority's share of each window (interactive 100 %, sync 80 %, backfill 50 %). The service's own background
  calls (deauthorization checks, revokes) spend from the backfill share (`sweep_share`, 50 %), and on-demand ones
  (a DELETE's revoke) from the whole window.
- The service's own calls (`on_demand`, `sweep`) also have a reserve: while the service has made fewer than
  `reserve_share` (5 %, at least one call) of a window's limit in that window, its calls pass beyond their share, up
  to the whole window. So the app's sync (80 %) and backfill (50 %) calls can never starve them; only interactive
  calls, which may spend the whole window, can. The service's own calls are counted in the shared row.
- Every Strava answer's `X-RateLimit-*` / `X-ReadRateLimit-*` correct the shared state: usage in a window is the
  larger of ours and Strava's, a limit the smaller of the configured one and Strava's.
- A 429 pauses that kind of call (token, overall or read) on every replica until the window resets (or
  Retry-After); while paused no such call is made at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokensvc.clock import Clock
from tokensvc.db import Autocommit
from tokensvc.errors import ProviderRateLimited
from tokensvc.providers.strava import RateLimitUsage, seconds_to_next_window
from tokensvc.store import rate_budget as store
from tokensvc.store.rate_budget import Limits, PauseKind, Reserve

log = structlog.get_logger(__name__)

# `on_demand` and `sweep` are the service's own calls; the gateway's callers pick one of the other three.
Priority = Literal["on_demand", "sweep", "interactive", "sync", "backfill"]
SERVICE_PRIORITIES: frozenset[Priority] = frozenset({"on_demand", "sweep"})
# The share of each window a priority may spend (v1.1 gateway: interactive 100 %, sync 80 %, backfill 50 %).
GATEWAY_SHARES: dict[Priority, float] = {"interactive": 1.0, "sync": 0.8, "backfill": 0.5}
WINDOW = 900
DAY = 86_400
_PAUSED = "Strava asked us to slow down; {kind} calls are paused"


@dataclass(frozen=True, slots=True)
class BudgetState:
    limit_15min: int
    limit_daily: int
    used_15min: int
    used_daily: int
    paused_until: int
    read_limit_15min: int = 0
    read_limit_daily: int = 0
    read_used_15min: int = 0
    read_used_daily: int = 0
    read_paused_until: int = 0
    token_paused_until: int = 0


class RateBudget:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        limit_15min: int,
        limit_daily: int,
        clock: Clock,
        read_limit_15min: int = 100,
        read_limit_daily: int = 1000,
        sweep_share: float = 0.5,
        reserve_share: float = 0.05,
    ) -> None:
        # Single statements: autocommit, so the hot row is never held across anything else.
        self._engine = Autocommit(engine)
        self.limit_15min, self.limit_daily = limit_15min, limit_daily
        self.read_limit_15min, self.read_limit_daily = read_limit_15min, read_limit_daily
        self._clock = clock
        self._sweep_share = sweep_share
        self._reserve_share = reserve_share
        # Local hints, so a paused replica does not even ask the database.
        self._paused_until: dict[PauseKind, int] = {}
        self._spent_until: dict[tuple[Priority, bool], int] = {}  # likewise for a window found spent, until it resets
        # Strava's latest count, noted synchronously when a response carries it (possibly inside a transaction
        # that holds a lock) and written with the next budget statement.
        self._reported: RateLimitUsage | None = None
        self._latest: RateLimitUsage | None = None  # the same, kept for telling which window a 429 hit

    def _windows(self) -> tuple[int, int, int]:
        now = int(self._clock())
        return now, now - now % WINDOW, now - now % DAY

    def _limits(self, priority: Priority, read: bool) -> Limits:
        share = 1.0 if priority == "on_demand" else GATEWAY_SHARES.get(priority, self._sweep_share)
        limits = self._shared(share, read, at_least=0)
        if priority not in SERVICE_PRIORITIES:
            return limits
        reserve = Reserve(whole=self._shared(1.0, read, at_least=0), calls=self.reserve(read))
        return Limits(limits.limit_15min, limits.limit_daily, limits.read, reserve)

    def reserve(self, read: bool = False) -> Limits:
        """The service's own reserve in each window: `reserve_share` of its limit, at least one call."""
        return self._shared(self._reserve_share, read, at_least=1, ceil=True)

    def _shared(self, share: float, read: bool, *, at_least: int, ceil: bool = False) -> Limits:
        def part(limit: int) -> int:
            value = limit * share
            return max(at_least, math.ceil(value) if ceil else int(value))

        reads = (part(self.read_limit_15min), part(self.read_limit_daily)) if read else None
        return Limits(part(self.limit_15min), part(self.limit_daily), reads)

    async def acquire(self, priority: Priority, *, read: bool = False) -> None:
        """Take one rate-counted call (a read too, for a GET) from the budget. Raises ProviderRateLimited (with
        Retry-After) when paused or spent."""
        now, window_start, day_start = self._windows()
        for kind in ("overall", "read") if read else ("overall",):
            if now < self._paused_until.get(kind, 0):
                raise self._limited(self._paused_until[kind] - now, _PAUSED.format(kind=kind))
        if now < self._spent_until.get((priority, read), 0):
            raise self._limited(
                self._spent_until[priority, read] - now, f"the Strava budget for {priority} calls is spent"
            )
        limits = self._limits(priority, read)
        async with self._engine.connect() as conn:
            await self._write_reported(conn, window_start, day_start)
            if await store.take(conn, now=now, window_start=window_start, day_start=day_start, limits=limits):
                return
            row = await store.read(conn)
        raise self._refusal(row, now=now, priority=priority, limits=limits)

    def _refusal(self, row: store.BudgetRow, *, now: int, priority: Priority, limits: Limits) -> ProviderRateLimited:
        """Why `take` said no, noted locally until it ends."""
        window_start, day_start = now - now % WINDOW, now - now % DAY
        read = limits.read is not None
        pauses: tuple[tuple[PauseKind, int], ...] = (("overall", row.paused_until), ("read", row.read_paused_until))
        for kind, until in pauses if read else pauses[:1]:
            if until > now:
                self._paused_until[kind] = until
                return self._limited(until - now, _PAUSED.format(kind=kind))
        what = f"{priority} {'read ' if read else ''}calls"
        if row.day_start == day_start and _day_spent(row, limits):
            self._spent_until[priority, read] = day_start + DAY
            return self._limited(day_start + DAY - now, f"the daily Strava budget for {what} is spent")
        self._spent_until[priority, read] = window_start + WINDOW
        return self._limited(seconds_to_next_window(now), f"the 15-minute Strava budget for {what} is spent")

    async def refund(self, priority: Priority = "on_demand", *, read: bool = False) -> None:
        """Give back a unit taken (at `priority`) for a call that turned out not to be needed."""
        _now, window_start, day_start = self._windows()
        service = priority in SERVICE_PRIORITIES
        self._spent_until.clear()  # a window found spent here has room again
        async with self._engine.connect() as conn:
            await store.give_back(conn, window_start=window_start, day_start=day_start, read=read, service=service)

    async def token_calls_allowed(self) -> None:
        """Before a `/oauth/token` call: no unit is taken (Strava does not count them), but a 429 that paused token
        calls on any replica holds this one back too. Raises ProviderRateLimited while paused."""
        now = int(self._clock())
        until = self._paused_until.get("token", 0)
        if now >= until:
            async with self._engine.connect() as conn:
                until = await store.token_paused_until(conn)
            self._paused_until["token"] = until
        if now < until:
            raise self._limited(until - now, _PAUSED.format(kind="token"))

    async def pause(self, retry_after: int | None, *, kind: PauseKind = "overall") -> int:
        """After a 429: pause `kind` of call on every replica until `retry_after` seconds from now, else the next
        window. Returns the seconds paused."""
        now = int(self._clock())
        seconds = retry_after if retry_after else seconds_to_next_window(now)
        self._paused_until[kind] = max(self._paused_until.get(kind, 0), now + seconds)
        async with self._engine.connect() as conn:
            await store.pause(conn, until=now + seconds, kind=kind)
        log.warning("strava.rate_limited.paused", seconds=seconds, kind=kind)
        return seconds

    def kind_of_429(self, *, read: bool) -> PauseKind:
        """Which window a 429 for a rate-counted call hit: the read one when Strava's latest headers say only it is
        spent, else the overall one."""
        usage = self._latest
        if read and usage is not None and usage.read_usage is not None and usage.read_limit is not None:
            overall_spent = usage.usage_15min >= usage.limit_15min or usage.usage_daily >= usage.limit_daily
            read_spent = any(u >= lim for u, lim in zip(usage.read_usage, usage.read_limit, strict=True))
            if read_spent and not overall_spent:
                return "read"
        return "overall"

    def note_usage(self, usage: RateLimitUsage) -> None:
        """Strava's own count (headers) will raise ours: other clients of the same app spend the same budget. A
        lower limit than configured (Strava's say) wins at once."""
        self._reported = self._latest = usage
        self.limit_15min = min(self.limit_15min, usage.limit_15min) or self.limit_15min
        self.limit_daily = min(self.limit_daily, usage.limit_daily) or self.limit_daily
        if usage.read_limit is not None:
            self.read_limit_15min = min(self.read_limit_15min, usage.read_limit[0]) or self.read_limit_15min
            self.read_limit_daily = min(self.read_limit_daily, usage.read_limit[1]) or self.read_limit_daily

    async def _write_reported(self, conn: AsyncConnection, window_start: int, day_start: int) -> None:
        usage, self._reported = self._reported, None
        if usage is not None:
            read = usage.read_usage or (None, None)
            await store.observe(
                conn,
                window_start=window_start,
                day_start=day_start,
                used_15min=usage.usage_15min,
                used_daily=usage.usage_daily,
                read_15min=read[0],
                read_daily=read[1],
            )

    async def state(self) -> BudgetState:
        now, window_start, day_start = self._windows()
        async with self._engine.connect() as conn:
            await self._write_reported(conn, window_start, day_start)
            row = await store.read(conn)
        in_window, in_day = row.window_start == window_start, row.day_start == day_start
        return BudgetState(
            limit_15min=self.limit_15min,
            limit_daily=self.limit_daily,
            used_15min=row.window_used if in_window else 0,
            used_daily=row.day_used if in_day else 0,
            paused_until=row.paused_until if row.paused_until > now else 0,
            read_limit_15min=self.read_limit_15min,
            read_limit_daily=self.read_limit_daily,
            read_used_15min=row.read_window_used if in_window else 0,
            read_used_daily=row.read_day_used if in_day else 0,
            read_paused_until=row.read_paused_until if row.read_paused_until > now else 0,
            token_paused_until=row.token_paused_until if row.token_paused_until > now else 0,
        )

    @staticmethod
    def _limited(seconds: int, detail: str) -> ProviderRateLimited:
        return ProviderRateLimited(detail, retry_after=max(1, seconds))


def _day_spent(row: store.BudgetRow, limits: Limits) -> bool:
    """Whether the day (not only the 15-minute window) refuses a call with `limits`: its share is spent and, for
    the service's own calls, so is the day's reserve or the whole day."""
    used = [(row.day_used, limits.limit_daily)]
    if limits.read is not None:
        used.append((row.read_day_used, limits.read[1]))
    reserve = limits.reserve
    if reserve is None:
        return any(count >= limit for count, limit in used)
    wholes = [reserve.whole.limit_daily, *([reserve.whole.read[1]] if reserve.whole.read else [])]
    reserves = [reserve.calls.limit_daily, *([reserve.calls.read[1]] if reserve.calls.read else [])]
    return any(
        count >= limit and (row.service_day_used >= own or count >= whole)
        for (count, limit), whole, own in zip(used, wholes, reserves, strict=True)
    )
