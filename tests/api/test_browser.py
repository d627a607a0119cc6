"""The browser endpoints: sessions, the dashboard's on-mount refresh, CSRF and CORS, and never a token."""

from __future__ import annotations

import httpx
import pytest

from tests.api.test_tokens_api import assert_problem, put_user
from tests.conftest import API_KEY, APP_ORIGIN, STRAVA_TEST_BASE, FakeClock, Seeded
from tokensvc.sandbox import FaultSpec, SandboxState

JSON = {"Content-Type": "application/json"}
REAUTH = "Failed to refresh Strava tokens. Please re-authenticate with Strava."


async def session_for(client: httpx.AsyncClient, user_id: str) -> str:
    token: str = (await client.post(f"/v1/users/{user_id}/session")).json()["session_token"]
    return token


def browser(client: httpx.AsyncClient, session: str | None) -> dict[str, str]:
    """Headers as a browser page would send them: no API key, the session cookie, JSON."""
    headers = {"Authorization": "", **JSON}
    if session is not None:
        headers["Cookie"] = f"tokensvc_session={session}"
    return headers


async def proactive(client: httpx.AsyncClient, session: str | None, **extra_headers: str) -> httpx.Response:
    return await client.post("/proactive-token-refresh", headers=browser(client, session) | extra_headers, json={})


def assert_no_token(response: httpx.Response, *users: Seeded, sandbox: SandboxState) -> None:
    for user in users:
        newest = sandbox.snapshot(user.athlete_id)
        for token in (user.access_token, user.refresh_token, newest["access_token"], newest["refresh_token"]):
            assert token not in response.text


class TestProactiveRefresh:
    async def test_a_valid_user_gets_success_without_a_refresh_and_without_a_token(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """200 in the shape the dashboard expects; no Strava call; no token in the body."""
        user = await put_user(client, sandbox, clock, expires_in=10_000)
        response = await proactive(client, await session_for(client, user.user_id))
        assert response.status_code == 200
        body = response.json()
        assert (body["success"], body["refreshed"], body["message"]) == (
            True,
            False,
            "Tokens are still valid - no refresh needed",
        )
        assert body["token_status"]["status"] == "valid"
        assert sandbox.calls["refresh"] == 0
        assert_no_token(response, user, sandbox=sandbox)

    async def test_an_expiring_user_is_refreshed_and_still_gets_no_token(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Inside the buffer: one refresh, refreshed true, the new token stays in the service."""
        user = await put_user(client, sandbox, clock, expires_in=600)
        response = await proactive(client, await session_for(client, user.user_id))
        assert response.json()["refreshed"] is True
        assert sandbox.calls["refresh"] == 1
        assert_no_token(response, user, sandbox=sandbox)

    async def test_no_session_is_401_with_needs_reauth_and_no_status(self, client: httpx.AsyncClient) -> None:
        """The contract's 401 body, token_status and authorize_url null."""
        response = await proactive(client, None)
        assert response.status_code == 401
        assert response.json() == {
            "success": False,
            "error": REAUTH,
            "needs_reauth": True,
            "token_status": None,
            "authorize_url": None,
        }

    @pytest.mark.parametrize("cookie", ["forged", "a.b.c", "", "tokensvc_session"])
    async def test_a_forged_cookie_is_no_session(self, client: httpx.AsyncClient, cookie: str) -> None:
        """Anything but a token we signed is treated as no session."""
        response = await proactive(client, cookie)
        assert response.status_code == 401
        assert response.json()["token_status"] is None

    async def test_an_expired_session_is_no_session(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A session older than TOKENSVC_SESSION_TTL_SECONDS no longer counts."""
        user = await put_user(client, sandbox, clock, expires_in=10_000_000)
        session = await session_for(client, user.user_id)
        clock.advance(7 * 24 * 3600 + 1)
        assert (await proactive(client, session)).status_code == 401

    async def test_a_user_without_tokens_is_told_to_reconnect_with_a_link(self, client: httpx.AsyncClient) -> None:
        """401 with token_status `missing` and the session-based authorize URL."""
        response = await proactive(client, await session_for(client, "new-user"))
        assert response.status_code == 401
        body = response.json()
        assert body["token_status"]["status"] == "missing"
        assert body["authorize_url"] == "http://tokensvc.test/v1/oauth/strava/authorize"

    async def test_a_dead_refresh_token_is_401_needs_reauth(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava rejects the refresh token: 401, needs_reauth, the status says why."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        sandbox.revoke(user.athlete_id)
        response = await proactive(client, await session_for(client, user.user_id))
        assert response.status_code == 401
        body = response.json()
        assert (body["needs_reauth"], body["token_status"]["reauth_reason"]) == (True, "refresh_token_invalid")

    async def test_a_transient_failure_is_503_and_not_needs_reauth(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava down: 503 with the status, needs_reauth false, Retry-After."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=503))
        response = await proactive(client, await session_for(client, user.user_id))
        assert response.status_code == 503
        body = response.json()
        assert (body["success"], body["needs_reauth"]) == (False, False)
        assert body["token_status"]["status"] == "expiring_soon"
        assert response.headers["retry-after"]

    async def test_the_session_decides_the_user_whatever_the_browser_sends(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A user id in the query or body is ignored: the session's user is the only one acted for."""
        mine = await put_user(client, sandbox, clock, expires_in=10_000)
        other = await put_user(client, sandbox, clock, expires_in=60)
        session = await session_for(client, mine.user_id)
        response = await client.post(
            f"/proactive-token-refresh?user_id={other.user_id}",
            headers=browser(client, session),
            json={"user_id": other.user_id},
        )
        assert response.json()["token_status"]["user_id"] == mine.user_id
        assert sandbox.calls["refresh"] == 0
        me = await client.get(f"/v1/me/token-status?user_id={other.user_id}", headers=browser(client, session))
        assert me.json()["user_id"] == mine.user_id

    async def test_an_api_key_is_not_a_session(self, client: httpx.AsyncClient) -> None:
        """The service API's bearer key does not open the browser endpoints."""
        headers = {"Authorization": f"Bearer {API_KEY}", **JSON}
        assert (await client.post("/proactive-token-refresh", headers=headers, json={})).status_code == 401


class TestCrossSiteProtection:
    @pytest.mark.parametrize(
        "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]
    )
    async def test_the_post_must_be_json(self, client: httpx.AsyncClient, content_type: str) -> None:
        """The content types a cross-site form can send without a preflight are refused with 415."""
        session = await session_for(client, "u-1")
        headers = browser(client, session) | {"Content-Type": content_type}
        response = await client.post("/proactive-token-refresh", headers=headers, content=b"{}")
        assert_problem(response, 415, "unsupported_media_type")

    async def test_a_foreign_origin_is_403(self, client: httpx.AsyncClient) -> None:
        """An Origin that is neither ours nor in TOKENSVC_CORS_ORIGINS: 403."""
        session = await session_for(client, "u-1")
        response = await proactive(client, session, Origin="https://evil.example")
        assert_problem(response, 403, "forbidden_origin")

    @pytest.mark.parametrize("origin", [APP_ORIGIN, "http://tokensvc.test"])
    async def test_the_apps_origin_and_our_own_are_accepted(self, client: httpx.AsyncClient, origin: str) -> None:
        """Allowed origins pass; the allowed app origin gets exact CORS headers with credentials."""
        response = await proactive(client, await session_for(client, "u-1"), Origin=origin)
        assert response.status_code == 401  # no tokens for u-1, but past the guard
        if origin == APP_ORIGIN:
            assert response.headers["access-control-allow-origin"] == APP_ORIGIN
            assert response.headers["access-control-allow-credentials"] == "true"

    async def test_preflight_is_answered_for_the_exact_origin_only(self, client: httpx.AsyncClient) -> None:
        """OPTIONS from the app's origin succeeds; from another origin it carries no permission."""
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
            "Authorization": "",
        }
        ok = await client.options("/proactive-token-refresh", headers=preflight | {"Origin": APP_ORIGIN})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == APP_ORIGIN
        assert ok.headers["access-control-allow-credentials"] == "true"
        evil = await client.options("/proactive-token-refresh", headers=preflight | {"Origin": "https://evil.example"})
        assert evil.headers.get("access-control-allow-origin") != "https://evil.example"
        assert "access-control-allow-credentials" not in evil.headers or evil.status_code >= 400

    async def test_the_service_api_answers_no_cors(self, client: httpx.AsyncClient) -> None:
        """Service endpoints are for servers: no CORS headers even for the app's origin."""
        response = await client.get("/v1/users/u-1/token-status", headers={"Origin": APP_ORIGIN})
        assert "access-control-allow-origin" not in response.headers


class TestMeAndAuthorize:
    async def test_me_token_status_needs_a_session(self, client: httpx.AsyncClient) -> None:
        """No session: 401 problem; with one: the session user's status."""
        assert_problem(await client.get("/v1/me/token-status", headers={"Authorization": ""}), 401, "unauthorized")
        session = await session_for(client, "u-5")
        body = (await client.get("/v1/me/token-status", headers=browser(client, session))).json()
        assert (body["user_id"], body["status"]) == ("u-5", "missing")

    async def test_authorize_sends_the_session_user_straight_to_strava(self, client: httpx.AsyncClient) -> None:
        """303 to Strava's consent page with a state bound to the session's user, approval forced."""
        session = await session_for(client, "u-6")
        response = await client.get(
            f"/v1/oauth/strava/authorize?redirect_to={APP_ORIGIN}/dashboard", headers=browser(client, session)
        )
        assert response.status_code == 303
        location = response.headers["location"]
        assert location.startswith(STRAVA_TEST_BASE + "/oauth/authorize?")
        assert "approval_prompt=force" in location
        links = client.app.state.connect_links  # type: ignore[attr-defined]
        from tests.api.oauth_helpers import query_of

        claims = links.read_state(query_of(location)["state"])
        assert (claims.user_id, claims.redirect_to) == ("u-6", f"{APP_ORIGIN}/dashboard")

    async def test_authorize_without_a_session_or_to_a_foreign_target_is_refused(
        self, client: httpx.AsyncClient
    ) -> None:
        """401 without a session; 422 for a redirect_to outside the allowlist."""
        assert (await client.get("/v1/oauth/strava/authorize", headers={"Authorization": ""})).status_code == 401
        session = await session_for(client, "u-6")
        response = await client.get(
            "/v1/oauth/strava/authorize?redirect_to=https://evil.example/", headers=browser(client, session)
        )
        assert_problem(response, 422, "validation_error")
