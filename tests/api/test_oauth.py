"""Connect with Strava end to end in-process: connect → consent → callback → session, on both databases."""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.api.oauth_helpers import complete, consent, follow_start, local_path, query_of
from tests.api.test_tokens_api import assert_problem
from tests.conftest import APP_ORIGIN, STRAVA_TEST_BASE, FakeClock, make_settings, seed_athlete
from tests.logcapture import captured_logs
from tokensvc.config import SANDBOX_CLIENT_ID, Settings
from tokensvc.sandbox import FaultSpec, SandboxState

DASHBOARD = APP_ORIGIN + "/dashboard"


@pytest.fixture
async def strava(strava_transport: httpx.AsyncBaseTransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=strava_transport, base_url=STRAVA_TEST_BASE) as http:
        yield http


async def connect_link(client: httpx.AsyncClient, user_id: str = "u-1", **body: object) -> str:
    response = await client.post(f"/v1/users/{user_id}/connect", json=body or None)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"authorize_url", "state_expires_at"}
    url: str = payload["authorize_url"]
    return url


async def start_connect(client: httpx.AsyncClient, user_id: str = "u-1", **body: object) -> str:
    """The connect link opened in `client`'s browser (its cookie jar): Strava's consent URL."""
    return await follow_start(client, await connect_link(client, user_id, **body))


class TestConnect:
    async def test_with_redirect_to_connect_returns_stravas_authorize_url(self, client: httpx.AsyncClient) -> None:
        """client_id, redirect_uri = PUBLIC_URL + callback, response_type=code, approval_prompt, scopes, state."""
        url = await connect_link(client, redirect_to=DASHBOARD, scopes=["read"], approval_prompt="force")
        query = query_of(url)
        assert url.startswith(STRAVA_TEST_BASE + "/oauth/authorize?")
        assert query["redirect_uri"] == "http://tokensvc.test/v1/oauth/strava/callback"
        assert (query["response_type"], query["approval_prompt"], query["scope"]) == ("code", "force", "read")
        assert query["client_id"] == SANDBOX_CLIENT_ID
        assert query["state"]

    async def test_default_scopes_come_from_the_settings(self, client: httpx.AsyncClient) -> None:
        """No scopes: TOKENSVC_STRAVA_SCOPES, and approval_prompt=auto unless asked otherwise."""
        query = query_of(await connect_link(client, redirect_to=DASHBOARD))
        assert (query["scope"], query["approval_prompt"]) == ("read,activity:read_all", "auto")

    async def test_without_redirect_to_the_link_is_ours_and_binds_the_browser_opening_it(
        self, client: httpx.AsyncClient
    ) -> None:
        """On purpose not Strava's URL: opening it sets a short-lived HttpOnly SameSite=Lax cookie and goes on to
        Strava with approval_prompt=force (a returning athlete always sees what they approve)."""
        link = await connect_link(client, scopes=["read"])
        assert link.startswith("http://tokensvc.test/v1/oauth/strava/start?ticket=")
        response = await client.get(local_path(link))
        assert response.status_code == 303
        query = query_of(response.headers["location"])
        assert (query["scope"], query["approval_prompt"]) == ("read", "force")
        cookie = response.headers["set-cookie"].lower()
        assert cookie.startswith("tokensvc_oauth=")
        assert "httponly" in cookie
        assert "samesite=lax" in cookie
        assert "max-age=600" in cookie
        assert "path=/v1/oauth/strava" in cookie

    async def test_a_tampered_or_expired_start_link_is_invalid_state(
        self, client: httpx.AsyncClient, clock: FakeClock
    ) -> None:
        link = await connect_link(client)
        assert_problem(await client.get(local_path(link) + "x"), 400, "invalid_state")
        clock.advance(601)
        assert_problem(await client.get(local_path(link)), 400, "invalid_state")

    @pytest.mark.parametrize(
        "redirect_to",
        [
            "//evil.example",
            "https://evil.example",
            "http://app.test.evil.example/dashboard",
            "http:%2F%2Fevil",
            "http://app.test@evil.example/dashboard",
            "http://app.test/other",
            "http://app.test/dashboard/../evil",
            "http://app.test/dashboard/%2e%2e/admin",
            "http://app.test/dashboard/%2E%2E",
            "http://app.test/dashboard/./../../evil",
            "http://app.test/dashboard%2f..%2fevil",
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
    async def test_approving_hands_the_app_a_connect_id_and_stores_nothing_until_it_confirms(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """303 to redirect_to with strava=confirm and a connect_id, no cookie, no exchange; the app's backend
        completes it: tokens, athlete and a session (as a bearer) for its user; the id works once."""
        callback = await consent(strava, await start_connect(client, "u-7", redirect_to=DASHBOARD))
        response = await client.get(local_path(callback))
        assert response.status_code == 303
        location = response.headers["location"]
        assert location.startswith(DASHBOARD + "?strava=confirm&connect_id=cn_")
        assert "set-cookie" not in response.headers
        assert sandbox.calls["exchange"] == 0
        assert (await client.get("/v1/users/u-7/token-status")).json()["status"] == "missing"
        completed = await complete(client, "u-7", location)
        assert completed.status_code == 200, completed.text
        assert completed.headers["cache-control"] == "no-store"
        body = completed.json()
        assert set(body) == {"token_status", "session_token", "session_expires_at"}
        status = body["token_status"]
        assert (status["user_id"], status["status"]) == ("u-7", "valid")
        assert status["scopes"] == ["read", "activity:read_all"]
        athlete = sandbox.snapshot(status["athlete_id"])
        token = (await client.get("/v1/users/u-7/access-token")).json()["access_token"]
        assert token == athlete["access_token"]
        assert sandbox.calls["exchange"] == 1
        me = await client.get("/v1/me/token-status", headers={"Authorization": f"Bearer {body['session_token']}"})
        assert me.json()["user_id"] == "u-7"
        assert_problem(await complete(client, "u-7", location), 400, "invalid_state")
        assert sandbox.calls["exchange"] == 1

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_a_connect_id_completed_for_another_user_is_a_mismatch_and_spent(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """Mallory's link approved by Alice: Alice's app completes it for Alice → 409 connect_mismatch, nothing
        stored for either, no exchange, and the id is gone (Mallory's own completion is 400)."""
        callback = await consent(strava, await start_connect(client, "mallory", redirect_to=DASHBOARD))
        location = (await client.get(local_path(callback))).headers["location"]
        assert_problem(await complete(client, "alice", location), 409, "connect_mismatch")
        assert_problem(await complete(client, "mallory", location), 400, "invalid_state")
        assert sandbox.calls["exchange"] == 0
        for user in ("alice", "mallory"):
            assert (await client.get(f"/v1/users/{user}/token-status")).json()["status"] == "missing"

    @pytest.mark.parametrize("connect_id", ["cn_unknown", "x" * 128])
    async def test_an_unknown_connect_id_is_invalid_state(self, client: httpx.AsyncClient, connect_id: str) -> None:
        response = await client.post("/v1/users/u-1/connect/complete", json={"connect_id": connect_id})
        assert_problem(response, 400, "invalid_state")

    async def test_a_connect_id_lives_ten_minutes(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        callback = await consent(strava, await start_connect(client, "u-7", redirect_to=DASHBOARD))
        location = (await client.get(local_path(callback))).headers["location"]
        clock.advance(601)
        assert_problem(await complete(client, "u-7", location), 400, "invalid_state")
        assert sandbox.calls["exchange"] == 0

    async def test_only_scopes_both_asked_for_and_granted_are_stored(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient
    ) -> None:
        """The callback's `scope` is the browser's to edit: a scope that was never asked for is not stored."""
        callback = await consent(strava, await start_connect(client, "u-5", scopes=["read"], redirect_to=DASHBOARD))
        query = query_of(callback)
        widened = f"/v1/oauth/strava/callback?code={query['code']}&state={query['state']}&scope=read,activity:write"
        location = (await client.get(widened)).headers["location"]
        status = (await complete(client, "u-5", location)).json()["token_status"]
        assert status["scopes"] == ["read"]

    async def test_the_browser_bound_callback_in_another_browser_stores_nothing_and_signs_nobody_in(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """Mallory approves in her browser and sends the callback URL to Alice: Alice's browser lacks the binding
        cookie, so 400 invalid_state, no cookie, no exchange; Mallory's own browser still completes it."""
        callback = await consent(strava, await start_connect(client, "mallory"))
        async with httpx.AsyncClient(transport=client._transport, base_url="http://tokensvc.test") as alice:
            refused = await alice.get(local_path(callback))
        assert_problem(refused, 400, "invalid_state")
        assert "set-cookie" not in refused.headers
        assert sandbox.calls["exchange"] == 0
        assert (await client.get(local_path(callback))).status_code == 200
        assert (await client.get("/v1/users/mallory/token-status")).json()["status"] == "valid"

    async def test_a_browser_signed_in_as_another_user_is_not_switched(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """A browser holding alice's session finishing mallory's browser-bound flow: 409, nothing stored."""
        token = (await client.post("/v1/users/alice/session")).json()["session_token"]
        client.cookies.set("tokensvc_session", token, domain="tokensvc.test")
        callback = await consent(strava, await start_connect(client, "mallory"))
        response = await client.get(local_path(callback))
        assert_problem(response, 409, "connect_mismatch")
        assert "set-cookie" not in response.headers
        assert sandbox.calls["exchange"] == 0
        assert (await client.get("/v1/users/mallory/token-status")).json()["status"] == "missing"

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

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_a_replayed_callback_is_invalid_state_and_makes_no_exchange(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """The same state twice, even while young: 400 invalid_state, Strava sees one exchange only."""
        callback = await consent(strava, await start_connect(client, redirect_to=DASHBOARD))
        assert (await client.get(local_path(callback))).status_code == 303
        replay = await client.get(local_path(callback))
        assert_problem(replay, 400, "invalid_state")
        assert sandbox.calls["exchange"] == 0  # with redirect_to the exchange waits for the app's confirmation

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
        compressed = payload.startswith(".")  # itsdangerous zlib-compresses a payload when that is shorter
        raw = base64.urlsafe_b64decode(payload.lstrip(".") + "=" * (-len(payload.lstrip(".")) % 4))
        claims = json.loads(zlib.decompress(raw) if compressed else raw)
        assert claims["u"] == "victim"
        claims["u"] = "attacker"
        data = json.dumps(claims, separators=(",", ":")).encode()
        swapped = base64.urlsafe_b64encode(zlib.compress(data) if compressed else data).decode().rstrip("=")
        forged = f"{'.' if compressed else ''}{swapped}.{timestamp}.{signature}"
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
        client.cookies.clear()  # u-b connects in another browser (this one is now signed in as u-a)
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

    @pytest.mark.dialects("sqlite", "postgres")
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
        assert problem["authorize_url"].startswith("http://tokensvc.test/v1/oauth/strava/start?")
        consent_url = await follow_start(client, problem["authorize_url"])
        callback = await consent(strava, consent_url, athlete_id=user.athlete_id)
        assert (await client.get(local_path(callback))).status_code == 200
        status = (await client.get("/v1/users/u-9/token-status")).json()
        assert (status["status"], status["reauth_reason"], status["athlete_id"]) == ("valid", None, user.athlete_id)


@pytest.mark.dialects("sqlite", "postgres")
class TestOneAthleteOneUser:
    async def test_confirming_an_athlete_another_user_holds_is_409_unless_replace(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Athlete A held by `first`; `second` connects as A: 409 athlete_in_use, nothing changes; the app asks
        again with `"replace": true`: A moves, `first` is `missing`."""
        user = seed_athlete(sandbox, clock, expires_in=20_000)
        body = {"access_token": user.access_token, "refresh_token": user.refresh_token, "expires_at": user.expires_at}
        await client.put("/v1/users/first/tokens", json=body | {"athlete_id": user.athlete_id})
        for replace in (False, True):
            url = await start_connect(client, "second", redirect_to=DASHBOARD)
            callback = await consent(strava, url, athlete_id=user.athlete_id)
            location = (await client.get(local_path(callback))).headers["location"]
            response = await complete(client, "second", location, replace=replace)
            if not replace:
                assert_problem(response, 409, "athlete_in_use")
                assert (await client.get("/v1/users/second/token-status")).json()["status"] == "missing"
                assert (await client.get("/v1/users/first/token-status")).json()["status"] == "valid"
        assert response.status_code == 200, response.text
        assert response.json()["token_status"]["athlete_id"] == user.athlete_id
        assert (await client.get("/v1/users/first/token-status")).json()["status"] == "missing"

    async def test_the_browser_bound_flow_refuses_an_athlete_another_user_holds(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = seed_athlete(sandbox, clock, expires_in=20_000)
        body = {"access_token": user.access_token, "refresh_token": user.refresh_token, "expires_at": user.expires_at}
        await client.put("/v1/users/first/tokens", json=body | {"athlete_id": user.athlete_id})
        callback = await consent(strava, await start_connect(client, "second"), athlete_id=user.athlete_id)
        response = await client.get(local_path(callback))
        assert_problem(response, 409, "athlete_in_use")
        assert "tokensvc_session" not in response.headers.get("set-cookie", "")
        assert (await client.get("/v1/users/second/token-status")).json()["status"] == "missing"


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
        """Behind https the cookies are marked Secure (and still HttpOnly, SameSite=Lax)."""
        async with httpx.AsyncClient(
            transport=client._transport, base_url="https://tokens.example.com", headers=client.headers
        ) as browser:
            callback = await consent(strava, await start_connect(browser))
            response = await browser.get(local_path(callback))
        assert response.status_code == 200, response.text
        for cookie in response.headers.get_list("set-cookie"):
            if cookie.startswith("tokensvc_session="):
                assert "secure" in cookie.lower()
                assert "httponly" in cookie.lower()
                assert "samesite=lax" in cookie.lower()


def connects(outcome: str) -> float:
    return REGISTRY.get_sample_value("tokensvc_connect_total", {"outcome": outcome}) or 0.0


class TestAthleteCapacity:
    """Strava refuses a code exchange beyond the app's athlete capacity (403 `Limit of connected athletes exceeded`;
    the sandbox emulates it): nothing stored, a clear answer, counted, logged without a token."""

    async def test_the_browser_bound_callback_shows_a_page_and_stores_nothing(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """409, an HTML page that says why, no session cookie; the refusal is counted and logged, tokenless."""
        seed_athlete(sandbox, clock, expires_in=20_000)
        sandbox.set_capacity(1)
        callback = await consent(strava, await start_connect(client, "u-cap"))
        before = connects("capacity")
        with captured_logs() as logs:
            response = await client.get(local_path(callback))
        assert response.status_code == 409
        assert response.headers["content-type"].startswith("text/html")
        assert "limit of connected athletes" in response.text
        assert "tokensvc_session" not in response.headers.get("set-cookie", "")
        assert sandbox.calls["exchange"] == 1
        assert connects("capacity") - before == 1
        assert (await client.get("/v1/users/u-cap/token-status")).json()["status"] == "missing"
        [line] = logs.events("oauth.athlete_capacity")
        assert (line["user_id"], line["strava_status"]) == ("u-cap", 403)
        assert "code=" not in logs.text
        assert query_of(callback)["code"] not in logs.text

    async def test_the_apps_confirmation_is_409_athlete_capacity(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """With `redirect_to` the browser is back at the app (`strava=confirm`) before the exchange; the app's
        backend gets 409 `athlete_capacity` from connect/complete (its page shows `strava=capacity`), the id spent."""
        seed_athlete(sandbox, clock, expires_in=20_000)
        sandbox.set_capacity(1)
        callback = await consent(strava, await start_connect(client, "u-cap", redirect_to=DASHBOARD))
        location = (await client.get(local_path(callback))).headers["location"]
        before = connects("capacity")
        problem = assert_problem(await complete(client, "u-cap", location), 409, "athlete_capacity")
        assert "limit of connected athletes" in problem["detail"]
        assert connects("capacity") - before == 1
        assert (await client.get("/v1/users/u-cap/token-status")).json()["status"] == "missing"
        assert_problem(await complete(client, "u-cap", location), 400, "invalid_state")

    async def test_an_athlete_already_connected_reconnects_at_capacity(
        self, client: httpx.AsyncClient, strava: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """Strava counts athletes, not connects: at capacity, the connected athlete can still reconnect."""
        first = await consent(strava, await start_connect(client, "u-1", redirect_to=DASHBOARD))
        status = (await complete(client, "u-1", (await client.get(local_path(first))).headers["location"])).json()
        sandbox.set_capacity(1)
        before = connects("connected")
        again = await consent(
            strava,
            await start_connect(client, "u-1", redirect_to=DASHBOARD),
            athlete_id=status["token_status"]["athlete_id"],
        )
        response = await complete(client, "u-1", (await client.get(local_path(again))).headers["location"])
        assert response.status_code == 200, response.text
        assert connects("connected") - before == 1
