"""The background sweeper, the shared rate budget and backoff, on SQLite and Postgres, with an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock, Seeded, make_settings, seed_user, tasks_finished
from tokensvc.app import Resources, open_resources
from tokensvc.backoff import backoff_seconds
from tokensvc.config import Settings
from tokensvc.errors import ProviderRateLimited
from tokensvc.sandbox import FaultSpec, SandboxState
from tokensvc.service.tokens import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS
from tokensvc.status import Status

pytestmark = pytest.mark.dialects("sqlite", "postgres")

DUE_NOW = 900  # with the 1800 s buffer and a jitter of at most 899 s, such a user is due at once


async def seed_many(res: Resources, sandbox: SandboxState, clock: FakeClock, n: int, expires_in: int) -> list[Seeded]:
    return [await seed_user(res, sandbox, clock, expires_in=expires_in) for _ in range(n)]


async def failure_count(res: Resources, user_id: str) -> int:
    async with res.engine.connect() as conn:
        query = sa.text("SELECT failure_count FROM user_tokens WHERE user_id = :u")
        return int((await conn.execute(query, {"u": user_id})).scalar_one())


async def sweep_at(res: Resources, user_id: str) -> int:
    async with res.engine.connect() as conn:
        query = sa.text("SELECT sweep_at FROM user_tokens WHERE user_id = :u")
        return int((await conn.execute(query, {"u": user_id})).scalar_one())


class TestSweep:
    async def test_a_sweep_refreshes_every_due_user_once_and_leaves_the_rest(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Due users are refreshed; valid ones are not touched; a second sweep finds nothing to do."""
        due = await seed_many(resources, sandbox, clock, 5, expires_in=DUE_NOW)
        due += await seed_many(resources, sandbox, clock, 2, expires_in=-100)
        await seed_many(resources, sandbox, clock, 3, expires_in=20_000)
        report = await resources.sweeper.sweep_once()
        assert (report.checked, report.refreshed, report.failed, report.needs_reauth) == (7, 7, 0, 0)
        assert sandbox.calls["refresh"] == 7
        assert {int(k) for k in sandbox.refresh_by_athlete} == {u.athlete_id for u in due}
        for user in due:
            assert (await resources.service.status(user.user_id)).status is Status.VALID
        again = await resources.sweeper.sweep_once()
        assert again.checked == 0
        assert sandbox.calls["refresh"] == 7

    async def test_users_connected_at_the_same_moment_are_spread_over_half_the_buffer(
        self, resources: Resources
    ) -> None:
        """The per-user jitter puts the sweep time between buffer and buffer/2 before expiry, spread out."""
        service = resources.service
        times = [service.sweep_at(f"user-{i}", 2_000_000_000) for i in range(200)]
        earliest, latest = 2_000_000_000 - 1800, 2_000_000_000 - 900
        assert all(earliest <= t < latest for t in times)
        assert max(times) - min(times) > 600
        assert len(set(times)) > 150

    async def test_the_bulk_endpoint_reports_in_the_contract_shape(
        self, resources: Resources, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """POST /v1/refresh-sweep: {checked, refreshed, failed, needs_reauth}."""
        user = await seed_user(resources, sandbox, clock, expires_in=DUE_NOW)
        revoked = await seed_user(resources, sandbox, clock, expires_in=-5)
        sandbox.revoke(revoked.athlete_id)
        response = await client.post("/v1/refresh-sweep")
        assert response.status_code == 200
        assert response.json() == {"checked": 2, "refreshed": 1, "failed": 0, "needs_reauth": 1}
        assert (await client.get(f"/v1/users/{user.user_id}/token-status")).json()["status"] == "valid"


class TestNoRefreshStorms:
    async def test_a_transient_failure_backs_the_user_off_exponentially(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """After a failure the sweeper waits before trying the user again, longer after each failure."""
        user = await seed_user(resources, sandbox, clock, expires_in=-100)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=500, count=2))
        first = await resources.sweeper.sweep_once()
        assert (first.checked, first.failed) == (1, 1)
        retry_at = await sweep_at(resources, user.user_id)
        assert clock.now + 15 <= retry_at <= clock.now + 30  # first backoff: 15..30 s
        assert (await resources.sweeper.sweep_once()).checked == 0  # backing off: no second call right away
        assert sandbox.calls["refresh"] == 1
        clock.now = retry_at
        assert (await resources.sweeper.sweep_once()).failed == 1
        assert await failure_count(resources, user.user_id) == 2
        retry_at = await sweep_at(resources, user.user_id)
        assert clock.now + 30 <= retry_at <= clock.now + 60  # second backoff: 30..60 s
        clock.now = retry_at - 1
        assert (await resources.sweeper.sweep_once()).checked == 0
        clock.now = retry_at
        assert (await resources.sweeper.sweep_once()).refreshed == 1
        assert await failure_count(resources, user.user_id) == 0
        assert sandbox.calls["refresh"] == 3

    async def test_the_access_token_background_refresh_waits_out_the_backoff_too(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A due-but-usable token keeps being served; after a failed background refresh no new one starts until
        the backoff has passed, however often callers ask."""
        user = await seed_user(resources, sandbox, clock, expires_in=1000)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=500))
        service = resources.service
        async with tasks_finished():
            await service.access_token(user.user_id, min_ttl=300)
        assert sandbox.calls["refresh"] == 1
        for _ in range(5):
            async with tasks_finished():
                assert (await service.access_token(user.user_id, min_ttl=300)).access_token == user.access_token
        assert sandbox.calls["refresh"] == 1
        clock.now = await sweep_at(resources, user.user_id)
        async with tasks_finished():
            await service.access_token(user.user_id, min_ttl=300)
        assert sandbox.calls["refresh"] == 2
        assert (await service.status(user.user_id)).status is Status.VALID

    def test_backoff_grows_and_is_capped(self) -> None:
        """About 30 s, 60 s, 120 s … never above an hour; jittered within the upper half."""
        for failures, ceiling in [(1, 30), (2, 60), (3, 120), (8, 3600), (50, 3600)]:
            samples = [refresh_backoff(failures) for _ in range(50)]
            assert all(ceiling // 2 <= s <= ceiling for s in samples), (failures, samples)
        assert refresh_backoff(1000) <= BACKOFF_CAP_SECONDS

    async def test_a_user_who_must_reconnect_is_never_retried(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """needs_reauth users are out of the sweep until they connect again."""
        user = await seed_user(resources, sandbox, clock, expires_in=-100)
        sandbox.revoke(user.athlete_id)
        assert (await resources.sweeper.sweep_once()).needs_reauth == 1
        clock.advance(100_000)
        assert (await resources.sweeper.sweep_once()).checked == 0
        assert sandbox.calls["refresh"] == 1


@pytest.fixture
async def replicas(
    settings: Settings, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
) -> AsyncIterator[list[Resources]]:
    """Three services with their own engines on one database, as three processes would be."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_resources(settings, clock=clock, strava_transport=strava_transport))
            for _ in range(3)
        ]


class TestRateBudget:
    @pytest.fixture
    def settings(self, database_url: str) -> Settings:
        return make_settings(database_url)  # the defaults: 200,2000 overall, 100,1000 read, 6 token calls

    async def test_token_calls_take_no_unit_so_a_sweep_is_not_stopped_by_the_budget(
        self, replicas: list[Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava does not count /oauth/token: more due users than the background share of the 15-minute window
        (100 of 200) are all refreshed by one sweep, and the shared count stays at 0."""
        first = replicas[0]
        await seed_many(first, sandbox, clock, 170, expires_in=-100)
        report = await first.sweeper.sweep_once()
        assert (report.refreshed, report.failed) == (170, 0)
        assert sandbox.calls["refresh"] == 170
        state = await replicas[1].budget.state()
        assert (state.used_15min, state.used_daily, state.read_used_15min) == (0, 0, 0)

    async def test_a_revoke_takes_an_overall_unit_and_no_read_unit(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        await resources.service.delete(user.user_id)
        assert sandbox.calls["revoke"] == 1
        state = await resources.budget.state()
        assert (state.used_15min, state.used_daily) == (1, 1)
        assert (state.read_used_15min, state.read_used_daily) == (0, 0)

    async def test_a_spent_overall_window_defers_the_revoke_but_still_deletes(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        for _ in range(200):
            await resources.budget.acquire("on_demand")
        with pytest.raises(ProviderRateLimited):
            await resources.budget.acquire("on_demand")
        await resources.service.delete(user.user_id)
        assert (sandbox.calls["revoke"], sandbox.calls["deauthorize"]) == (0, 0)
        assert (await resources.service.status(user.user_id)).status is Status.MISSING

    async def test_reads_are_charged_to_the_read_window_as_well(self, resources: Resources, clock: FakeClock) -> None:
        """The read window (100 per 15 min; the background share 50) runs out before the overall one (200)."""
        budget = resources.budget
        for _ in range(50):
            await budget.acquire("sweep", read=True)
        with pytest.raises(ProviderRateLimited) as spent:
            await budget.acquire("sweep", read=True)
        assert "read" in str(spent.value)
        await budget.acquire("sweep")  # an overall-only call still has room
        await budget.acquire("on_demand", read=True)  # and an on-demand read the rest of the read window
        state = await budget.state()
        assert (state.used_15min, state.read_used_15min, state.read_used_daily) == (52, 51, 51)
        clock.advance(spent.value.retry_after)
        await budget.acquire("sweep", read=True)  # a new window
        assert (await budget.state()).read_used_15min == 1

    @pytest.mark.postgres
    async def test_token_calls_are_bounded_per_process(
        self, pg_url: str, sandbox: SandboxState, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """TOKENSVC_STRAVA_TOKEN_CONCURRENCY: with 2, no more than 2 refreshes are at Strava at once (Postgres: on
        SQLite refreshes serialise on the write lock anyway)."""
        settings = make_settings(pg_url, strava_token_concurrency=2)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
            users = await seed_many(res, sandbox, clock, 5, expires_in=-100)
            sandbox.gate.hold("refresh")
            tasks = [asyncio.create_task(res.service.refresh(u.user_id)) for u in users]
            await asyncio.wait_for(sandbox.gate.wait_held(2), timeout=10)
            with pytest.raises(TimeoutError):  # a third never arrives while the two are held
                await asyncio.wait_for(sandbox.gate.wait_held(3), timeout=0.5)
            assert res.strava.token_slots.locked()
            sandbox.gate.release()
            results = await asyncio.gather(*tasks)
        assert all(r.refreshed for r in results)
        assert sandbox.calls["refresh"] == 5

    @pytest.mark.postgres
    async def test_a_sweep_at_defaults_keeps_its_calls_at_strava_holding_no_connection_and_leaves_slots_to_users(
        self, pg_url: str, sandbox: SandboxState, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """Default settings (pool 5, sweep concurrency 6 of 32 token slots): the sweep keeps its 6 calls at Strava
        at once, more than the pool has connections; meanwhile every connection of the pool can be taken by other
        work, and a user's on-demand refresh still reaches Strava beside them (Postgres: on SQLite refreshes
        serialise on the write lock)."""
        settings = make_settings(pg_url)
        slots = settings.sweep_concurrency
        assert slots < settings.strava_token_concurrency
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
            await seed_many(res, sandbox, clock, 2 * slots, expires_in=-100)
            sandbox.gate.hold("refresh")
            sweep = asyncio.create_task(res.sweeper.sweep_once())
            await asyncio.wait_for(sandbox.gate.wait_held(slots), timeout=10)
            async with AsyncExitStack() as stack:  # the whole pool, while the sweep's calls wait at Strava
                for _ in range(settings.db_pool_size):
                    await stack.enter_async_context(res.engine.connect())
            user = await seed_user(res, sandbox, clock, expires_in=600)  # expiring soon: a user asks for it
            asked = asyncio.create_task(res.service.refresh(user.user_id))
            await asyncio.wait_for(sandbox.gate.wait_held(slots + 1), timeout=10)
            sandbox.gate.release()
            report = await sweep
            assert (await asked).refreshed
        assert report.refreshed == report.checked == 2 * slots
        assert sandbox.calls["refresh"] == 2 * slots + 1

    async def test_a_429_pauses_every_replica_until_the_window_resets(
        self, replicas: list[Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava says 429 to one replica: no replica calls Strava until then; valid tokens are still served."""
        a, b, c = replicas
        valid = await seed_user(a, sandbox, clock, expires_in=20_000)
        due = await seed_many(a, sandbox, clock, 2, expires_in=-100)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=429, retry_after=120))
        with pytest.raises(ProviderRateLimited):
            await a.service.refresh(due[0].user_id)
        calls = sandbox.calls["refresh"]
        with pytest.raises(ProviderRateLimited) as paused:
            await b.service.refresh(due[1].user_id)
        assert paused.value.retry_after <= 120
        assert (await c.sweeper.sweep_once()).refreshed == 0
        assert sandbox.calls["refresh"] == calls  # nobody called Strava during the pause
        assert (await b.service.access_token(valid.user_id, min_ttl=300)).access_token == valid.access_token
        assert (await c.service.status(due[1].user_id)).status is Status.EXPIRED
        clock.advance(120)
        assert (await b.service.refresh(due[1].user_id)).refreshed is True


@pytest.mark.dialects("postgres")
class TestReplicasShareTheSweep:
    async def test_three_replicas_sweeping_at_once_refresh_each_due_user_exactly_once(
        self, replicas: list[Resources], sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """SKIP LOCKED claims and leases split the due users between replicas: one Strava call per user."""
        users = await seed_many(replicas[0], sandbox, clock, 60, expires_in=-100)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="latency", latency_ms=20, count=60))
        for replica in replicas:
            replica.sweeper.batch_size = 7
            replica.sweeper.concurrency = 3
        reports = await asyncio.gather(*(r.sweeper.sweep_once() for r in replicas))
        assert sum(r.refreshed for r in reports) == 60
        assert all(r.refreshed > 0 for r in reports)  # they really shared the work
        assert sandbox.calls["refresh"] == 60
        assert sorted(sandbox.refresh_by_athlete.values()) == [1] * 60
        assert {int(a) for a in sandbox.refresh_by_athlete} == {u.athlete_id for u in users}


class TestShutdown:
    async def test_stopping_mid_sweep_finishes_in_flight_refreshes_and_gives_the_rest_back(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """In-flight refreshes commit; claimed users not started are due again at once; nothing is half-done."""
        users = await seed_many(resources, sandbox, clock, 10, expires_in=-100)
        sweeper = resources.sweeper
        sweeper.concurrency = 2
        sandbox.gate.hold("refresh")
        sweep = asyncio.create_task(sweeper.sweep_once())
        # SQLite serialises refreshes on its write lock: the second worker waits in the database, not at Strava.
        at_strava = 2 if resources.engine.dialect.name == "postgresql" else 1
        await asyncio.wait_for(sandbox.gate.wait_held(at_strava), timeout=10)
        sweeper.request_stop()
        sandbox.gate.release()
        report = await sweep
        await sweeper.stop()
        # the refreshes already under way (at Strava, or holding their user's lock for a Strava slot) finished
        assert at_strava <= report.checked == report.refreshed <= 3
        assert await sweeper.count_due() == 10 - report.checked
        refreshed = [u for u in users if u.athlete_id in sandbox.refresh_by_athlete]
        for user in refreshed:
            status = await resources.service.status(user.user_id)
            assert status.status is Status.VALID
        assert sandbox.stats()["ledger_violations"] == []


class TestStravaHeaders:
    async def test_stravas_reported_usage_raises_the_shared_count(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A response with X-RateLimit-Usage (deauthorize carries it) lifts our window count to Strava's."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        assert (await resources.budget.state()).used_15min == 0
        await resources.service.delete(user.user_id)
        # what the sandbox sent with that answer: its count, and no call since
        reported = int(sandbox.rate.headers(clock())["X-RateLimit-Usage"].split(",")[0])
        assert reported >= 1
        assert (await resources.budget.state()).used_15min == reported


def refresh_backoff(failures: int) -> int:
    """The delay `TokenService` records after a failed automatic refresh."""
    return int(backoff_seconds(failures, first=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS))
