"""The database restarted mid-refresh, on the throwaway cluster: before the Strava call, and after it; and one
replica's database connection cut after Strava answered while another replica takes its lapsed claim over."""

from __future__ import annotations

import asyncio

from tests.e2e.processes import wait_for_log, wait_ready
from tests.reliability.conftest import ServiceFactory
from tests.reliability.invariants import Harness
from tests.reliability.switch import Switch

# Claims long enough that the set-up fits in one lease under load, short enough to wait one out; the write budget
# stays at its default (30 s).
LEASED = {
    "TOKENSVC_REFRESH_CLAIM_SECONDS": "10",
    "TOKENSVC_STRAVA_TOKEN_TIMEOUT_SECONDS": "5",
}


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

    async def test_a_replica_cut_off_from_the_database_stores_its_pair_although_another_took_its_claim_over(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """A reaches Postgres through a switch. A's refresh is at Strava when the switch is cut (A alone loses the
        database); Strava rotates; A keeps the pair and retries its write. B, asked meanwhile, waits for A's claim to
        lapse, takes it over, presents the old token, is rejected and answers 503 without flagging anyone (A's
        write budget still runs). The switch is mended: A's late write lands, both replicas serve the new pair,
        the database holds Strava's newest refresh token, nobody was `needs_reauth`."""
        switch = Switch("127.0.0.1", harness.cluster.port)
        await switch.mend()
        try:
            b = services("b", **LEASED)
            await wait_ready(b)
            via_switch = f"postgresql+asyncpg://postgres@127.0.0.1:{switch.port}/{harness.database}"
            a = services("a", TOKENSVC_DATABASE_URL=via_switch, **LEASED)
            await wait_ready(a)
            await harness.seed(b, "midway", expires_in=-60)
            await harness.http.hold_refreshes()
            caller = asyncio.create_task(harness.http.get(f"{a.url}/v1/users/midway/access-token"))
            await harness.http.wait_held()
            await switch.cut()
            await harness.http.release()
            await wait_for_log(a, "token.refresh.write_failed_retrying")

            during = await harness.http.get(f"{b.url}/v1/users/midway/access-token")
            assert (during.status_code, during.json()["code"]) == (503, "provider_unavailable"), during.text
            assert int(during.headers["retry-after"]) > 1
            assert "token.refresh.claim_taken_over" in b.log.read_text()
            assert await harness.http.refresh_calls() == 2
            status = (await harness.http.get(f"{b.url}/v1/users/midway/token-status")).json()
            assert (status["needs_reauth"], status["reauth_reason"]) == (False, None)
            assert not caller.done()
            await switch.mend()

            response = await caller
            newest = await harness.newest("midway")
            assert response.status_code == 200, response.text
            assert response.json()["access_token"] == newest["access_token"]
            after = await harness.http.get(f"{b.url}/v1/users/midway/access-token")
            assert after.status_code == 200, after.text
            assert after.json()["access_token"] == newest["access_token"]
            assert await harness.stored_refresh_token("midway") == newest["refresh_token"]
            status = (await harness.http.get(f"{b.url}/v1/users/midway/token-status")).json()
            assert (status["status"], status["needs_reauth"]) == ("valid", False)
            assert await harness.http.refresh_calls() == 2
            await harness.check([a, b], retried={"midway"})
        finally:
            await switch.cut()
