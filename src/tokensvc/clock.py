"""Time, injected everywhere (tests pass a fake one): the `Clock` type, and the production clock that follows the
database's time.

Leases (sweep claims, webhook events, the outbox), refresh claims and the shared Strava rate windows are compared
by every replica against values other replicas wrote, so they must agree on what "now" is. `DatabaseClock` is the
local clock plus the offset to the database's clock, measured at start-up and then periodically (the offset, not
each reading, comes from the database: reading the clock costs no round trip).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.store import clock as store

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
"""Epoch seconds now."""

SYNC_INTERVAL_SECONDS = 60.0
_SAMPLES = 3
_LOGGED_CHANGE_SECONDS = 0.1


class DatabaseClock:
    """Local time plus the measured offset to the database's clock; local time until the first measurement."""

    def __init__(self, *, local: Clock = time.time) -> None:
        self._local = local
        self.offset = 0.0

    def __call__(self) -> float:
        return self._local() + self.offset

    async def sync(self, engine: AsyncEngine) -> float:
        """Measure the offset (the sample with the shortest round trip of a few, taken at its midpoint) and use it
        from now on; returns it. Raises the database's errors (the previous offset stays)."""
        best: tuple[float, float] | None = None
        async with engine.connect() as conn:
            for _ in range(_SAMPLES):
                before = self._local()
                database_now = await store.database_now(conn)
                after = self._local()
                sample = (after - before, database_now - (before + after) / 2)
                if best is None or sample[0] < best[0]:
                    best = sample
        assert best is not None
        round_trip, offset = best
        if abs(offset - self.offset) >= _LOGGED_CHANGE_SECONDS:
            log.info(
                "clock.offset_measured", offset_ms=round(offset * 1000, 1), round_trip_ms=round(round_trip * 1000, 1)
            )
        self.offset = offset
        return offset
