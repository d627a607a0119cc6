"""One way to run a periodic background job in a replica: start, a jittered interval, wake, stop within a deadline,
errors logged and survived.

A job is an async function with no arguments. It runs once at `start` (unless told otherwise), then every
`interval_seconds` (each wait drawn from ±`jitter` of it, so replicas started together drift apart), and at once
after `wake()` (a wake during a run is kept: the job runs again right after). The interval is read before each wait,
so a run may change it (a listener lengthens its reconnect delay while connecting fails). A run that raises is
logged as `background.job_failed` (a warning when the database or a peer was away, an error with its traceback
otherwise) and the schedule goes on; a job whose failures deserve a name of their own
catches them in its run. `stop` lets a run in flight finish within its deadline, then cancels it (so does a caller
that gives up waiting for `stop`: the run never outlives it); with `run_at_stop` it then runs the job once more (a
buffer's final flush: whatever was noted since the last run is written), a failure logged the same way. That last
run has no deadline of its own: the caller bounds `stop` when it must.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError

log = structlog.get_logger(__name__)

STOP_DEADLINE_SECONDS = 10.0  # what a run in flight is given at `stop` unless the caller says otherwise


class PeriodicJob:
    """A named periodic job; `start()` schedules it on the running loop, `stop()` ends it."""

    def __init__(
        self,
        name: str,
        run: Callable[[], Awaitable[object]],
        *,
        interval_seconds: float,
        jitter: float = 0.1,
        run_at_start: bool = True,
        run_at_stop: bool = False,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"{name}: interval_seconds must be positive, got {interval_seconds}")
        if not 0 <= jitter < 1:
            raise ValueError(f"{name}: jitter must be in [0, 1), got {jitter}")
        self.name = name
        self._run = run
        self.interval_seconds = interval_seconds
        self._jitter = jitter
        self._run_at_start = run_at_start
        self._run_at_stop = run_at_stop
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def next_delay(self) -> float:
        """The wait before the next scheduled run: the interval, jittered."""
        return self.interval_seconds * random.uniform(1 - self._jitter, 1 + self._jitter)

    def start(self) -> None:
        """Schedule the job (idempotent)."""
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._loop(), name=f"tokensvc-{self.name}")

    def wake(self) -> None:
        """Run now rather than at the next scheduled time (or right after the run in flight)."""
        self._wake.set()

    async def stop(self, *, deadline_seconds: float = STOP_DEADLINE_SECONDS) -> None:
        """Schedule nothing more; let a run in flight finish within `deadline_seconds`, else cancel it; then, with
        `run_at_stop`, run once more (also when the job was never started: what was noted still gets written)."""
        self._stopping.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait({task}, timeout=deadline_seconds)
            finally:  # past the deadline, or the caller stopped waiting: the run ends with the stop
                if not task.done():
                    log.warning("background.job_cancelled", job=self.name, deadline_seconds=deadline_seconds)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if self._run_at_stop:
            await self._run_logged()

    async def _run_logged(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a failed run (database away, …) must not end the schedule, nor the shutdown
            expected = isinstance(exc, DBAPIError | OSError | TimeoutError)  # the database or a peer away: no bug
            log.log(
                logging.WARNING if expected else logging.ERROR,
                "background.job_failed",
                job=self.name,
                error=type(exc).__name__,
                detail=str(exc)[:200],
                exc_info=not expected,  # an unexpected failure is a bug: its traceback (redacted like every line)
            )

    async def _loop(self) -> None:
        delay = 0.0 if self._run_at_start else self.next_delay()
        while True:
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
            if self._stopping.is_set():
                return
            self._wake.clear()
            await self._run_logged()
            delay = self.next_delay()


class NoJob:
    """A job its setting switched off (an interval of 0): starting, waking and stopping it do nothing."""

    running = False

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self) -> None:
        return None  # nothing is scheduled

    def wake(self) -> None:
        return None  # nothing runs

    async def stop(self, *, deadline_seconds: float = STOP_DEADLINE_SECONDS) -> None:
        return None  # nothing was running


def every(
    name: str, run: Callable[[], Awaitable[object]], *, interval_seconds: float, **options: Any
) -> PeriodicJob | NoJob:
    """A PeriodicJob of `interval_seconds` (and `options`), or a NoJob when the interval is 0 or less: how a
    setting such as `TOKENSVC_SWEEP_INTERVAL_SECONDS=0` turns a job off without its owner checking."""
    if interval_seconds <= 0:
        return NoJob(name)
    return PeriodicJob(name, run, interval_seconds=interval_seconds, **options)
