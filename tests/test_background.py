"""The one helper for periodic background jobs: start, jittered interval, wake, stop within a deadline, errors
logged and survived. Waits are bounded waits on what the job records, never fixed sleeps."""

from __future__ import annotations

import asyncio

import pytest

from tests.logcapture import captured_logs
from tokensvc.background import PeriodicJob

DEADLINE = 5.0


class Recorder:
    """A job that counts its runs, can be made to fail or to block, and lets the test wait for the n-th run."""

    def __init__(self) -> None:
        self.runs = 0
        self.failures_left = 0
        self.block: asyncio.Event | None = None
        self.finished = 0
        self._ran = asyncio.Condition()

    async def __call__(self) -> None:
        self.runs += 1
        async with self._ran:
            self._ran.notify_all()
        if self.block is not None:
            await self.block.wait()
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("database away")
        self.finished += 1

    async def until_runs(self, n: int) -> None:
        async with asyncio.timeout(DEADLINE), self._ran:
            await self._ran.wait_for(lambda: self.runs >= n)


class TestSchedule:
    async def test_it_runs_at_start_and_again_when_woken(self) -> None:
        """With an hour's interval, the only runs are the one at start and the one `wake` asks for."""
        job = Recorder()
        periodic = PeriodicJob("test", job, interval_seconds=3600)
        periodic.start()
        try:
            await job.until_runs(1)
            periodic.wake()
            await job.until_runs(2)
            assert job.runs == 2
        finally:
            await periodic.stop()

    async def test_without_run_at_start_the_first_run_waits_for_the_interval_or_a_wake(self) -> None:
        """`run_at_start=False`: nothing happens at start; a wake runs it."""
        job = Recorder()
        periodic = PeriodicJob("test", job, interval_seconds=3600, run_at_start=False)
        periodic.start()
        try:
            await asyncio.sleep(0)  # let the loop begin its wait (this only yields; nothing depends on timing)
            assert job.runs == 0
            periodic.wake()
            await job.until_runs(1)
        finally:
            await periodic.stop()

    async def test_it_runs_every_interval_on_its_own(self) -> None:
        """A short interval brings run after run with nobody waking it."""
        job = Recorder()
        periodic = PeriodicJob("test", job, interval_seconds=0.01)
        periodic.start()
        try:
            await job.until_runs(3)
        finally:
            await periodic.stop()

    def test_a_changed_interval_holds_from_the_next_wait(self) -> None:
        """A run may change the interval (a listener lengthening its reconnect delay): the next wait is the new one
        (no jitter asked, so exactly that)."""
        periodic = PeriodicJob("test", Recorder(), interval_seconds=0.1, jitter=0)
        periodic.interval_seconds = 0.4
        assert periodic.next_delay() == 0.4

    def test_the_interval_is_jittered_within_its_bounds(self) -> None:
        """Each wait is drawn from interval ± jitter, so replicas started together drift apart."""
        periodic = PeriodicJob("test", Recorder(), interval_seconds=100, jitter=0.1)
        delays = [periodic.next_delay() for _ in range(200)]
        assert all(90 <= d <= 110 for d in delays)
        assert len({round(d, 3) for d in delays}) > 100

    @pytest.mark.parametrize(("interval", "jitter"), [(0, 0.1), (-1, 0.1), (1, 1.0), (1, -0.1)])
    def test_nonsense_schedules_are_refused(self, interval: float, jitter: float) -> None:
        """A job that would spin, or whose jitter could make the wait negative, is a programming error."""
        with pytest.raises(ValueError, match="test"):
            PeriodicJob("test", Recorder(), interval_seconds=interval, jitter=jitter)


class TestErrors:
    async def test_a_failing_run_is_logged_and_the_schedule_goes_on(self) -> None:
        """The first run raises: one `background.job_failed` line naming the job and the error; the next run
        (woken) succeeds."""
        job = Recorder()
        job.failures_left = 1
        periodic = PeriodicJob("flaky", job, interval_seconds=3600)
        with captured_logs() as logs:
            periodic.start()
            try:
                await job.until_runs(1)
                periodic.wake()
                await job.until_runs(2)
            finally:
                await periodic.stop()
        assert job.finished == 1
        failed = logs.events("background.job_failed")
        assert [(line["job"], line["error"]) for line in failed] == [("flaky", "RuntimeError")]

    async def test_an_unexpected_failure_is_an_error_with_its_traceback_and_a_database_away_a_warning(self) -> None:
        """A bug (any other exception) is logged at error level with its traceback; the database or a peer away
        (OSError here) is a warning with no traceback, since it says nothing about the code."""
        failures: list[BaseException] = [RuntimeError("a bug"), ConnectionRefusedError("database away")]

        async def run() -> None:
            raise failures.pop(0)

        periodic = PeriodicJob("failing", run, interval_seconds=3600, run_at_stop=True)
        with captured_logs() as logs:
            for _ in range(2):
                await periodic.stop()  # never started: each stop runs the job once
        bug, away = logs.events("background.job_failed")
        assert (bug["level"], bug["error"]) == ("error", "RuntimeError")
        assert "Traceback" in bug["exception"]
        assert (away["level"], away["error"]) == ("warning", "ConnectionRefusedError")
        assert "exception" not in away


class TestStop:
    async def test_stop_lets_the_run_in_flight_finish_within_the_deadline(self) -> None:
        """A run blocked when stop is asked completes (it is released within the deadline) and nothing runs
        after it."""
        job = Recorder()
        job.block = asyncio.Event()
        periodic = PeriodicJob("test", job, interval_seconds=0.01)
        periodic.start()
        await job.until_runs(1)
        stopping = asyncio.create_task(periodic.stop(deadline_seconds=DEADLINE))
        await asyncio.sleep(0)
        job.block.set()
        await asyncio.wait_for(stopping, DEADLINE)
        assert (job.runs, job.finished) == (1, 1)
        assert not periodic.running

    async def test_a_run_that_outlives_the_deadline_is_cancelled(self) -> None:
        """A run that never ends is cancelled once the deadline has passed, and stop returns."""
        job = Recorder()
        job.block = asyncio.Event()  # never set
        periodic = PeriodicJob("stuck", job, interval_seconds=3600)
        periodic.start()
        await job.until_runs(1)
        with captured_logs() as logs:
            await asyncio.wait_for(periodic.stop(deadline_seconds=0.05), DEADLINE)
        assert job.finished == 0
        assert not periodic.running
        assert [line["job"] for line in logs.events("background.job_cancelled")] == ["stuck"]

    async def test_a_caller_that_stops_waiting_for_stop_cancels_the_run(self) -> None:
        """The caller's own deadline (a shutdown's) cancels `stop`: the run in flight is cancelled with it, not
        left running behind the caller's back."""
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def stuck() -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        periodic = PeriodicJob("stuck", stuck, interval_seconds=3600)
        periodic.start()
        await asyncio.wait_for(started.wait(), DEADLINE)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(periodic.stop(deadline_seconds=3600), 0.05)
        assert cancelled.is_set()

    async def test_stop_before_start_and_twice_is_harmless(self) -> None:
        """Stopping a job that never ran, or stopping twice, does nothing."""
        periodic = PeriodicJob("test", Recorder(), interval_seconds=1)
        await periodic.stop()
        periodic.start()
        await periodic.stop()
        await periodic.stop()
        assert not periodic.running


class TestRunAtStop:
    async def test_stop_runs_the_job_once_more_after_the_run_in_flight(self) -> None:
        """`run_at_stop` (a buffer's final flush): the run in flight finishes, then exactly one more run, and
        nothing is scheduled after it."""
        job = Recorder()
        job.block = asyncio.Event()
        periodic = PeriodicJob("flush", job, interval_seconds=3600, run_at_stop=True)
        periodic.start()
        await job.until_runs(1)
        stopping = asyncio.create_task(periodic.stop(deadline_seconds=DEADLINE))
        await asyncio.sleep(0)
        assert job.runs == 1
        job.block.set()
        await asyncio.wait_for(stopping, DEADLINE)
        assert (job.runs, job.finished) == (2, 2)
        assert not periodic.running

    async def test_stop_runs_it_even_when_never_started(self) -> None:
        """What was noted before the schedule ever began still gets its final run."""
        job = Recorder()
        periodic = PeriodicJob("flush", job, interval_seconds=3600, run_at_start=False, run_at_stop=True)
        await periodic.stop()
        assert (job.runs, job.finished) == (1, 1)

    async def test_without_it_stop_runs_nothing_more(self) -> None:
        """The default: stop only ends the schedule."""
        job = Recorder()
        periodic = PeriodicJob("test", job, interval_seconds=3600)
        periodic.start()
        await job.until_runs(1)
        await periodic.stop()
        await periodic.stop()
        assert job.runs == 1

    async def test_a_failing_final_run_is_logged_and_stop_returns(self) -> None:
        """The final run raises: `background.job_failed` names the job, and the shutdown goes on."""
        job = Recorder()
        job.failures_left = 1
        periodic = PeriodicJob("flush", job, interval_seconds=3600, run_at_start=False, run_at_stop=True)
        periodic.start()
        with captured_logs() as logs:
            await asyncio.wait_for(periodic.stop(), DEADLINE)
        assert (job.runs, job.finished) == (1, 0)
        assert [(line["job"], line["error"]) for line in logs.events("background.job_failed")] == [
            ("flush", "RuntimeError")
        ]
