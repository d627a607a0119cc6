"""Strava's bad days against real replicas: 5xx bursts, refused connections, lost answers, 429s, malformed 200s.

Each test ends with `Harness.check` (I1-I6 from the sandbox's ledger, the database and the processes' output).
"""

from __future__ import annotations

import pytest

from tests.e2e.processes import Process, wait_ready
from tests.reliability.conftest import ServiceFactory
from tests.reliability.invariants import Harness
from tests.reliability.switch import Switch


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


class TestConnectionRefused:
    async def test_refused_connections_give_503_keep_tokens_and_recover_when_strava_is_back(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """Nothing listens where Strava should be: 503 provider_unavailable with Retry-After, no Strava call, the
        stored pair unchanged and nobody flagged; once it listens again the next call refreshes."""
        host, port = harness.sandbox.url.removeprefix("http://").rsplit(":", 1)
        switch = Switch(host, int(port))
        await switch.mend()
        try:
            a = services("a", strava_url=switch.url)
            await wait_ready(a)
            athlete = await harness.seed(a, "cut-off", expires_in=-60)
            await switch.cut()
            status, body = await token_of(harness, a, "cut-off")
            assert (status, body["code"]) == (503, "provider_unavailable")
            assert await harness.http.refresh_calls() == 0
            assert await harness.stored_refresh_token("cut-off") == athlete["refresh_token"]
            state = (await harness.http.get(f"{a.url}/v1/users/cut-off/token-status")).json()
            assert (state["status"], state["needs_reauth"]) == ("expired", False)
            assert "could not connect to Strava" in a.log.read_text()

            await switch.mend()
            status, body = await token_of(harness, a, "cut-off")
            assert status == 200
            assert body["access_token"] == (await harness.newest("cut-off"))["access_token"]
            assert await harness.http.refresh_calls() == 1
        finally:
            await switch.cut()
        await harness.check([a])


class TestLostAnswer:
    async def test_an_answer_lost_after_rotation_is_not_retried_and_the_next_attempt_flags_clearly(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """Strava rotates but its answer never arrives: 503, one call, the old pair kept; the next attempt (from
        another replica) presents the old token once, learns it is dead, and flags the user; no third call."""
        a = services("a", TOKENSVC_STRAVA_TIMEOUT_SECONDS="1", TOKENSVC_STRAVA_TOKEN_TIMEOUT_SECONDS="1")
        b = services("b", TOKENSVC_STRAVA_TIMEOUT_SECONDS="1", TOKENSVC_STRAVA_TOKEN_TIMEOUT_SECONDS="1")
        await wait_ready(a, b)
        await harness.seed(a, "unlucky", expires_in=-60)
        await harness.seed(a, "bystander", expires_in=-60)
        await harness.http.fault(endpoint="refresh", kind="lost_answer", hang_seconds=3)
        status, body = await token_of(harness, a, "unlucky")
        assert (status, body["code"]) == (503, "provider_unavailable")
        assert await harness.http.refresh_calls() == 1
        assert "token.refresh.answer_lost" in a.log.read_text()
        for replica in (b, a):
            status, body = await token_of(harness, replica, "unlucky")
            assert (status, body["code"], body["reauth_reason"]) == (409, "reauth_required", "refresh_token_invalid")
        assert await harness.http.refresh_calls() == 2
        assert (await token_of(harness, b, "bystander"))[0] == 200
        await harness.check([a, b], stranded={"unlucky"})


class TestRateLimited:
    @pytest.mark.parametrize("retry_after", [120, None], ids=["with-retry-after", "without-retry-after"])
    async def test_a_429_pauses_refreshes_on_every_replica_while_valid_tokens_are_still_served(
        self, services: ServiceFactory, harness: Harness, retry_after: int | None
    ) -> None:
        """One 429 from Strava: every replica stops calling Strava until the window resets (503
        provider_rate_limited with Retry-After, no call), and tokens that are still valid are served meanwhile."""
        a, b = services("a"), services("b")
        await wait_ready(a, b)
        for user in ("first", "second"):
            await harness.seed(a, user, expires_in=-60)
        await harness.seed(a, "valid", expires_in=6 * 3600)
        await harness.http.fault(endpoint="refresh", kind="status", status=429, retry_after=retry_after)
        status, body = await token_of(harness, a, "first")
        assert (status, body["code"]) == (503, "provider_rate_limited")
        for replica, user in ((b, "second"), (a, "second"), (b, "first")):
            response = await harness.http.get(f"{replica.url}/v1/users/{user}/access-token")
            assert (response.status_code, response.json()["code"]) == (503, "provider_rate_limited")
            ceiling = retry_after if retry_after is not None else 900
            assert 0 < int(response.headers["retry-after"]) <= ceiling
        for replica in (a, b):
            assert (await token_of(harness, replica, "valid"))[0] == 200
        assert await harness.http.refresh_calls() == 1
        await harness.check([a, b])


class TestMalformedSuccess:
    @pytest.mark.parametrize(
        "body", ['{"unexpected": true}', "<html>upstream hiccup</html>"], ids=["missing-fields", "not-json"]
    )
    async def test_a_malformed_200_keeps_the_stored_tokens_and_is_counted_and_logged(
        self, services: ServiceFactory, harness: Harness, body: str
    ) -> None:
        """Strava answers 200 with no usable token response: 503, the stored pair unchanged, nobody flagged,
        the failure logged and counted as transient; the next healthy answer is stored."""
        a = services("a")
        await wait_ready(a)
        athlete = await harness.seed(a, "garbled", expires_in=-60)
        await harness.http.fault(endpoint="refresh", kind="malformed", body=body)
        status, problem = await token_of(harness, a, "garbled")
        assert (status, problem["code"]) == (503, "provider_unavailable")
        assert await harness.stored_refresh_token("garbled") == athlete["refresh_token"]
        state = (await harness.http.get(f"{a.url}/v1/users/garbled/token-status")).json()
        assert (state["status"], state["needs_reauth"]) == ("expired", False)
        assert "Strava answered 200" in a.log.read_text()
        scraped = (await harness.http.get(f"{a.url}/metrics")).text
        assert 'tokensvc_refresh_total{outcome="transient",trigger="access_token"} 1.0' in scraped
        assert (await token_of(harness, a, "garbled"))[0] == 200
        assert await harness.http.refresh_calls() == 2
        await harness.check([a])
