"""Sweeping the athletes who are used (issue 10 item 2), on SQLite and Postgres, with an injected clock: a last-use
table written in coalesced batches, idle users moved out of the sweep to one keep-alive refresh per period."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock, Seeded, make_settings, seed_user
from tokensvc.app import Resources
from tokensvc.config import Settings
from tokensvc.sandbox import SandboxState
from tokensvc.service.sweeper import SweepReport

pytestmark = pytest.mark.dialects("sqlite", "postgres")

HOUR, DAY = 3600, 86_400


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, sweep_active_days=1, sweep_idle_keepalive_days=2)


async def last_used(res: Resources, user_id: str) -> int | None:
    async with res.engine.connect() as conn:
        query = sa.text("SELECT last_used_at FROM token_usage WHERE user_id = :u")
        value = (await conn.execute(query, {"u": user_id})).scalar_one_or_none()
    return None if value is None else int(value)


async def version(res: Resources, user_id: str) -> int:
    async with res.engine.connect() as conn:
        query = sa.text("SELECT version FROM user_tokens WHERE user_id = :u")
        return int((await conn.execute(query, {"u": user_id})).scalar_one())


async def sweep_hourly(res: Resources, clock: FakeClock, hours: int) -> list[tuple[float, SweepReport]]:
    """A sweep every hour of fake time; the reports of the sweeps that touched anybody, with their time."""
    touched = []
    for _ in range(hours):
        clock.advance(HOUR)
        report = await res.sweeper.sweep_once()
        if report.checked or report.idle:
            touched.append((clock(), report))
    return touched


class TestLastUse:
    async def test_uses_are_coalesced_and_written_without_touching_the_token_row(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await seed_user(resources, sandbox, clock, expires_in=5 * HOUR)  # the import is a use
        usage = resources.usage
        assert usage is not None
        assert await last_used(resources, user.user_id) is None  # only in memory so far: off the request path
        assert await usage.flush() == 1
        assert await last_used(resources, user.user_id) == int(clock())
        before = await version(resources, user.user_id)
        clock.advance(60)
        await resources.service.access_token(user.user_id, min_ttl=300)
        assert usage.pending == 0  # within 5 minutes of the last write: coalesced away
        clock.advance(300)
        for _ in range(3):
            await resources.service.access_token(user.user_id, min_ttl=300)
        assert usage.pending == 1
        assert await usage.flush() == 1
        assert await last_used(resources, user.user_id) == int(clock())
        assert await version(resources, user.user_id) == before  # no version bump (so no token-cache NOTIFY)
        await resources.service.status(user.user_id)  # a status read is not a use
        assert usage.pending == 0


class TestIdleAthletes:
    async def seed_idle(self, res: Resources, sandbox: SandboxState, clock: FakeClock) -> Seeded:
        """A user nobody asks about after its import; swept while active (1 day), then idle."""
        user = await seed_user(res, sandbox, clock, expires_in=6 * HOUR)
        active = await sweep_hourly(res, clock, 30)
        assert sum(r.refreshed for _, r in active) >= 4  # swept about every 5.5 hours while active
        return user

    async def test_an_idle_athlete_gets_one_keepalive_per_period_and_nothing_else(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await self.seed_idle(resources, sandbox, clock)
        refreshes_before = sandbox.refresh_by_athlete[user.athlete_id]
        touched = await sweep_hourly(resources, clock, 10 * 24)  # 10 days: 5 keep-alive periods of 2 days
        refreshed_at = [at for at, r in touched if r.refreshed]
        # one keep-alive per period, and nothing else: each period one refresh and one look (moving it out)
        assert len(refreshed_at) in (4, 5)
        assert all(2 * DAY <= b - a <= 2 * DAY + HOUR for a, b in itertools.pairwise(refreshed_at))
        assert sum(r.checked for _, r in touched) == len(refreshed_at)
        assert sum(r.idle for _, r in touched) <= len(refreshed_at) + 1
        assert sandbox.refresh_by_athlete[user.athlete_id] == refreshes_before + len(refreshed_at)
        stats = await resources.stats.stats()
        assert (stats.users.active, stats.users.idle) == (0, 1)

    async def test_asked_about_again_it_is_swept_again(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await self.seed_idle(resources, sandbox, clock)
        quiet = await sweep_hourly(resources, clock, 24)  # idle, between keep-alives: nobody refreshes it
        assert sum(r.refreshed for _, r in quiet) <= 1
        await resources.service.access_token(user.user_id, min_ttl=300)  # on demand, as today
        after = await sweep_hourly(resources, clock, 24)
        assert sum(r.refreshed for _, r in after) >= 4  # back on the ordinary schedule
        stats = await resources.stats.stats()
        assert (stats.users.active, stats.users.idle) == (1, 0)

    async def test_active_days_0_sweeps_everyone(
        self, database_url: str, sandbox: SandboxState, clock: FakeClock, strava_transport: object
    ) -> None:
        from tokensvc.app import open_resources

        settings = make_settings(database_url, sweep_active_days=0)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:  # type: ignore[arg-type]
            await seed_user(res, sandbox, clock, expires_in=6 * HOUR)
            touched = await sweep_hourly(res, clock, 4 * 24)
            assert sum(r.refreshed for _, r in touched) >= 16
            assert sum(r.idle for _, r in touched) == 0
            stats = await res.stats.stats()
            assert (stats.users.active, stats.users.idle) == (1, 0)

    async def test_what_is_noted_is_written_at_shutdown(
        self, database_url: str, sandbox: SandboxState, clock: FakeClock, strava_transport: object
    ) -> None:
        """The uses and gateway outcomes still in memory when the replica closes are written by the close (their
        jobs' final run), not lost."""
        from tokensvc.app import open_resources
        from tokensvc.db import make_engine

        settings = make_settings(database_url)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:  # type: ignore[arg-type]
            user = await seed_user(res, sandbox, clock, expires_in=5 * HOUR)  # the import is a use
            assert res.gateway_tally is not None
            res.gateway_tally.note("ok")
            assert await last_used(res, user.user_id) is None
        engine = make_engine(database_url)
        try:
            async with engine.connect() as conn:
                used = (await conn.execute(sa.text("SELECT count(*) FROM token_usage"))).scalar_one()
                calls = (await conn.execute(sa.text("SELECT sum(count) FROM gateway_counts"))).scalar_one()
        finally:
            await engine.dispose()
        assert (used, calls) == (1, 1)
