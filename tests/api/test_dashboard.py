"""/dashboard over HTTP: who gets in (API key, admin password, cookie), who does not, and what the page shows."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pydantic import SecretStr

from tests.conftest import API_KEY, APP_ORIGIN, FakeClock, make_settings
from tests.service.test_dashboard import seed_mixed
from tokensvc.api.dashboard import ADMIN_TTL_SECONDS
from tokensvc.app import create_app
from tokensvc.sandbox import SandboxState
from tokensvc.service.sessions import COOKIE_NAME

ADMIN_PASSWORD = "correct horse battery staple"
BASE = "http://tokensvc.test"


def app_for(database_url: str, clock: FakeClock, transport: httpx.AsyncBaseTransport, **overrides: object) -> FastAPI:
    settings = make_settings(database_url, **({"admin_password": SecretStr(ADMIN_PASSWORD)} | overrides))
    return create_app(settings, clock=clock, strava_transport=transport)


@pytest.fixture
async def app(
    database_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
) -> AsyncIterator[FastAPI]:
    application = app_for(database_url, clock, strava_transport)
    async with LifespanManager(application) as manager:
        assert manager.app is not None
        yield application


@pytest.fixture
async def browser(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client: no API key, keeps cookies, does not follow redirects."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as http:
        yield http


async def sign_in(browser: httpx.AsyncClient, secret: str, **headers: str) -> httpx.Response:
    return await browser.post("/dashboard/login", data={"secret": secret}, headers=headers)


class TestSignIn:
    async def test_without_a_session_the_dashboard_sends_to_the_sign_in_form(self, browser: httpx.AsyncClient) -> None:
        """No cookie: 303 to the form; the form is HTML, not cached, and asks for one secret."""
        response = await browser.get("/dashboard")
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard/login"
        form = await browser.get("/dashboard/login")
        assert form.status_code == 200
        assert form.headers["content-type"].startswith("text/html")
        assert form.headers["cache-control"] == "no-store"
        assert 'name="secret"' in form.text
        assert 'action="/dashboard/login"' in form.text

    async def test_the_admin_password_signs_in(self, browser: httpx.AsyncClient) -> None:
        """The admin password sets a strict, HttpOnly cookie scoped to /dashboard and opens the dashboard."""
        secret = ADMIN_PASSWORD
        response = await sign_in(browser, secret, origin=BASE)
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("tokensvc_admin=")
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/dashboard" in cookie
        assert "Secure" not in cookie  # PUBLIC_URL is http here
        assert secret not in cookie
        page = await browser.get("/dashboard")
        assert page.status_code == 200
        assert "Must reconnect" in page.text
        assert page.headers["cache-control"] == "no-store"
        assert (await browser.get("/dashboard/login")).headers["location"] == "/dashboard"

    @pytest.mark.parametrize(
        "body",
        [
            {"secret": "wrong"},
            {"secret": ""},
            {"other": ADMIN_PASSWORD},
            {"secret": ADMIN_PASSWORD + "x"},
            {"secret": API_KEY},
        ],
        ids=["wrong", "empty", "missing", "longer", "api-key"],
    )
    async def test_a_wrong_secret_gets_401_and_the_form_again(
        self, browser: httpx.AsyncClient, body: dict[str, str]
    ) -> None:
        """No cookie, the form again with a message, and the secret never echoed."""
        response = await browser.post("/dashboard/login", data=body)
        assert response.status_code == 401
        assert "set-cookie" not in response.headers
        assert 'name="secret"' in response.text
        assert "not the admin password" in response.text
        assert API_KEY not in response.text
        assert ADMIN_PASSWORD not in response.text
        assert (await browser.get("/dashboard")).status_code == 303

    async def test_a_json_body_is_not_a_sign_in(self, browser: httpx.AsyncClient) -> None:
        """Only the form counts: a JSON body with the right key is refused, never a 500."""
        response = await browser.post("/dashboard/login", json={"secret": ADMIN_PASSWORD})
        assert response.status_code == 401
        assert "set-cookie" not in response.headers

    @pytest.mark.parametrize("origin", [APP_ORIGIN, "https://tokensvc.test", "null", "http://evil.test"])
    async def test_a_sign_in_posted_from_another_origin_is_refused(
        self, browser: httpx.AsyncClient, origin: str
    ) -> None:
        """Same origin only (not even the CORS origins): 403 and no cookie, even with the right secret."""
        response = await sign_in(browser, ADMIN_PASSWORD, origin=origin)
        assert response.status_code == 403
        assert "set-cookie" not in response.headers

    async def test_a_tampered_cookie_is_no_session(self, browser: httpx.AsyncClient) -> None:
        """Changing the signed value sends the browser back to the form."""
        await sign_in(browser, ADMIN_PASSWORD)
        token = browser.cookies["tokensvc_admin"]
        browser.cookies.set("tokensvc_admin", token[:-3] + ("xyz" if not token.endswith("xyz") else "abc"))
        assert (await browser.get("/dashboard")).status_code == 303

    async def test_an_expired_cookie_is_no_session(self, browser: httpx.AsyncClient, clock: FakeClock) -> None:
        """An admin login lasts ADMIN_TTL_SECONDS, then the form again."""
        await sign_in(browser, ADMIN_PASSWORD)
        clock.advance(ADMIN_TTL_SECONDS - 1)
        assert (await browser.get("/dashboard")).status_code == 200
        clock.advance(2)
        assert (await browser.get("/dashboard")).status_code == 303

    async def test_a_user_browser_session_is_not_an_admin_session(
        self, browser: httpx.AsyncClient, app: FastAPI
    ) -> None:
        """A user's session token, as the admin cookie or as a bearer, does not open the dashboard."""
        token, _session = app.state.sessions.mint("alice")
        browser.cookies.set("tokensvc_admin", token)
        browser.cookies.set(COOKIE_NAME, token)
        assert (await browser.get("/dashboard")).status_code == 303
        browser.cookies.clear()
        assert (await browser.get("/dashboard", headers={"Authorization": f"Bearer {token}"})).status_code == 401

    async def test_an_admin_cookie_is_not_a_user_session(self, browser: httpx.AsyncClient) -> None:
        """The admin token does not act for any user on the browser endpoints."""
        await sign_in(browser, ADMIN_PASSWORD)
        token = browser.cookies["tokensvc_admin"]
        browser.cookies.set(COOKIE_NAME, token)
        response = await browser.get("/v1/me/token-status")
        assert response.status_code == 401
        browser.cookies.clear()
        response = await browser.get("/v1/me/token-status", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401

    async def test_a_bearer_api_key_opens_the_dashboard(self, browser: httpx.AsyncClient) -> None:
        """Scripts may read the page with an API key; a wrong one (or the password) is 401."""
        assert (await browser.get("/dashboard", headers={"Authorization": f"Bearer {API_KEY}"})).status_code == 200
        wrong = await browser.get("/dashboard", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert 'name="secret"' in wrong.text
        password = await browser.get("/dashboard", headers={"Authorization": f"Bearer {ADMIN_PASSWORD}"})
        assert password.status_code == 401

    async def test_sign_out_forgets_the_cookie(self, browser: httpx.AsyncClient) -> None:
        """After sign-out the dashboard asks to sign in again; sign-out checks the origin too."""
        await sign_in(browser, ADMIN_PASSWORD)
        assert (await browser.post("/dashboard/logout", headers={"origin": "http://evil.test"})).status_code == 403
        assert (await browser.get("/dashboard")).status_code == 200
        response = await browser.post("/dashboard/logout", headers={"origin": BASE})
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard/login"
        assert (await browser.get("/dashboard")).status_code == 303

    async def test_without_an_admin_password_the_form_signs_nobody_in(
        self, database_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """TOKENSVC_ADMIN_PASSWORD unset: no secret signs in through the form (not even an API key, so the form is
        no oracle for them); a bearer API key still opens the page."""
        application = app_for(database_url, clock, strava_transport, admin_password=None)
        async with (
            LifespanManager(application),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=BASE) as http,
        ):
            assert (await sign_in(http, "")).status_code == 401
            assert (await sign_in(http, ADMIN_PASSWORD)).status_code == 401
            assert (await sign_in(http, API_KEY)).status_code == 401
            assert (await http.get("/dashboard", headers={"Authorization": f"Bearer {API_KEY}"})).status_code == 200

    async def test_the_cookie_is_secure_when_the_public_url_is_https(
        self, database_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """PUBLIC_URL https: the admin cookie is Secure, and the https origin is the one accepted."""
        application = app_for(database_url, clock, strava_transport, public_url="https://tokensvc.test")
        async with (
            LifespanManager(application),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="https://tokensvc.test") as http,
        ):
            assert (await sign_in(http, ADMIN_PASSWORD, origin=BASE)).status_code == 403
            response = await sign_in(http, ADMIN_PASSWORD, origin="https://tokensvc.test")
            assert response.status_code == 303
            assert "Secure" in response.headers["set-cookie"]

    async def test_the_dashboard_is_not_in_the_openapi_schema(self, browser: httpx.AsyncClient) -> None:
        """HTML pages for people, not API endpoints."""
        paths = (await browser.get("/openapi.json")).json()["paths"]
        assert not [path for path in paths if path.startswith("/dashboard")]


def client_at(app: FastAPI, address: str) -> httpx.AsyncClient:
    """A browser at `address` (the peer address the service sees)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 40000)), base_url=BASE)


@pytest.mark.dialects("sqlite", "postgres")
class TestSignInThrottle:
    async def test_after_five_failures_a_client_waits_longer_each_time(self, app: FastAPI, clock: FakeClock) -> None:
        """Five wrong tries cost nothing; then 429 too_many_requests with a growing Retry-After, the right password
        refused too while waiting (so no guess is checked), and a success forgets the failures."""
        async with client_at(app, "203.0.113.7") as guesser:
            assert [(await sign_in(guesser, f"guess-{n}")).status_code for n in range(5)] == [401] * 5
            blocked = await guesser.post("/dashboard/login", data={"secret": ADMIN_PASSWORD})
            assert blocked.status_code == 429
            assert blocked.headers["retry-after"] == "2"
            assert blocked.headers["content-type"] == "application/problem+json"
            assert blocked.json()["code"] == "too_many_requests"
            assert "set-cookie" not in blocked.headers
            clock.advance(2)
            assert (await sign_in(guesser, "guess-5")).status_code == 401
            page = await guesser.post("/dashboard/login", data={"secret": "x"}, headers={"accept": "text/html"})
            assert page.status_code == 429
            assert page.headers["retry-after"] == "4"
            assert "Too many failed sign-ins" in page.text
            clock.advance(4)
            assert (await sign_in(guesser, ADMIN_PASSWORD)).status_code == 303
            assert [(await sign_in(guesser, f"again-{n}")).status_code for n in range(5)] == [401] * 5

    async def test_another_client_is_not_locked_out(self, app: FastAPI) -> None:
        """The guesser's failures do not stop the operator at another address (nor X-Forwarded-For, not trusted)."""
        async with client_at(app, "203.0.113.7") as guesser, client_at(app, "198.51.100.2") as operator:
            for n in range(8):
                await sign_in(guesser, f"guess-{n}", **{"x-forwarded-for": "198.51.100.2"})
            assert (await sign_in(guesser, ADMIN_PASSWORD)).status_code == 429
            assert (await sign_in(operator, ADMIN_PASSWORD)).status_code == 303

    async def test_the_throttle_is_shared_by_replicas(
        self, app: FastAPI, database_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """Failures counted by one replica block the client at another (same database)."""
        other = app_for(database_url, clock, strava_transport)
        async with (
            LifespanManager(other),
            client_at(app, "203.0.113.9") as first,
            client_at(other, "203.0.113.9") as second,
        ):
            for n in range(3):
                assert (await sign_in(first, f"a-{n}")).status_code == 401
                assert (await sign_in(second, f"b-{n}")).status_code in (401, 429)
            assert (await sign_in(first, ADMIN_PASSWORD)).status_code == 429


class TestDashboardContent:
    async def test_the_page_reflects_the_data_and_holds_no_token(
        self, app: FastAPI, browser: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Counts, bars for the hours with attempts, the reconnect row with its reason, both failures; no token."""
        users = await seed_mixed(app.state.token_service, sandbox, clock)
        await sign_in(browser, ADMIN_PASSWORD)
        page = (await browser.get("/dashboard")).text

        def card(key: str) -> str:
            found = re.search(rf'data-testid="users-{key}">.*?<div class="value">(\d+)</div>', page)
            assert found is not None, key
            return found.group(1)

        assert [card(k) for k in ("total", "valid", "expiring_soon", "expired", "needs_reauth")] == [
            "6",
            "2",
            "2",
            "1",
            "1",
        ]
        bars = re.findall(r'<rect class="bar bar-(\w+)" x="([\d.]+)"', page)
        assert sorted(series for series, _x in bars) == ["failure", "reauth_required", "success"]
        x_of = dict(bars)
        assert x_of["failure"] == x_of["reauth_required"] != x_of["success"]  # stacked now; the success 2 h ago
        rejected = users["rejected"]
        assert re.search(
            rf"<td>{rejected.user_id}</td><td class=\"num\">{rejected.athlete_id}</td>"
            r"<td>Strava rejected the refresh token</td>",
            page,
        )
        failures = page.split('data-testid="failures"', 1)[1]
        assert f'<td>{users["transient"].user_id}</td><td>browser</td><td>transient</td><td class="num">500</td>' in (
            failures
        )
        assert f'<td>{rejected.user_id}</td><td>sweep</td><td>rejected</td><td class="num">400</td>' in failures
        assert "Not paused" in page
        for seeded in users.values():
            assert seeded.access_token not in page
            assert seeded.refresh_token not in page
        assert "http://" not in page  # nothing from elsewhere: every link and form is relative
