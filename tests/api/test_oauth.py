"""Connect with Strava end to end in-process: connect → consent → callback → session, on both databases."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.api.oauth_helpers import consent, local_path, query_of
from tests.api.test_tokens_api import assert_problem
from tests.conftest import APP_ORIGIN, STRAVA_TEST_BASE, FakeClock, make_settings, seed_athlete
from tokensvc.config import SANDBOX_CLIENT_ID, Settings
from tokensvc.sandbox import FaultSpec, SandboxState

DASHBOARD = APP_ORIGIN + "/dashboard"


@pytest.fixture
async def strava(strava_transport: httpx.AsyncBaseTransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=strava_transport, base_url=STRAVA_TEST_BASE) as http:
        yield http


async def start_connect(client: httpx.AsyncClient, user_id: str = "u-1", **body: object) -> str:
    response = await client.post(f"/v1/users/{user_id}/connect", json=body or None)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"authorize_url", "state_expires_at"}
    url: str = payload["authorize_url"]
    return url


class TestConnect:
    async def test_connect_returns_stravas_authorize_url_with_our_callback(self, client: httpx.AsyncClient) -> None:
        """client_id, redirect_uri = PUBLIC_URL + callback, response_type=code, approval_prompt, scopes, state."""
        url = await start_connect(client, redirect_to=DASHBOARD, scopes=["read"], approval_prompt="force")
        query = query_of(url)
        assert url.startswith(STRAVA_TEST_BASE + "/oauth/authorize?")
        assert query["redirect_uri"] == "http://tokensvc.test/v1/oauth/strava/callback"
        assert (query["response_type"], query["approval_prompt"], query["scope"]) == ("code", "force", "read")
        assert query["client_id"] == SANDBOX_CLIENT_ID
        assert query["state"]

    async def test_default_scopes_come_from_the_settings(self, client: httpx.AsyncClient) -> None:
        """No body: TOKENSVC_STRAVA_SCOPES and approval_prompt=auto."""
        query = query_of(await start_connect(client))
        assert (query["scope"], query["approval_prompt"]) == ("read,activity:read_all", "auto")

    @pytest.mark.parametrize(
        "redirect_to",
        [
            "//evil.example",
            "https://evil.example",
            "http://app.test.evil.example/dashboard",
            "http:%2F%2Fevil",
            "http://app.test@evil.example/dashboard",
            "http://app.test/other",
        ],
    )
    async def test_a_redirect_outside_the_allowlist_is_422(self, client: httpx.AsyncClient, redirect_to: str) -> None:
        """Open-redirect attempts never get a state."""
        response = await client.post("/v1/users/u-1/connect", json={"redirect_to": redirect_to})
        assert_problem(response, 422, "validation_error")

    async def test_connect_needs_the_api_key(self, client: httpx.AsyncClient) -> None:
        """It is a service API call."""
        assert_problem(await client.post("/v1/users/u-1/connect", headers={"Authorization": ""}), 401, "unauthorized")


class TestCallback:
    async def test_approving_stores_tokens_sets_the_session_and_returns_to_the_app(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """303 to redirect_to with strava=connected, an HttpOnly SameSite=Lax cookie, tokens and athlete stored."""
        callback = await consent(strava, await start_connect(client, "u-7", redirect_to=DASHBOARD))
        response = await client.get(local_path(callback))
        assert response.status_code == 303
        assert response.headers["location"] == DASHBOARD + "?strava=connected"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("tokensvc_session=")
        assert "HttpOnly" in cookie
        assert "SameSite=lax" in cookie or "samesite=lax" in cookie.lower()
        assert "secure" not in cookie.lower()  # PUBLIC_URL is http here
        status = (await client.get("/v1/users/u-7/token-status")).json()
        assert status["status"] == "valid"
        assert status["scopes"] == ["read", "activity:read_all"]
        athlete = sandbox.snapshot(status["athlete_id"])
        token = (await client.get("/v1/users/u-7/access-token")).json()["access_token"]
        assert token == athlete["access_token"]
        assert sandbox.calls["exchange"] == 1

    async def test_fewer_scopes_granted_than_asked_are_stored_and_visible(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient
    ) -> None:
        """The athlete unticks a scope: what Strava reports as granted is what the status shows."""
        callback = await consent(strava, await start_connect(client, "u-8"), scopes=["read"])
        assert (await client.get(local_path(callback))).status_code == 200
        assert (await client.get("/v1/users/u-8/token-status")).json()["scopes"] == ["read"]

    async def test_without_redirect_to_a_small_connected_page_is_shown(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient
    ) -> None:
        """200 HTML saying it is connected, with the session cookie."""
        response = await client.get(local_path(await consent(strava, await start_connect(client))))
        assert response.status_code == 200
        assert "Connected" in response.text
        assert "tokensvc_session=" in response.headers["set-cookie"]

    async def test_denying_returns_to_the_app_with_strava_denied(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """error=access_denied: 303 with strava=denied, no exchange, no tokens, no cookie."""
        callback = await consent(strava, await start_connect(client, redirect_to=DASHBOARD), decision="deny")
        response = await client.get(local_path(callback))
        assert response.status_code == 303
        assert response.headers["location"] == DASHBOARD + "?strava=denied"
        assert "set-cookie" not in response.headers
        assert sandbox.calls["exchange"] == 0
        assert (await client.get("/v1/users/u-1/token-status")).json()["status"] == "missing"

    async def test_denying_without_redirect_to_is_a_400_page(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient
    ) -> None:
        """No app to return to: a small 400 page."""
        response = await client.get(local_path(await consent(strava, await start_connect(client), decision="deny")))
        assert response.status_code == 400
        assert "declined" in response.text

    async def test_a_replayed_callback_is_invalid_state_and_makes_no_exchange(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """The same state twice, even while young: 400 invalid_state, Strava sees one exchange only."""
        callback = await consent(strava, await start_connect(client, redirect_to=DASHBOARD))
        assert (await client.get(local_path(callback))).status_code == 303
        replay = await client.get(local_path(callback))
        assert_problem(replay, 400, "invalid_state")
        assert sandbox.calls["exchange"] == 1

    async def test_an_expired_state_is_invalid_and_makes_no_exchange(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Ten minutes and one second later the state is refused before Strava is asked."""
        callback = await consent(strava, await start_connect(client))
        clock.advance(601)
        assert_problem(await client.get(local_path(callback)), 400, "invalid_state")
        assert sandbox.calls["exchange"] == 0

    @pytest.mark.parametrize(
        "query",
        ["code=abc&scope=read", "code=abc&state=forged", "code=abc&state=", "error=access_denied&state=nope"],
        ids=["no-state", "forged", "empty", "denied-forged"],
    )
    async def test_a_missing_or_forged_state_is_invalid_and_makes_no_exchange(
        self, client: httpx.AsyncClient, sandbox: SandboxState, query: str
    ) -> None:
        """400 invalid_state and nothing asked of Strava."""
        assert_problem(await client.get(f"/v1/oauth/strava/callback?{query}"), 400, "invalid_state")
        assert sandbox.calls["exchange"] == 0

    async def test_a_state_for_one_user_cannot_be_swapped_for_another(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient
    ) -> None:
        """The user comes from the signed state: tampering with it invalidates it."""
        callback = await consent(strava, await start_connect(client, "victim"))
        query = query_of(callback)
        payload, timestamp, signature = query["state"].rsplit(".", 2)
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["u"] == "victim"
        claims["u"] = "attacker"
        swapped = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode().rstrip("=")
        forged = f"{swapped}.{timestamp}.{signature}"
        response = await client.get(f"/v1/oauth/strava/callback?code={query['code']}&state={forged}")
        assert_problem(response, 400, "invalid_state")

    async def test_a_reused_code_is_rejected_by_strava_as_400(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient
    ) -> None:
        """A valid state with a code Strava will not take: 400 invalid_code, nothing stored."""
        first = query_of(await consent(strava, await start_connect(client, "u-a")))
        assert (
            await client.get(f"/v1/oauth/strava/callback?code={first['code']}&state={first['state']}")
        ).status_code == 200
        second = query_of(await consent(strava, await start_connect(client, "u-b")))
        reused = await client.get(f"/v1/oauth/strava/callback?code={first['code']}&state={second['state']}")
        assert_problem(reused, 400, "invalid_code")
        assert (await client.get("/v1/users/u-b/token-status")).json()["status"] == "missing"

    async def test_strava_down_during_the_exchange_is_503(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """A transient failure of the exchange: 503 with Retry-After, nothing stored."""
        callback = await consent(strava, await start_connect(client))
        sandbox.add_fault(FaultSpec(endpoint="exchange", kind="status", status=502))
        response = await client.get(local_path(callback))
        assert_problem(response, 503, "provider_unavailable")
        assert response.headers["retry-after"]

    async def test_reconnecting_a_user_in_needs_reauth_makes_them_valid(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """needs_reauth → connect again → valid, with the reconnected athlete's tokens."""
        user = seed_athlete(sandbox, clock, expires_in=-5)
        body = {
            "access_token": user.access_token,
            "refresh_token": user.refresh_token,
            "expires_at": user.expires_at,
            "athlete_id": user.athlete_id,
        }
        await client.put("/v1/users/u-9/tokens", json=body)
        sandbox.revoke(user.athlete_id)
        refused = await client.post("/v1/users/u-9/refresh")
        problem = assert_problem(refused, 409, "reauth_required")
        assert problem["authorize_url"].startswith(STRAVA_TEST_BASE + "/oauth/authorize?")
        callback = await consent(strava, problem["authorize_url"], athlete_id=user.athlete_id)
        assert (await client.get(local_path(callback))).status_code == 200
        status = (await client.get("/v1/users/u-9/token-status")).json()
        assert (status["status"], status["reauth_reason"], status["athlete_id"]) == ("valid", None, user.athlete_id)


class TestSessionMinting:
    async def test_an_app_can_mint_a_session_for_its_logged_in_user(self, client: httpx.AsyncClient) -> None:
        """POST …/session: a token, its expiry and the cookie name; it works as a bearer on browser endpoints."""
        response = await client.post("/v1/users/u-3/session")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["cookie_name"] == "tokensvc_session"
        me = await client.get("/v1/me/token-status", headers={"Authorization": f"Bearer {body['session_token']}"})
        assert me.json()["user_id"] == "u-3"


class TestCookieOverHttps:
    @pytest.fixture
    def settings(self, database_url: str) -> Settings:
        return make_settings(database_url, public_url="https://tokens.example.com")

    async def test_the_session_cookie_is_secure_when_the_public_url_is_https(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient
    ) -> None:
        """Behind https the cookie is marked Secure (and still HttpOnly, SameSite=Lax)."""
        callback = await consent(strava, await start_connect(client))
        response = await client.get(local_path(callback))
        cookie = response.headers["set-cookie"].lower()
        assert "secure" in cookie
        assert "httponly" in cookie
        assert "samesite=lax" in cookie
