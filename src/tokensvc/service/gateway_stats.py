"""The gateway's calls by outcome, DB-wide: what `/v1/stats`, `/metrics` and the dashboard report as the sync
success rate.

`note()` is synchronous and costs a dict update: each call's outcome is kept in memory per hour and added to the
database's hourly rows (`gateway_counts`) in one transaction every `flush_interval_seconds` (the gauge interval,
TOKENSVC_GAUGE_INTERVAL_SECONDS, 10 s by default) by a background job, before each `/v1/stats` answer, and once more
at shutdown; never on the request path. So every replica's calls count everywhere, at most one interval late; a
crash loses at most that interval's counts. Outcomes (the same labels as
`tokensvc_gateway_calls_total`):

- `ok`: Strava answered 2xx or 304;
- `reauth`: the user must reconnect (a dead refresh token, no tokens stored);
- `scope`: Strava refused for a scope the user has not granted;
- `rate_limited`: the app's window was spent (nothing sent) or Strava answered 429;
- `strava_error`: Strava failed (5xx, timeout, unreachable) or the service could not make the call;
- `client_error`: any other 4xx, Strava's or the service's: the caller's request.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.background import PeriodicJob
from tokensvc.clock import Clock
from tokensvc.store import gateway_counts as store

log = structlog.get_logger(__name__)

OUTCOMES = ("ok", "reauth", "scope", "rate_limited", "strava_error", "client_error")
HOUR = 3600
SLOTS = 8  # rows each (hour, outcome) is spread over, so replicas flushing together seldom wait on one row


@dataclass(frozen=True, slots=True)
class GatewayTotals:
    """Gateway calls per outcome over some hours; `success_rate` None when there were none."""

    counts: dict[str, int]

    @property
    def calls(self) -> int:
        return sum(self.counts.values())

    @property
    def success_rate(self) -> float | None:
        calls = self.calls
        return round(self.counts.get("ok", 0) / calls, 4) if calls else None

    @classmethod
    def of(cls, totals: dict[str, int]) -> GatewayTotals:
        """Known outcomes only, every one present (an unknown label in the table counts as `strava_error`)."""
        counts = dict.fromkeys(OUTCOMES, 0)
        for outcome, count in totals.items():
            counts[outcome if outcome in counts else "strava_error"] += count
        return cls(counts)


class GatewayTally:
    """This replica's gateway outcomes not yet in the database."""

    def __init__(self, engine: AsyncEngine, *, clock: Clock, flush_interval_seconds: float = 10.0) -> None:
        self._engine = engine
        self._clock = clock
        self._pending: Counter[tuple[int, str]] = Counter()
        self.job = PeriodicJob(
            "gateway-tally", self.flush, interval_seconds=flush_interval_seconds, run_at_start=False, run_at_stop=True
        )

    def note(self, outcome: str) -> None:
        """One gateway call ended in `outcome`. Never blocks, never raises."""
        now = int(self._clock())
        self._pending[now - now % HOUR, outcome] += 1

    async def flush(self) -> int:
        """Add the pending counts to the database in one transaction. Returns the calls written; on a database
        failure they stay pending for the next flush."""
        pending, self._pending = self._pending, Counter()
        if not pending:
            return 0
        tallies = [
            store.Tally(hour=hour, outcome=outcome, slot=random.randrange(SLOTS), count=count)
            for (hour, outcome), count in sorted(pending.items())
        ]
        try:
            async with self._engine.begin() as conn:
                await store.add(conn, tallies)
        except (DBAPIError, OSError) as exc:
            self._pending.update(pending)
            log.warning("gateway.tally_flush_failed", error=type(exc).__name__, kept=sum(pending.values()))
            return 0
        return sum(pending.values())
