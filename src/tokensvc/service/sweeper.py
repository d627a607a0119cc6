"""Refresh every due user before anyone asks, in every replica, without a leader and without double work.

Each sweep claims due users in batches (`store.claim_due`: `FOR UPDATE SKIP LOCKED` on Postgres, then a lease), so
replicas take disjoint users; each claimed user goes through the same exactly-once refresh as an on-demand call.
`concurrency` bounds the Strava calls in flight; a few more workers than that overlap the database work around
each call (budget, lock, write) with other users' calls (bench/README.md: 0.76 → 0.9 of the ideal rate). A spent or
paused rate budget ends the sweep early; shutdown lets in-flight refreshes finish and gives unstarted claims back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokensvc.background import STOP_DEADLINE_SECONDS, every
from tokensvc.clock import Clock
from tokensvc.config import sweep_workers
from tokensvc.errors import ProviderRateLimited, ReauthRequired, TokenServiceError, TokensMissing
from tokensvc.service.tokens import TokenService
from tokensvc.store import tokens as store
from tokensvc.store import usage as usage_store

log = structlog.get_logger(__name__)

DAY = 86_400
_DONE = ("", 0)  # queue sentinel; "" is never a valid user id


@dataclass(slots=True)
class SweepReport:
    checked: int = 0
    refreshed: int = 0
    failed: int = 0
    needs_reauth: int = 0
    idle: int = 0  # claimed but idle, keep-alive not due: moved out to their keep-alive


class Sweeper:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        tokens: TokenService,
        clock: Clock,
        concurrency: int = 10,
        batch_size: int = 100,
        lease_seconds: int = 300,
        interval_seconds: int = 300,
        active_days: int = 0,
        keepalive_days: int = 14,
    ) -> None:
        self._engine = engine
        self._tokens = tokens
        self._clock = clock
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.active_days = active_days  # 0: sweep everyone
        self.keepalive_days = keepalive_days
        self._stopping = asyncio.Event()
        self._job = every("sweeper", self.sweep_once, interval_seconds=interval_seconds)

    async def count_due(self) -> int:
        async with self._engine.connect() as conn:
            return await store.count_due(conn, now=int(self._clock()))

    async def sweep_once(self, progress: Callable[[int], None] | None = None) -> SweepReport:
        """Refresh every user due now (claimed batch by batch), `concurrency` at a time."""
        report = SweepReport()
        await self._flush_uses()
        queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue(maxsize=self.batch_size)
        halt = asyncio.Event()  # stop claiming: shutdown, or the rate budget is spent, or the database is gone
        unstarted: list[tuple[str, int]] = []

        def stopping() -> bool:
            return halt.is_set() or self._stopping.is_set()

        async def claim(workers: int) -> None:
            try:
                while not stopping():
                    lease_until = int(self._clock()) + self.lease_seconds
                    async with self._engine.begin() as conn:
                        user_ids = await store.claim_due(
                            conn, now=int(self._clock()), limit=self.batch_size, lease_until=lease_until
                        )
                        claimed = len(user_ids)
                        user_ids = await self._set_idle_aside(conn, user_ids, report)
                    if not claimed:
                        break
                    for user_id in user_ids:
                        if stopping():
                            unstarted.append((user_id, lease_until))
                        else:
                            await queue.put((user_id, lease_until))
            finally:
                for _ in range(workers):
                    await queue.put(_DONE)

        strava_slots = asyncio.Semaphore(self.concurrency)
        workers = sweep_workers(self.concurrency)

        async def work() -> None:
            while (item := await queue.get()) != _DONE:
                if stopping():
                    unstarted.append(item)
                    continue
                await self._refresh_one(item[0], report, halt, strava_slots)
                if progress is not None:
                    progress(1)

        async with asyncio.TaskGroup() as group:
            group.create_task(claim(workers))
            for _ in range(workers):
                group.create_task(work())
        if unstarted:
            await self._release(unstarted)
        log.info(
            "sweep.finished",
            checked=report.checked,
            refreshed=report.refreshed,
            failed=report.failed,
            needs_reauth=report.needs_reauth,
            idle=report.idle,
            halted=halt.is_set(),
        )
        return report

    async def _flush_uses(self) -> None:
        """This replica's latest uses count for whom this sweep takes."""
        if self.active_days and self._tokens.usage is not None:
            await self._tokens.usage.flush()

    async def _set_idle_aside(self, conn: AsyncConnection, user_ids: list[str], report: SweepReport) -> list[str]:
        """Of the claimed users, those used within `active_days` are swept; an idle one only when its keep-alive
        is due (its last refresh `keepalive_days` ago). The others' next sweep moves out to their keep-alive, so
        sweeps do not rescan them; asked about again, they come back on schedule (service/usage.py)."""
        if not self.active_days or not user_ids:
            return user_ids
        now = int(self._clock())
        keepalive = self.keepalive_days * DAY
        idle = await usage_store.idle_among(conn, user_ids, active_since=now - self.active_days * DAY)
        moves = [(user_id, int(at.timestamp()) + keepalive) for user_id, at in idle]
        moves = [(user_id, at) for user_id, at in moves if at > now]
        if moves:
            await usage_store.move_out(conn, moves)
            report.idle += len(moves)
        skipped = {user_id for user_id, _ in moves}
        return [user_id for user_id in user_ids if user_id not in skipped]

    async def _refresh_one(
        self, user_id: str, report: SweepReport, halt: asyncio.Event, strava_slots: asyncio.Semaphore
    ) -> None:
        report.checked += 1
        try:
            outcome = await self._tokens.sweep_user(user_id, strava_slots=strava_slots)
        except ReauthRequired:
            report.needs_reauth += 1
        except TokensMissing:
            pass  # deleted since it was claimed
        except ProviderRateLimited as exc:
            report.failed += 1
            halt.set()
            await self._release([(user_id, -1)], any_lease=True)  # due again as soon as the budget allows
            log.warning("sweep.halted_by_rate_limit", retry_after=exc.retry_after)
        except TokenServiceError as exc:
            report.failed += 1
            log.warning("sweep.refresh_failed", user_id=user_id, code=exc.code)
        except (DBAPIError, OSError, asyncpg.PostgresError) as exc:
            report.failed += 1
            halt.set()
            log.error("sweep.halted_by_database", error=type(exc).__name__)
        else:
            report.refreshed += int(outcome.refreshed)

    async def _release(self, claims: list[tuple[str, int]], *, any_lease: bool = False) -> None:
        """Give back claims nobody finished, so the next sweep (here or in another replica) takes them now."""
        leases: dict[int | None, list[str]] = {}
        for user_id, lease_until in claims:
            leases.setdefault(None if any_lease else lease_until, []).append(user_id)
        async with self._engine.begin() as conn:
            for lease, user_ids in leases.items():
                await store.release_claims(conn, user_ids, lease_until=lease, now=int(self._clock()))
        log.info("sweep.claims_released", count=len(claims))

    # -- the background loop ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Run sweeps every `interval_seconds` (±10% jitter, so replicas drift apart) until `stop`."""
        self._job.start()

    def request_stop(self) -> None:
        """From now on claim nothing and start nothing; in-flight refreshes go on to their commit."""
        self._stopping.set()

    async def stop(self, *, deadline_seconds: float = STOP_DEADLINE_SECONDS) -> None:
        """Stop claiming, let in-flight refreshes commit within `deadline_seconds` (else they are cancelled), give
        back unstarted claims, end the loop."""
        self.request_stop()
        await self._job.stop(deadline_seconds=deadline_seconds)
