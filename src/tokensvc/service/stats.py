"""The DB-wide numbers: `/v1/stats` (CONTRACT.md) and the gauges `/metrics` reports.

The gauges describe the shared database, not a process. Each replica's `gauges` job reads them every
`gauge_interval_seconds` (TOKENSVC_GAUGE_INTERVAL_SECONDS), however often `/metrics` is scraped: a scrape never
touches the database. Every replica reports the same values, at most one interval old; aggregate with max().
`/v1/stats` reads on every call. Reads only: autocommit, no transaction.

"The last 24 hours" is the current hour and the 23 before it, the hourly buckets the dashboard's chart shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokensvc import metrics
from tokensvc.background import PeriodicJob
from tokensvc.clock import Clock
from tokensvc.db import Autocommit
from tokensvc.schemas import (
    AthleteCounts,
    GatewayCounts,
    GatewayWindows,
    RefreshCounts,
    RefreshWindows,
    Stats,
    StravaWindow,
    StravaWindows,
    UserCounts,
)
from tokensvc.service.gateway_stats import OUTCOMES, GatewayTally, GatewayTotals
from tokensvc.service.rate_budget import WINDOW, BudgetState, RateBudget
from tokensvc.status import Status
from tokensvc.store import gateway_counts
from tokensvc.store import stats as store
from tokensvc.store import tombstones as tombstone_store
from tokensvc.store import usage as usage_store

_GAUGED = (Status.VALID, Status.EXPIRING_SOON, Status.EXPIRED, Status.NEEDS_REAUTH)
HOUR = 3600
DAY = 86_400
HOURS = 24
# Connected athletes from this share of TOKENSVC_STRAVA_ATHLETE_CAPACITY on are a warning (stats, dashboard).
ATHLETE_CAPACITY_WARNING = 0.8


def first_hour_of_day(now: float) -> int:
    """Epoch seconds at the start of the oldest of the last 24 hourly buckets (the current hour is the newest)."""
    return int(now) - int(now) % HOUR - (HOURS - 1) * HOUR


def connected_athletes(users: Mapping[Status, int]) -> int:
    """Users holding a live connection: one athlete each (one athlete belongs to one user). `needs_reauth` users
    are not counted: a deauthorized athlete no longer counts at Strava; one whose refresh token was refused may."""
    return users[Status.VALID] + users[Status.EXPIRING_SOON] + users[Status.EXPIRED]


def athlete_counts(connected: int, capacity: int | None) -> AthleteCounts:
    """Connected athletes against the capacity, a warning from 80 % of it (none without a capacity)."""
    warning = capacity is not None and connected >= ATHLETE_CAPACITY_WARNING * capacity
    return AthleteCounts(connected=connected, capacity=capacity, warning=warning)


class StatsService:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        budget: RateBudget,
        tally: GatewayTally,
        clock: Clock,
        buffer_seconds: int,
        gauge_interval_seconds: float = 10.0,
        active_days: int = 0,
        athlete_capacity: int | None = None,
    ) -> None:
        self._engine = Autocommit(engine)
        self._athlete_capacity = athlete_capacity
        self._budget = budget
        self.tally = tally  # the gateway's outcomes, written before each /v1/stats read
        self._clock = clock
        self._buffer_seconds = buffer_seconds
        self._active_days = active_days
        self.gauges = PeriodicJob("metrics-gauges", self.update_gauges, interval_seconds=gauge_interval_seconds)

    async def stats(self) -> Stats:
        """Users by status now, refresh attempts at Strava and gateway calls in the last 24 hours (from the hourly
        rollups; this replica's pending gateway counts are written first), and the Strava windows now."""
        await self.tally.flush()
        now = self._clock()
        async with self._engine.connect() as conn:
            users = await store.users_by_status(conn, now=int(now), buffer_seconds=self._buffer_seconds)
            outcomes = await store.refresh_outcomes(conn, since_hour=first_hour_of_day(now))
            active, idle = await self._activity(conn, users, now=int(now))
            gateway = GatewayTotals.of(await gateway_counts.totals(conn, since_hour=first_hour_of_day(now)))
        budget = await self._budget.state()
        return Stats(
            users=UserCounts(
                total=sum(users.values()),
                valid=users[Status.VALID],
                expiring_soon=users[Status.EXPIRING_SOON],
                expired=users[Status.EXPIRED],
                needs_reauth=users[Status.NEEDS_REAUTH],
                active=active,
                idle=idle,
            ),
            refresh=RefreshWindows(
                last_24h=RefreshCounts(
                    success=outcomes.success, failure=outcomes.failure, reauth_required=outcomes.reauth_required
                )
            ),
            athletes=athlete_counts(connected_athletes(users), self._athlete_capacity),
            strava_windows=strava_windows(budget, now=now),
            gateway=GatewayWindows(last_24h=gateway_counts_of(gateway)),
        )

    async def update_gauges(self) -> None:
        """Set the DB-wide gauges (users by status, rate budget, pause, pending notifications and revocations)
        from the database. Raises the database's errors; the gauges keep their last values then."""
        async with self._engine.connect() as conn:
            users = await store.users_by_status(conn, now=int(self._clock()), buffer_seconds=self._buffer_seconds)
            pending = await store.notifications_pending(conn)
            tombstones = await tombstone_store.count(conn)
            now = int(self._clock())
            active, idle = await self._activity(conn, users, now=now)
            expired_active = users[Status.EXPIRED]
            if self._active_days:
                since = now - self._active_days * DAY
                expired_active = await usage_store.count_active(conn, active_since=since, expired_by=now)
            gateway = GatewayTotals.of(await gateway_counts.totals(conn, since_hour=first_hour_of_day(now)))
        budget = await self._budget.state()
        _set_window_gauges(strava_windows(budget, now=now))
        for outcome in OUTCOMES:
            metrics.GATEWAY_CALLS_LAST_24H.labels(outcome=outcome).set(gateway.counts[outcome])
        rate = gateway.success_rate
        metrics.GATEWAY_SUCCESS_RATIO.set(1.0 if rate is None else rate)
        metrics.USERS_BY_ACTIVITY.labels(activity="active").set(active)
        metrics.USERS_BY_ACTIVITY.labels(activity="idle").set(idle)
        metrics.ACTIVE_USERS_EXPIRED.set(expired_active)
        for status in _GAUGED:
            metrics.USERS.labels(status=status.value).set(users[status])
        metrics.NOTIFICATIONS_PENDING.set(pending)
        metrics.ATHLETES_CONNECTED.set(connected_athletes(users))
        if self._athlete_capacity is not None:
            metrics.ATHLETE_CAPACITY.set(self._athlete_capacity)
        metrics.REVOCATIONS_PENDING.set(tombstones)
        metrics.RATE_BUDGET_REMAINING.labels(window="15min").set(max(0, budget.limit_15min - budget.used_15min))
        metrics.RATE_BUDGET_REMAINING.labels(window="daily").set(max(0, budget.limit_daily - budget.used_daily))
        read_15, read_day = (
            budget.read_limit_15min - budget.read_used_15min,
            budget.read_limit_daily - budget.read_used_daily,
        )
        metrics.RATE_BUDGET_REMAINING.labels(window="read_15min").set(max(0, read_15))
        metrics.RATE_BUDGET_REMAINING.labels(window="read_daily").set(max(0, read_day))
        pauses = (budget.paused_until, budget.read_paused_until, budget.token_paused_until)
        metrics.RATE_LIMIT_PAUSED_UNTIL.set(max(pauses))

    async def _activity(self, conn: AsyncConnection, users: Mapping[Status, int], *, now: int) -> tuple[int, int]:
        """(active, idle) among the users who can be refreshed; everyone is active when active_days is 0."""
        live = connected_athletes(users)
        if not self._active_days:
            return live, 0
        active = await usage_store.count_active(conn, active_since=now - self._active_days * DAY)
        return active, max(0, live - active)


def strava_windows(budget: BudgetState, *, now: float) -> StravaWindows:
    """The shared windows as `/v1/stats` and the dashboard show them: used, limit and when each resets."""
    window_end, day_end = int(now) - int(now) % WINDOW + WINDOW, int(now) - int(now) % DAY + DAY

    def window(used: int, limit: int, end: int) -> StravaWindow:
        return StravaWindow(used=used, limit=limit, resets_at=datetime.fromtimestamp(end, UTC))

    paused = max(budget.paused_until, budget.read_paused_until, budget.token_paused_until)
    return StravaWindows(
        overall_15min=window(budget.used_15min, budget.limit_15min, window_end),
        overall_daily=window(budget.used_daily, budget.limit_daily, day_end),
        read_15min=window(budget.read_used_15min, budget.read_limit_15min, window_end),
        read_daily=window(budget.read_used_daily, budget.read_limit_daily, day_end),
        paused_until=datetime.fromtimestamp(paused, UTC) if paused else None,
    )


def gateway_counts_of(totals: GatewayTotals) -> GatewayCounts:
    return GatewayCounts(calls=totals.calls, success_rate=totals.success_rate, **totals.counts)


_WINDOW_LABELS = {
    "15min": "overall_15min",
    "daily": "overall_daily",
    "read_15min": "read_15min",
    "read_daily": "read_daily",
}


def _set_window_gauges(windows: StravaWindows) -> None:
    for label, name in _WINDOW_LABELS.items():
        window: StravaWindow = getattr(windows, name)
        metrics.STRAVA_WINDOW_USED.labels(window=label).set(window.used)
        metrics.STRAVA_WINDOW_LIMIT.labels(window=label).set(window.limit)
        metrics.STRAVA_WINDOW_RESET.labels(window=label).set(window.resets_at.timestamp())
