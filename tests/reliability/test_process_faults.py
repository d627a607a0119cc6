"""A replica killed between Strava's answer and the commit (the `refresh.before_commit` failpoint), and a refresh
token rejected because a sibling rotated it, on real processes and the throwaway cluster."""

from __future__ import annotations

import asyncio
import subprocess

import httpx
import pytest

from tests.e2e.processes import Process, wait_ready
from tests.reliability.conftest import ServiceFactory
from tests.reliability.invariants import Harness
from tokensvc import failpoints

# Short claims, so a dead owner's lease lapses within the test (the token deadline must stay under the claim).
SHORT_CLAIMS = {
    "TOKENSVC_REFRESH_CLAIM_SECONDS": "6",
    "TOKENSVC_STRAVA_TOKEN_TIMEOUT_SECONDS": "1",
    "TOKENSVC_REFRESH_WRITE_BUDGET_SECONDS": "2",
}
KILL_BEFORE_COMMIT = {
    "TOKENSVC_ENABLE_FAILPOINTS": "1",
    "TOKENSVC_FAILPOINTS": "refresh.before_commit=exit",
    **SHORT_CLAIMS,
}


def exit_code(process: Process, deadline: float = 30) -> int:
    try:
        return process.popen.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{process.name} did not exit")


class TestKilledBetweenStravaAndCommit:
    async def test_only_the_in_flight_user_is_stranded_and_the_next_attempt_reports_it_once(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """Replica A dies after Strava rotated and before the commit: the caller's connection drops; replica B
        waits for A's claim to lapse and takes it over, presents the old token, is rejected, and answers 503 while
        A's write budget lasts (A might be frozen, not dead); then the user is flagged refresh_token_invalid (the
        truth: the new pair died with A); no further calls; every other user is fine."""
        a = services("a", **KILL_BEFORE_COMMIT)
        b = services("b", **SHORT_CLAIMS)
        await wait_ready(a, b)
        await harness.seed(b, "victim", expires_in=-60)
        await harness.seed(b, "also-due", expires_in=-60)
        await harness.seed(b, "valid", expires_in=6 * 3600)
        assert (await harness.http.get(f"{a.url}/v1/users/valid/access-token")).status_code == 200  # no refresh

        with pytest.raises(httpx.TransportError):
            await harness.http.get(f"{a.url}/v1/users/victim/access-token")
        assert await asyncio.to_thread(exit_code, a) == failpoints.EXIT_CODE
        assert "failpoint.triggered name=refresh.before_commit" in a.log.read_text()
        assert await harness.http.refresh_calls() == 1

        # A's claim lapses (B waits on it, then takes it over); Strava rejects the old token; while A's write
        # budget lasts that is a 503 (A might yet store its pair), then the user is flagged without presenting the
        # dead token again: one call from B.
        answers = []
        for _ in range(6):
            response = await harness.http.get(f"{b.url}/v1/users/victim/access-token")
            answers.append(response.status_code)
            if response.status_code != 503:
                break
            assert response.headers["retry-after"]
        problem = response.json()
        assert (response.status_code, problem["code"], problem["reauth_reason"]) == (
            409,
            "reauth_required",
            "refresh_token_invalid",
        ), answers
        again = await harness.http.get(f"{b.url}/v1/users/victim/access-token")
        assert again.status_code == 409
        assert await harness.http.refresh_calls() == 2
        assert (await harness.http.get(f"{b.url}/v1/users/also-due/access-token")).status_code == 200
        assert (await harness.http.get(f"{b.url}/v1/users/valid/access-token")).status_code == 200
        assert await harness.http.refresh_calls() == 3
        await harness.check([a, b], stranded={"victim"})


class TestRejectedAfterASiblingsRotation:
    async def test_a_token_rotated_by_a_sibling_is_not_a_false_needs_reauth_but_a_revoked_one_is_flagged(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """A's refresh is held at Strava while another client rotates and imports the newer pair through B: Strava
        rejects A's token, A re-reads, finds the newer pair and serves it; nobody is flagged. A user whose access
        Strava really revoked is flagged (the control case)."""
        a, b = services("a"), services("b")
        await wait_ready(a, b)
        athlete = await harness.seed(a, "racer", expires_in=-60)
        revoked = await harness.seed(a, "gone", expires_in=-60)
        await harness.http.hold_refreshes()
        from_a = asyncio.create_task(harness.http.get(f"{a.url}/v1/users/racer/access-token"))
        await harness.http.wait_held()
        rotated = await harness.http.control("POST", f"/athletes/{athlete['athlete_id']}/rotate")
        harness.clear_tokens |= {rotated["access_token"], rotated["refresh_token"]}
        # A holds a claim, not a lock: B's import does not wait for A's call at Strava.
        imported = await harness.http.put(
            f"{b.url}/v1/users/racer/tokens",
            json={k: rotated[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")},
        )
        await harness.http.release()
        got = await from_a
        assert imported.status_code == 200, imported.text
        assert got.status_code == 200, got.text
        assert got.json()["access_token"] == rotated["access_token"]
        status = (await harness.http.get(f"{b.url}/v1/users/racer/token-status")).json()
        assert (status["status"], status["needs_reauth"]) == ("valid", False)
        assert await harness.http.refresh_calls() == 1

        await harness.http.control("POST", f"/athletes/{revoked['athlete_id']}/revoke")
        response = await harness.http.get(f"{b.url}/v1/users/gone/access-token")
        assert (response.status_code, response.json()["reauth_reason"]) == (409, "refresh_token_invalid")
        await harness.check([a, b], raced={"racer"})
