"""The DB-wide numbers: `/v1/stats` (CONTRACT.md) and the gauges `/metrics` reports.

The gauges describe the shared database, not a process, so they are read fresh when `/metrics` is scraped (the
handler is async: it awaits `update_gauges`, then prometheus-client renders). Every replica therefore reports the
same value; aggregate with max(). Reads only: autocommit, no transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc import metrics
from tokensvc.schemas import RefreshCounts, RefreshWindows, Stats, UserCounts
from tokensvc.service.rate_budget import RateBudget
from tokensvc.service.signing import Clock
from tokensvc.service.status import Status
from tokensvc.store import stats as store

_GAUGED = (Status.VALID, Status.EXPIRING_SOON, Status.EXPIRED, Status.NEEDS_REAUTH)


class StatsService:
    def __init__(self, engine: AsyncEngine, *, budget: RateBudget, clock: Clock, buffer_seconds: int) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._budget = budget
        self._clock = clock
        self._buffer_seconds = buffer_seconds

    async def stats(self) -> Stats:
        """Users by status now, and refresh attempts at Strava in the last 24 hours (from the audit trail)."""
        now = self._clock()
        async with self._engine.connect() as conn:
            users = await store.users_by_status(conn, now=int(now), buffer_seconds=self._buffer_seconds)
            outcomes = await store.refresh_outcomes(conn, since=datetime.fromtimestamp(now, UTC) - timedelta(days=1))
        return Stats(
            users=UserCounts(
                total=sum(users.values()),
                valid=users[Status.VALID],
                expiring_soon=users[Status.EXPIRING_SOON],
                expired=users[Status.EXPIRED],
                needs_reauth=users[Status.NEEDS_REAUTH],
            ),
            refresh=RefreshWindows(
                last_24h=RefreshCounts(
                    success=outcomes.success, failure=outcomes.failure, reauth_required=outcomes.reauth_required
                )
            ),
        )

    async def update_gauges(self) -> None:
        """Set the DB-wide gauges (users by status, rate budget, pause, pending notifications) from the database.
        Raises the database's errors; the gauges keep their last values then."""
        async with self._engine.connect() as conn:
            users = await store.users_by_status(conn, now=int(self._clock()), buffer_seconds=self._buffer_seconds)
            pending = await store.notifications_pending(conn)
        budget = await self._budget.state()
        for status in _GAUGED:
            metrics.USERS.labels(status=status.value).set(users[status])
        metrics.NOTIFICATIONS_PENDING.set(pending)
        metrics.RATE_BUDGET_REMAINING.labels(window="15min").set(max(0, budget.limit_15min - budget.used_15min))
        metrics.RATE_BUDGET_REMAINING.labels(window="daily").set(max(0, budget.limit_daily - budget.used_daily))
        metrics.RATE_LIMIT_PAUSED_UNTIL.set(budget.paused_until)
