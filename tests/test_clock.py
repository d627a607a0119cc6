"""The one Clock: the production clock follows the database's time (offset measured, then applied), on SQLite and
Postgres; tests keep injecting their fake one."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import FakeClock, make_settings
from tokensvc.app import open_resources
from tokensvc.clock import DatabaseClock
from tokensvc.db import make_engine

pytestmark = pytest.mark.dialects("sqlite", "postgres")

SKEW = 1000.0  # a replica whose own clock is 1000 s behind the database's


class TestDatabaseClock:
    async def test_the_offset_to_the_database_is_measured_and_applied(self, database_url: str) -> None:
        """A local clock 1000 s slow reads the database's time once synced (within the round trip)."""
        engine = make_engine(database_url)
        try:
            clock = DatabaseClock(local=lambda: time.time() - SKEW)
            assert abs(clock() - (time.time() - SKEW)) < 1  # before the first measurement: local time
            offset = await clock.sync(engine)
            assert abs(offset - SKEW) < 1
            assert abs(clock() - time.time()) < 1
        finally:
            await engine.dispose()

    async def test_open_resources_measures_the_clock_it_is_given_before_anything_uses_it(
        self, database_url: str, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """The service's default clock is a DatabaseClock: synced at start-up, with a job to keep it so."""
        clock = DatabaseClock(local=lambda: time.time() - SKEW)
        async with open_resources(make_settings(database_url), clock=clock, strava_transport=strava_transport) as res:
            assert abs(res.clock() - time.time()) < 1
            assert res.clock_sync is not None

    async def test_without_a_clock_the_database_clock_is_the_default(
        self, sqlite_url: str, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """No clock given: a DatabaseClock, measured at start-up."""
        async with open_resources(make_settings(sqlite_url), strava_transport=strava_transport) as res:
            assert isinstance(res.clock, DatabaseClock)
            assert res.clock_sync is not None
            assert abs(res.clock() - time.time()) < 1

    async def test_a_fake_clock_is_kept_as_it_is(
        self, sqlite_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """Tests inject their own time: nothing measures or replaces it."""
        async with open_resources(make_settings(sqlite_url), clock=clock, strava_transport=strava_transport) as res:
            assert res.clock is clock
            assert res.clock_sync is None

    async def test_a_database_that_is_down_at_start_leaves_local_time_and_does_not_stop_the_start(self) -> None:
        """Unreachable Postgres: the measurement fails quietly; the clock reads local time until a later one."""
        settings = make_settings("postgresql+asyncpg://nobody@127.0.0.1:9/none")
        clock = DatabaseClock(local=lambda: time.time() - SKEW)
        async with open_resources(settings, clock=clock) as res:
            assert abs(res.clock() - (time.time() - SKEW)) < 1
            assert res.clock_sync is not None
