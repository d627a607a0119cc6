"""Connects only for the person who asked, across real processes (`tokensvc serve` and the sandbox over HTTP) with
independent browsers: each person is an httpx client with its own cookie jar, following redirects by hand.

Mallory forwards to Alice, in turn, the Strava consent link, the callback URL and the connect link itself: nothing
is stored for anyone and nobody is signed in. The legitimate flow, confirmed by the app for its signed-in user,
connects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.e2e.conftest import sandbox_stats, service_env
from tests.e2e.processes import Process, start_service, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

APP = "http://app.example/strava"  # the app's page; never fetched, only its redirects are read


@pytest.fixture
async def service(pg_url: str, sandbox_process: Process, tmp_path: Path) -> AsyncIterator[Process]:
    env = service_env(pg_url, sandbox_process, TOKENSVC_REDIRECT_ALLOWLIST=APP)
    process = start_service("service", tmp_path, env)
    await wait_ready(process)
    yield process
    process.stop()


@pytest.fixture
def browsers() -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    """Two people's browsers (each test opens and closes them): no API key, separate cookie jars."""
    return httpx.AsyncClient(timeout=30), httpx.AsyncClient(timeout=30)


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def connect_link(http: httpx.AsyncClient, service: Process, user_id: str, **body: object) -> str:
    """The app's backend asking for a connect link for its user."""
    response = await http.post(f"{service.url}/v1/users/{user_id}/connect", json=body or None)
    assert response.status_code == 200, response.text
    url: str = response.json()["authorize_url"]
    return url


async def to_consent(browser: httpx.AsyncClient, link: str, sandbox: Process) -> str:
    """Open a link in the browser until it shows Strava's consent page; returns that page's URL."""
    if not link.startswith(sandbox.url):
        response = await browser.get(link)
        assert response.status_code == 303, response.text
        link = response.headers["location"]
    assert link.startswith(f"{sandbox.url}/oauth/authorize?")
    assert (await browser.get(link)).status_code == 200  # the consent page itself
    return link


async def approve(browser: httpx.AsyncClient, consent_url: str, sandbox: Process) -> str:
    """Approve on the sandbox's consent page; returns the callback URL Strava redirects the browser to."""
    asked = query_of(consent_url)
    form = [
        ("client_id", asked["client_id"]),
        ("redirect_uri", asked["redirect_uri"]),
        ("response_type", "code"),
        ("approval_prompt", asked["approval_prompt"]),
        ("requested_scope", asked["scope"]),
        ("state", asked["state"]),
        ("decision", "approve"),
        *(("scope", s) for s in asked["scope"].split(",")),
    ]
    response = await browser.post(
        f"{sandbox.url}/oauth/authorize",
        content=urlencode(form).encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 303, response.text
    callback: str = response.headers["location"]
    return callback


async def status(http: httpx.AsyncClient, service: Process, user_id: str) -> Any:
    return (await http.get(f"{service.url}/v1/users/{user_id}/token-status")).json()["status"]


async def signed_in_as(browser: httpx.AsyncClient, service: Process) -> str | None:
    """Who the browser's cookies sign in as at the service, if anyone."""
    response = await browser.get(f"{service.url}/v1/me/token-status")
    return response.json()["user_id"] if response.status_code == 200 else None


async def complete(http: httpx.AsyncClient, service: Process, user_id: str, location: str) -> httpx.Response:
    """The app's backend confirming the `connect_id` of the redirect for the user signed in to the app."""
    assert location.startswith(APP + "?strava=confirm&connect_id=")
    body = {"connect_id": query_of(location)["connect_id"]}
    return await http.post(f"{service.url}/v1/users/{user_id}/connect/complete", json=body)


async def assert_nothing_happened(
    http: httpx.AsyncClient, service: Process, sandbox: Process, *browsers: httpx.AsyncClient
) -> None:
    for user_id in ("mallory", "alice"):
        assert await status(http, service, user_id) == "missing"
    for browser in browsers:
        assert await signed_in_as(browser, service) is None
    assert (await sandbox_stats(http, sandbox))["calls"].get("exchange", 0) == 0


class TestForwardedLinks:
    async def test_the_strava_link_forwarded(
        self,
        service: Process,
        sandbox_process: Process,
        http: httpx.AsyncClient,
        browsers: tuple[httpx.AsyncClient, httpx.AsyncClient],
    ) -> None:
        """Mallory forwards a Strava consent link made for her, and Alice approves it. The app confirms (the
        callback gives Alice's browser a connect_id, Alice's app completes it for Alice: 409 connect_mismatch);
        the browser-bound link Mallory opened herself is refused in Alice's browser (400)."""
        mallory, alice = browsers
        async with mallory, alice:
            confirmed = await connect_link(http, service, "mallory", redirect_to=APP)
            callback = await approve(alice, await to_consent(alice, confirmed, sandbox_process), sandbox_process)
            landed = await alice.get(callback)
            assert landed.status_code == 303
            assert "set-cookie" not in landed.headers
            refused = await complete(http, service, "alice", landed.headers["location"])
            assert (refused.status_code, refused.json()["code"]) == (409, "connect_mismatch")

            bound = await to_consent(mallory, await connect_link(http, service, "mallory"), sandbox_process)
            callback = await approve(alice, bound, sandbox_process)
            landed = await alice.get(callback)
            assert (landed.status_code, landed.json()["code"]) == (400, "invalid_state")
            assert "set-cookie" not in landed.headers
            await assert_nothing_happened(http, service, sandbox_process, mallory, alice)

    async def test_the_callback_url_forwarded(
        self,
        service: Process,
        sandbox_process: Process,
        http: httpx.AsyncClient,
        browsers: tuple[httpx.AsyncClient, httpx.AsyncClient],
    ) -> None:
        """Mallory approves with her own athlete, does not follow the callback and sends it to Alice: Alice's
        browser is signed in as nobody, and nothing is linked (browser-bound: 400; app-confirmed: the connect_id
        is Mallory's, and Alice's app completing it for Alice is 409)."""
        mallory, alice = browsers
        async with mallory, alice:
            bound = await to_consent(mallory, await connect_link(http, service, "mallory"), sandbox_process)
            landed = await alice.get(await approve(mallory, bound, sandbox_process))
            assert (landed.status_code, landed.json()["code"]) == (400, "invalid_state")
            assert "set-cookie" not in landed.headers

            confirmed = await connect_link(http, service, "mallory", redirect_to=APP)
            callback = await approve(mallory, await to_consent(mallory, confirmed, sandbox_process), sandbox_process)
            landed = await alice.get(callback)
            assert landed.status_code == 303
            assert "set-cookie" not in landed.headers
            refused = await complete(http, service, "alice", landed.headers["location"])
            assert (refused.status_code, refused.json()["code"]) == (409, "connect_mismatch")
            await assert_nothing_happened(http, service, sandbox_process, mallory, alice)

    async def test_the_connect_link_forwarded(
        self,
        service: Process,
        sandbox_process: Process,
        http: httpx.AsyncClient,
        browsers: tuple[httpx.AsyncClient, httpx.AsyncClient],
    ) -> None:
        """The very link `connect` hands out, opened by Alice. App-confirmed: Alice's app completes for Alice, 409.
        Browser-bound, with Alice signed in to the service as herself: her browser is not switched to Mallory,
        nothing is stored (409 connect_mismatch)."""
        mallory, alice = browsers
        async with mallory, alice:
            confirmed = await connect_link(http, service, "mallory", redirect_to=APP)
            landed = await alice.get(
                await approve(alice, await to_consent(alice, confirmed, sandbox_process), sandbox_process)
            )
            refused = await complete(http, service, "alice", landed.headers["location"])
            assert (refused.status_code, refused.json()["code"]) == (409, "connect_mismatch")

            session = (await http.post(f"{service.url}/v1/users/alice/session")).json()
            alice.cookies.set("tokensvc_session", session["session_token"], domain="127.0.0.1")
            bound = await to_consent(alice, await connect_link(http, service, "mallory"), sandbox_process)
            landed = await alice.get(await approve(alice, bound, sandbox_process))
            assert (landed.status_code, landed.json()["code"]) == (409, "connect_mismatch")
            assert "set-cookie" not in landed.headers
            assert await signed_in_as(alice, service) == "alice"
            alice.cookies.clear()
            await assert_nothing_happened(http, service, sandbox_process, mallory, alice)


class TestLegitimateFlow:
    async def test_the_app_confirms_for_its_signed_in_user_and_it_connects(
        self,
        service: Process,
        sandbox_process: Process,
        http: httpx.AsyncClient,
        browsers: tuple[httpx.AsyncClient, httpx.AsyncClient],
    ) -> None:
        """Alice starts in her browser; the callback lands (even in another browser: a mobile hand-off) and the
        app's backend completes it for Alice: tokens stored, a session token for Alice."""
        phone, laptop = browsers
        async with phone, laptop:
            link = await connect_link(http, service, "alice", redirect_to=APP)
            callback = await approve(phone, await to_consent(phone, link, sandbox_process), sandbox_process)
            landed = await laptop.get(callback)
            assert landed.status_code == 303
            completed = await complete(http, service, "alice", landed.headers["location"])
            assert completed.status_code == 200, completed.text
            body = completed.json()
            assert (body["token_status"]["user_id"], body["token_status"]["status"]) == ("alice", "valid")
            me = await laptop.get(
                f"{service.url}/v1/me/token-status", headers={"Authorization": f"Bearer {body['session_token']}"}
            )
            assert me.json()["user_id"] == "alice"
            assert (await sandbox_stats(http, sandbox_process))["calls"]["exchange"] == 1

    async def test_the_browser_bound_flow_connects_in_the_browser_that_started_it(
        self,
        service: Process,
        sandbox_process: Process,
        http: httpx.AsyncClient,
        browsers: tuple[httpx.AsyncClient, httpx.AsyncClient],
    ) -> None:
        """Without redirect_to: the browser that opened the link finishes it and is signed in as its user (this
        mode trusts whoever opens the link, as the README says)."""
        alice, _other = browsers
        async with alice, _other:
            bound = await to_consent(alice, await connect_link(http, service, "alice"), sandbox_process)
            landed = await alice.get(await approve(alice, bound, sandbox_process))
            assert landed.status_code == 200, landed.text
            assert await signed_in_as(alice, service) == "alice"
            assert await status(http, service, "alice") == "valid"
