"""Which users are used: noted when something asks for a user's token, written off the request path.

`note()` is synchronous and costs a dict lookup: a use is kept in memory and written at most once per user per
`coalesce_seconds` (default 5 minutes), in batches, by a background job (`flush`), never inside the request. A
flush also puts users asked about again back on the ordinary sweep schedule if they had been moved out as idle.
Sweeps and webhook checks do not note uses (they are not the application asking). A lost flush (crash) loses at
most the last few minutes of uses: the user then looks idle a little early, and still refreshes on demand.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.background import PeriodicJob
from tokensvc.clock import Clock
from tokensvc.store import usage as store

log = structlog.get_logger(__name__)

DAY = 86_400


class UsageRecorder:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        clock: Clock,
        buffer_seconds: int,
        coalesce_seconds: int = 300,
        flush_interval_seconds: float = 30.0,
        batch_size: int = 500,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._buffer = buffer_seconds
        self.coalesce_seconds = coalesce_seconds
        self.batch_size = batch_size
        self._pending: dict[str, int] = {}
        self._written: dict[str, int] = {}  # when each recently written use was, to coalesce the next ones
        self.job = PeriodicJob(
            "usage-flush", self.flush, interval_seconds=flush_interval_seconds, run_at_start=False, run_at_stop=True
        )

    def note(self, user_id: str) -> None:
        """Something asked for this user's token now. Never blocks, never raises."""
        now = int(self._clock())
        written = self._written.get(user_id)
        if written is not None and now - written < self.coalesce_seconds:
            return
        self._pending[user_id] = now

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Write the pending uses in batches. Returns how many were written; on a database failure the rest stay
        pending for the next flush."""
        pending, self._pending = self._pending, {}
        items = sorted(pending.items())
        written = 0
        try:
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                await self._write(batch)
                written += len(batch)
                self._written.update(batch)
        except (DBAPIError, OSError) as exc:
            for user_id, at in items[written:]:
                self._pending[user_id] = max(at, self._pending.get(user_id, 0))
            log.warning("usage.flush_failed", error=type(exc).__name__, kept=len(items) - written)
        self._forget_old()
        return written

    async def _write(self, batch: Sequence[tuple[str, int]]) -> None:
        async with self._engine.begin() as conn:
            await store.record(conn, batch)
            moved = await store.pull_in(conn, [user_id for user_id, _ in batch], buffer_seconds=self._buffer)
        if moved:
            log.info("usage.idle_users_back_on_schedule", count=moved)

    def _forget_old(self) -> None:
        horizon = int(self._clock()) - self.coalesce_seconds
        self._written = {user_id: at for user_id, at in self._written.items() if at > horizon}
