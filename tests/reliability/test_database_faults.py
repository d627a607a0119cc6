"""The database restarted mid-refresh, on the throwaway cluster: before the Strava call, and after it."""

from __future__ import annotations

import asyncio

from tests.e2e.processes import Process, wait_ready
from tests.reliability.conftest import ServiceFactory
from tests.reliability.invariants import Harness

DEADLINE = 30.0


async def wait_for_log(process: Process, event: str, deadline: float = DEADLINE) -> None:
    """A bounded condition wait on a process's log (the only place the event is observable from outside)."""
    async with asyncio.timeout(deadline):
        while True:
            if event in process.log.read_text():
                return
            await asyncio.sleep(0.05)


class TestDatabaseDownBeforeTheStravaCall:
    async def test_a_refresh_without_its_database_is_refused_with_503_and_never_reaches_strava(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """Postgres is down when a refresh is due: 503 database_unavailable with Retry-After, no Strava call;
        after Postgres is back, the same call refreshes once."""
        a = services("a")
        await wait_ready(a)
        await harness.seed(a, "due", expires_in=-60)
        await asyncio.to_thread(harness.cluster.stop)
        for path in ("access-token", "token-status"):
            response = await harness.http.get(f"{a.url}/v1/users/due/{path}")
            assert (response.status_code, response.json()["code"]) == (503, "database_unavailable")
            assert response.headers["retry-after"].isdigit()
        assert await harness.http.refresh_calls() == 0
        await asyncio.to_thread(harness.cluster.start)

        response = await harness.http.get(f"{a.url}/v1/users/due/access-token")
        assert response.status_code == 200, response.text
        assert response.json()["access_token"] == (await harness.newest("due"))["access_token"]
        assert await harness.http.refresh_calls() == 1
        await harness.check([a])


class TestDatabaseDownAfterTheStravaCall:
    async def test_the_new_pair_is_kept_in_memory_and_stored_when_the_database_returns_within_the_budget(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """The refresh is held at Strava while Postgres stops; Strava rotates; the write fails; Postgres comes back
        within the write budget: the caller gets the new token and the database holds Strava's newest pair."""
        a = services("a")
        await wait_ready(a)
        await harness.seed(a, "midway", expires_in=-60)
        await harness.seed(a, "bystander", expires_in=6 * 3600)
        await harness.http.hold_refreshes()
        caller = asyncio.create_task(harness.http.get(f"{a.url}/v1/users/midway/access-token"))
        await harness.http.wait_held()
        await asyncio.to_thread(harness.cluster.stop)
        await harness.http.release()
        await wait_for_log(a, "token.refresh.write_failed_retrying")
        assert not caller.done()
        await asyncio.to_thread(harness.cluster.start)

        response = await caller
        assert response.status_code == 200, response.text
        newest = await harness.newest("midway")
        assert response.json()["access_token"] == newest["access_token"]
        assert await harness.stored_refresh_token("midway") == newest["refresh_token"]
        assert await harness.http.refresh_calls() == 1
        status = (await harness.http.get(f"{a.url}/v1/users/midway/token-status")).json()
        assert (status["status"], status["needs_reauth"]) == ("valid", False)
        assert (await harness.http.get(f"{a.url}/v1/users/bystander/access-token")).status_code == 200
        await harness.check([a])

    async def test_a_second_replica_trying_meanwhile_neither_calls_strava_nor_spoils_the_late_write(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """A's refresh is at Strava when Postgres stops; Strava rotates; A keeps the pair and retries its write.
        B is asked for the same user during the outage (503, no Strava call) and again once Postgres is back
        (it waits on A's durable claim or finds A's pair): A's pair is stored, one Strava call in all, no flag."""
        a, b = services("a"), services("b")
        await wait_ready(a, b)
        await harness.seed(a, "midway", expires_in=-60)
        await harness.http.hold_refreshes()
        caller = asyncio.create_task(harness.http.get(f"{a.url}/v1/users/midway/access-token"))
        await harness.http.wait_held()
        await asyncio.to_thread(harness.cluster.stop)
        await harness.http.release()
        await wait_for_log(a, "token.refresh.write_failed_retrying")
        during = await harness.http.get(f"{b.url}/v1/users/midway/access-token")
        assert during.status_code == 503, during.text
        await asyncio.to_thread(harness.cluster.start)
        after = await harness.http.get(f"{b.url}/v1/users/midway/access-token")
        response = await caller

        newest = await harness.newest("midway")
        assert response.status_code == 200, response.text
        assert after.status_code == 200, after.text
        assert response.json()["access_token"] == after.json()["access_token"] == newest["access_token"]
        assert await harness.stored_refresh_token("midway") == newest["refresh_token"]
        assert await harness.http.refresh_calls() == 1
        status = (await harness.http.get(f"{b.url}/v1/users/midway/token-status")).json()
        assert (status["status"], status["needs_reauth"]) == ("valid", False)
        await harness.check([a, b])
