"""Periodic housekeeping: drop audit rows, hourly refresh counts, delivered notifications and processed Strava
webhook events past the retention, and OAuth state nonces past their expiry, so the tables stay flat however long
the service runs.

Every replica schedules it (hourly, jittered), but one replica at a time runs it: a pass first tries a Postgres
advisory lock and skips when another replica holds it (behind a transaction-mode pooler each batch tries it). A
pass deletes in batches of `batch_size` rows, each its own short transaction on the pass's one connection (which
holds the lock), so no lock on a purged table is held for long and nothing waits behind a purge. A pass stops
after `pass_seconds`; if rows were left, the next pass starts at once (a backlog, such as the audit rows of every
success before 0008, is worked off in steady slices).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokensvc.background import PeriodicJob
from tokensvc.clock import Clock
from tokensvc.db import Autocommit
from tokensvc.models import gateway_counts, refresh_counts
from tokensvc.store import housekeeping as store
from tokensvc.store import journal, oauth_states, outbox, rollup, webhook_events

log = structlog.get_logger(__name__)

HOUR = 3600
BATCH_SIZE = 5000
PASS_SECONDS = 60.0


@dataclass(slots=True)
class HousekeepingReport:
    """What one pass did. `skipped`: another replica was purging; `complete` False: the pass ran out of time with
    rows left (the next one starts at once)."""

    events_purged: int = 0
    states_purged: int = 0
    notifications_purged: int = 0
    webhook_events_purged: int = 0
    counts_purged: int = 0
    batches: int = 0
    slowest_batch_ms: float = 0.0
    skipped: bool = False
    complete: bool = True


Purge = Callable[[AsyncConnection], Awaitable[int]]


class Housekeeping:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        clock: Clock,
        retention_days: int,
        interval_seconds: float = HOUR,
        batch_size: int = BATCH_SIZE,
        pass_seconds: float = PASS_SECONDS,
    ) -> None:
        self._engine = engine
        self._pooled = Autocommit(engine).pooled
        self._clock = clock
        self.retention = timedelta(days=retention_days)
        self.batch_size = batch_size
        self.pass_seconds = pass_seconds
        self.job = PeriodicJob("housekeeping", self._scheduled_pass, interval_seconds=interval_seconds)

    async def run_once(self) -> HousekeepingReport:
        """One pass, unless another replica is running one (then nothing is done and `skipped` is set). Each batch
        is one transaction. Raises the database's errors (batches committed before stay done)."""
        async with self._engine.connect() as conn:
            if self._pooled:
                report = await self._purge_all(conn, lock_each_batch=True)
            else:
                locked = await store.try_lock(conn)
                await conn.commit()
                if not locked:
                    report = HousekeepingReport(skipped=True)
                else:
                    try:
                        report = await self._purge_all(conn, lock_each_batch=False)
                    finally:
                        await self._unlock(conn)
        if report.skipped:
            log.info("housekeeping.skipped", reason="another replica is purging")
            return report
        log.info("housekeeping.done", retention_days=self.retention.days, **dataclasses.asdict(report))
        return report

    async def _purge_all(self, conn: AsyncConnection, *, lock_each_batch: bool) -> HousekeepingReport:
        now = self._clock()
        before = datetime.fromtimestamp(now, UTC) - self.retention
        before_hour = int(before.timestamp()) - int(before.timestamp()) % HOUR
        limit = self.batch_size
        report = HousekeepingReport()
        deadline = time.monotonic() + self.pass_seconds
        purges: list[tuple[str, Purge]] = [
            ("events_purged", lambda c: journal.purge_events(c, before=before, limit=limit)),
            ("counts_purged", lambda c: _purge_rollups(c, before_hour=before_hour)),
            ("states_purged", lambda c: oauth_states.purge_expired(c, now=int(now), limit=limit)),
            ("notifications_purged", lambda c: outbox.purge_delivered(c, before=before, limit=limit)),
            ("webhook_events_purged", lambda c: webhook_events.purge_processed(c, before=before, limit=limit)),
        ]
        for field, purge in purges:
            while True:
                started = time.perf_counter()
                async with conn.begin():
                    if lock_each_batch and not await store.try_lock_transaction(conn):
                        report.skipped = report.batches == 0
                        return report
                    purged = await purge(conn)
                report.batches += 1
                report.slowest_batch_ms = max(report.slowest_batch_ms, (time.perf_counter() - started) * 1000)
                setattr(report, field, getattr(report, field) + purged)
                if purged < limit:
                    break
                if time.monotonic() >= deadline:
                    report.complete = False
                    return report
        return report

    async def _unlock(self, conn: AsyncConnection) -> None:
        try:
            await store.unlock(conn)
            await conn.commit()
        except Exception as exc:
            # A pooled connection must never keep the lock (every replica's housekeeping would stop): close it,
            # which releases the lock on the server.
            log.warning("housekeeping.unlock_failed", error=type(exc).__name__)
            await conn.invalidate()

    async def _scheduled_pass(self) -> None:
        report = await self.run_once()
        if not report.complete:
            self.job.wake()

    def start(self) -> None:
        """Run a pass now and then every `interval_seconds` (jittered) until `stop`."""
        self.job.start()

    async def stop(self) -> None:
        await self.job.stop()


async def _purge_rollups(conn: AsyncConnection, *, before_hour: int) -> int:
    """The hourly rollups (refresh attempts, gateway calls) of hours before `before_hour`: a few dozen rows a day."""
    return sum([await rollup.purge(conn, table, before_hour=before_hour) for table in (refresh_counts, gateway_counts)])
