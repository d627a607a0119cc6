"""Periodic housekeeping in every replica: drop audit rows, delivered notifications and processed Strava webhook
events past the retention, and OAuth state nonces past their expiry. All are idempotent deletes, so replicas need
no coordination; each pass is one short transaction."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.service.signing import Clock
from tokensvc.store import journal, oauth_states, outbox, webhook_events

log = structlog.get_logger(__name__)

HOUR = 3600


@dataclass(frozen=True, slots=True)
class HousekeepingReport:
    events_purged: int
    states_purged: int
    notifications_purged: int = 0
    webhook_events_purged: int = 0


class Housekeeping:
    def __init__(
        self, engine: AsyncEngine, *, clock: Clock, retention_days: int, interval_seconds: float = HOUR
    ) -> None:
        self._engine = engine
        self._clock = clock
        self.retention = timedelta(days=retention_days)
        self.interval_seconds = interval_seconds
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.passed = asyncio.Event()  # set after each pass of the loop (tests wait on it instead of sleeping)

    async def run_once(self) -> HousekeepingReport:
        """One pass (one transaction). Raises the database's errors."""
        now = self._clock()
        before = datetime.fromtimestamp(now, UTC) - self.retention
        async with self._engine.begin() as conn:
            report = HousekeepingReport(
                events_purged=await journal.purge_events(conn, before=before),
                states_purged=await oauth_states.purge_expired(conn, now=int(now)),
                notifications_purged=await outbox.purge_delivered(conn, before=before),
                webhook_events_purged=await webhook_events.purge_processed(conn, before=before),
            )
        log.info("housekeeping.done", retention_days=self.retention.days, **dataclasses.asdict(report))
        return report

    def start(self) -> None:
        """Run a pass now and then every `interval_seconds` until `stop`."""
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception as exc:  # a failed pass (database down, …) must not end the loop; the next one retries
                log.warning("housekeeping.failed", error=type(exc).__name__)
            self.passed.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval_seconds)
