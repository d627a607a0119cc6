"""A replica killed between Strava's answer and the commit (the `refresh.before_commit` failpoint), or killed while
its call is at Strava, or frozen (SIGSTOP) after Strava answered; waiters on other replicas when a claim lapses; and
a refresh token rejected because a sibling rotated it, on real processes and the throwaway cluster."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import httpx
import pytest

from tests.e2e.processes import Process, wait_for_log, wait_ready, wait_stopped
from tests.reliability.conftest import ServiceFactory
from tests.reliability.invariants import Harness
from tokensvc import failpoints

# Short claims, so a dead owner's lease lapses within the test (the token deadline must stay under the claim).
SHORT_CLAIMS = {
    "TOKENSVC_REFRESH_CLAIM_SECONDS": "6",
    "TOKENSVC_STRAVA_TOKEN_TIMEOUT_SECONDS": "1",
    "TOKENSVC_REFRESH_WRITE_BUDGET_SECONDS": "2",
}
# Claims long enough that a test's set-up fits in one lease under load, short enough to wait one out. The write
# budget stays at its default (30 s): a frozen owner's late pair has that long.
LEASED = {
    "TOKENSVC_REFRESH_CLAIM_SECONDS": "10",
    "TOKENSVC_STRAVA_TOKEN_TIMEOUT_SECONDS": "5",
}
FREEZE_AFTER_ANSWER = {
    "TOKENSVC_ENABLE_FAILPOINTS": "1",
    "TOKENSVC_FAILPOINTS": "refresh.before_store=stop",
    **LEASED,
}
WAITING = "token.refresh.waiting_for_claim"
TAKEN_OVER = "token.refresh.claim_taken_over"
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


async def kill_at_strava(harness: Harness, owner: Process) -> None:
    """SIGKILL `owner` while its refresh is held at Strava, and let Strava answer the dead connection with a 503
    (so nothing was rotated: the owner died before Strava acted)."""
    owner.popen.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(exit_code, owner) == -signal.SIGKILL
    await harness.http.fault(endpoint="refresh", kind="status", status=503, count=1)
    await harness.http.release()
    async with asyncio.timeout(20):  # until the parked call of the dead owner has taken the fault
        while True:
            if not (await harness.http.control("GET", "/faults"))["pending"]:
                return
            await asyncio.sleep(0.05)


class TestOwnerKilledMidCall:
    async def test_a_dead_owners_claim_is_taken_over_after_its_lease_and_only_its_user_waits(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """A is SIGKILLed while its refresh of `victim` is at Strava (which never acts on it). B, asked for the
        victim, waits on A's claim until the lease lapses, takes it over and refreshes with the stored token (still
        good): the victim was late, not stranded. Meanwhile B serves every other user at once, a due one included:
        they answer before A's lease is over."""
        a, b = services("a", **LEASED), services("b", **LEASED)
        await wait_ready(a, b)
        for user, expires_in in (("victim", -60), ("also-due", -60), ("valid", 6 * 3600)):
            await harness.seed(b, user, expires_in=expires_in)
        await harness.http.hold_refreshes()
        from_a = asyncio.create_task(harness.http.get(f"{a.url}/v1/users/victim/access-token"))
        await harness.http.wait_held()
        lease = await harness.claim("victim")
        assert lease is not None
        await kill_at_strava(harness, a)
        with pytest.raises(httpx.TransportError):
            await from_a

        from_b = asyncio.create_task(harness.http.get(f"{b.url}/v1/users/victim/access-token"))
        await wait_for_log(b, WAITING)
        others = [await harness.http.get(f"{b.url}/v1/users/{u}/access-token") for u in ("also-due", "valid")]
        assert [r.status_code for r in others] == [200, 200], [r.text for r in others]
        answered = max(answer.at for answer in harness.http.answers)
        assert answered < lease.until / 1000, "a bystander waited for the dead owner's lease"
        response = await from_b
        assert response.status_code == 200, response.text
        assert harness.http.answers[-1].at >= lease.until / 1000
        assert response.json()["access_token"] == (await harness.newest("victim"))["access_token"]
        assert TAKEN_OVER in b.log.read_text()
        assert await harness.http.refresh_calls() == 3  # A's (never acted on), also-due's, B's takeover
        await harness.check([a, b])


class TestTwoWaitersWakeTogether:
    async def test_waiters_on_two_replicas_woken_by_a_lapsed_claim_make_one_strava_call(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """A dies holding the claim (killed at Strava, which never acted). B and C are both waiting on the claim
        when it lapses: they wake within one poll of each other, exactly one takes it over and calls Strava, the
        other sees that claim (or the new pair) and gets the same token. One Strava call after A's."""
        a, b, c = services("a", **LEASED), services("b", **LEASED), services("c", **LEASED)
        await wait_ready(a, b, c)
        await harness.seed(b, "victim", expires_in=-60)
        await harness.http.hold_refreshes()
        from_a = asyncio.create_task(harness.http.get(f"{a.url}/v1/users/victim/access-token"))
        await harness.http.wait_held()
        await kill_at_strava(harness, a)
        with pytest.raises(httpx.TransportError):
            await from_a
        # Each waiter waits at most one claim's length from its request: asked with 6 s of A's lease left, both
        # still wait 4 s after it lapses (room for the winner's call, under load).
        await harness.wait_claim_left("victim", 6)
        waiters = [
            asyncio.create_task(harness.http.get(f"{replica.url}/v1/users/victim/access-token")) for replica in (b, c)
        ]
        await wait_for_log(b, WAITING)
        await wait_for_log(c, WAITING)
        answers = await asyncio.gather(*waiters)
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        newest = await harness.newest("victim")
        assert {r.json()["access_token"] for r in answers} == {newest["access_token"]}
        assert await harness.http.refresh_calls() == 2
        assert [TAKEN_OVER in replica.log.read_text() for replica in (b, c)].count(True) == 1
        await harness.check([a, b, c])


class TestFrozenOwner:
    async def test_an_owner_frozen_past_its_lease_after_strava_answered_stores_its_pair_and_nobody_is_flagged(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """A has Strava's new pair and freezes (SIGSTOP) before writing it, past its lease. B takes the lapsed
        claim over, presents the old token, is rejected and, while A's write budget lasts, answers 503 with
        Retry-After and flags nobody. A is continued (SIGCONT) and stores its late pair: A's caller gets it, B
        serves it, nobody was ever `needs_reauth`, and the stored refresh token is Strava's newest."""
        a, b = services("a", **FREEZE_AFTER_ANSWER), services("b", **LEASED)
        await wait_ready(a, b)
        await harness.seed(b, "victim", expires_in=-60)
        await harness.seed(b, "bystander", expires_in=6 * 3600)
        from_a = asyncio.create_task(harness.http.get(f"{a.url}/v1/users/victim/access-token"))
        await wait_for_log(a, "failpoint.triggered name=refresh.before_store")
        await wait_stopped(a)
        try:
            during = await harness.http.get(f"{b.url}/v1/users/victim/access-token")
            assert (during.status_code, during.json()["code"]) == (503, "provider_unavailable"), during.text
            assert int(during.headers["retry-after"]) > 1
            assert TAKEN_OVER in b.log.read_text()
            assert "token.refresh.rejected_owner_pending" in b.log.read_text()
            assert await harness.http.refresh_calls() == 2
            status = (await harness.http.get(f"{b.url}/v1/users/victim/token-status")).json()
            assert (status["needs_reauth"], status["reauth_reason"]) == (False, None)
            assert (await harness.http.get(f"{b.url}/v1/users/bystander/access-token")).status_code == 200
        finally:
            a.popen.send_signal(signal.SIGCONT)
        response = await from_a
        assert response.status_code == 200, response.text
        newest = await harness.newest("victim")
        assert response.json()["access_token"] == newest["access_token"]
        after = await harness.http.get(f"{b.url}/v1/users/victim/access-token")
        assert after.status_code == 200, after.text
        assert after.json()["access_token"] == newest["access_token"]
        assert await harness.stored_refresh_token("victim") == newest["refresh_token"]
        status = (await harness.http.get(f"{b.url}/v1/users/victim/token-status")).json()
        assert (status["status"], status["needs_reauth"]) == ("valid", False)
        assert await harness.http.refresh_calls() == 2
        await harness.check([a, b], retried={"victim"})

    async def test_frozen_past_its_write_budget_too_its_late_pair_clears_the_flag_set_meanwhile(
        self, services: ServiceFactory, harness: Harness
    ) -> None:
        """The same freeze, held past A's write budget (2 s here): B's first attempt is rejected and answers 503;
        once A's budget has passed, B flags the user `refresh_token_invalid` without presenting the dead token
        again (409). A is continued and stores its late pair, which still wins: the flag is cleared, both
        replicas serve the new token, the stored refresh token is Strava's newest."""
        short_budget = {"TOKENSVC_REFRESH_WRITE_BUDGET_SECONDS": "2"}
        a = services("a", **FREEZE_AFTER_ANSWER, **short_budget)
        b = services("b", **LEASED, **short_budget)
        await wait_ready(a, b)
        await harness.seed(b, "victim", expires_in=-60)
        from_a = asyncio.create_task(harness.http.get(f"{a.url}/v1/users/victim/access-token"))
        await wait_for_log(a, "failpoint.triggered name=refresh.before_store")
        await wait_stopped(a)
        try:
            during = await harness.http.get(f"{b.url}/v1/users/victim/access-token")
            assert during.status_code == 503, during.text
            await harness.wait_claim_left("victim", 0)  # B holds the claim until A's write budget has passed
            flagged = await harness.http.get(f"{b.url}/v1/users/victim/access-token")
            assert (flagged.status_code, flagged.json()["reauth_reason"]) == (409, "refresh_token_invalid")
            assert await harness.http.refresh_calls() == 2  # A's, and B's one rejected attempt
        finally:
            a.popen.send_signal(signal.SIGCONT)
        response = await from_a
        assert response.status_code == 200, response.text
        newest = await harness.newest("victim")
        assert response.json()["access_token"] == newest["access_token"]
        status = (await harness.http.get(f"{b.url}/v1/users/victim/token-status")).json()
        assert (status["status"], status["needs_reauth"], status["reauth_reason"]) == ("valid", False, None)
        after = await harness.http.get(f"{b.url}/v1/users/victim/access-token")
        assert after.status_code == 200, after.text
        assert after.json()["access_token"] == newest["access_token"]
        assert await harness.stored_refresh_token("victim") == newest["refresh_token"]
        assert await harness.http.refresh_calls() == 2
        await harness.check([a, b], retried={"victim"})


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
