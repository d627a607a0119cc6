"""Strava's bad days against real replicas: 5xx bursts, refused connections, lost answers, 429s, malformed 200s.

Each test ends with `Harness.check` (I1-I6 from the sandbox's ledger, the database and the processes' output).
"""

from __future__ import annotations

from tests.e2e.processes import Process, wait_ready
from tests.reliability.conftest import ServiceFactory
from tests.reliability.invariants import Harness


async def token_of(harness: Harness, replica: Process, user_id: str) -> tuple[int, dict[str, object]]:
    response = await harness.http.get(f"{replica.url}/v1/users/{user_id}/access-token")
    body: dict[str, object] = response.json()
    return response.status_code, body


class TestFiveHundredBurst:
    async def test_a_5xx_burst_gives_503_keeps_tokens_and_recovers_when_it_ends(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """500/502/503 from Strava: each caller gets 503 provider_unavailable with Retry-After, the stored pair and
        status are unchanged, nobody is flagged; once Strava is well again the next call refreshes."""
        a, b = services("a"), services("b")
        await wait_ready(a, b)
        athlete = await harness.seed(a, "burst", expires_in=-60)
        await harness.seed(a, "bystander", expires_in=6 * 3600)
        for status in (500, 502, 503):
            await harness.http.fault(endpoint="refresh", kind="status", status=status)
        for replica in (a, b, a):
            status, body = await token_of(harness, replica, "burst")
            assert (status, body["code"]) == (503, "provider_unavailable")
        assert await harness.http.refresh_calls() == 3
        assert await harness.stored_refresh_token("burst") == athlete["refresh_token"]
        state = (await harness.http.get(f"{b.url}/v1/users/burst/token-status")).json()
        assert (state["status"], state["needs_reauth"]) == ("expired", False)
        assert (await token_of(harness, b, "bystander"))[0] == 200

        status, body = await token_of(harness, b, "burst")
        assert status == 200
        assert body["access_token"] == (await harness.newest("burst"))["access_token"]
        assert await harness.http.refresh_calls() == 4
        await harness.check([a, b])
