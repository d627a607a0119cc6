"""The React dashboard example in a real Chromium against `tokensvc serve --sandbox`: connect, the on-mount refresh
once per page load, revoke and reconnect, sync. Saves its screenshots in the test's temporary directory, or in
docs/ (the README's pictures) when TOKENSVC_SCREENSHOTS=docs.

Skipped when Chromium (/usr/bin/chromium) or npm is missing, unless TOKENSVC_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import Page, Request, Response, async_playwright, expect

from tests.e2e.example_app import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    build_example,
    missing_tools,
    require_browser,
    start_preview,
    wait_preview,
)
from tests.e2e.processes import Process, free_port, start_service, wait_ready

pytestmark = [pytest.mark.browser, pytest.mark.slow]

API_KEY = "sandbox-key"
USER = "runner-1"
DOCS = ROOT / "docs"


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where this run's screenshots go: docs/ only when asked, so a test run leaves the work tree clean."""
    return DOCS if os.environ.get("TOKENSVC_SCREENSHOTS") == "docs" else tmp_path


UI_TIMEOUT_MS = 15_000
HEX40 = re.compile(rb"[0-9a-f]{40}")


@pytest.fixture(scope="session")
def example_dist() -> Path:
    """The built example (built here when missing or older than its sources)."""
    missing = missing_tools()
    if missing:
        message = f"browser tests need {', '.join(missing)}"
        if require_browser():
            pytest.fail(f"{message} (TOKENSVC_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    return build_example()


@dataclass
class Stack:
    tokensvc: Process
    app: Process
    http: httpx.AsyncClient
    public_url: str  # tokensvc as the browser sees it: another site than the app

    @property
    def sandbox(self) -> str:
        return f"{self.tokensvc.url}/sandbox/strava/_control"

    async def control(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, f"{self.sandbox}{path}", **kwargs)
        response.raise_for_status()
        return response.json()

    async def service(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        response = await self.http.request(method, f"{self.tokensvc.url}{path}", headers=headers, **kwargs)
        response.raise_for_status()
        return response.json()


@pytest.fixture
async def stack(example_dist: Path, tmp_path: Path) -> AsyncIterator[Stack]:
    """tokensvc with its sandbox on one site (`localhost`) and the example app (`vite preview`) on another
    (`127.0.0.1`), so the browser's cookie rules are those of a real deployment: tokensvc's cookies are third-party
    to the app, and the app's confirmation (not a cookie) is what signs the user in."""
    app_port, tokensvc_port = free_port(), free_port()
    app_origin = f"http://127.0.0.1:{app_port}"
    public_url = f"http://localhost:{tokensvc_port}"
    tokensvc = start_service(
        "tokensvc",
        tmp_path,
        {
            "TOKENSVC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'tokensvc.db'}",
            "TOKENSVC_CORS_ORIGINS": app_origin,
            "TOKENSVC_REDIRECT_ALLOWLIST": f"{app_origin}/",
            "TOKENSVC_PUBLIC_URL": public_url,
        },
        "--sandbox",
        port=tokensvc_port,
    )
    app = start_preview(tmp_path, tokensvc_url=public_url, api_key=API_KEY, port=app_port)
    try:
        await wait_ready(tokensvc)
        await wait_preview(app)
        async with httpx.AsyncClient(timeout=10) as http:
            yield Stack(tokensvc, app, http, public_url)
    finally:
        app.stop()
        tokensvc.stop()


@dataclass
class Traffic:
    """What the page sent and received, recorded from Playwright's events."""

    tokensvc_url: str
    requests: list[Request] = field(default_factory=list)
    bodies: list[asyncio.Task[tuple[str, bytes | None]]] = field(default_factory=list)
    mark: int = 0

    def on_request(self, request: Request) -> None:
        self.requests.append(request)

    def on_response(self, response: Response) -> None:
        # Read each body at once: once the page navigates, Chromium may have dropped it.
        self.bodies.append(asyncio.ensure_future(_body_of(response)))

    def start_counting(self) -> None:
        """Count the proactive calls from here on (the next page load)."""
        self.mark = len(self.requests)

    def proactive_calls(self) -> int:
        url = f"{self.tokensvc_url}/proactive-token-refresh"
        return sum(1 for r in self.requests[self.mark :] if r.method == "POST" and r.url == url)

    async def received(self) -> list[tuple[str, bytes | None]]:
        return list(await asyncio.gather(*self.bodies))


async def _body_of(response: Response) -> tuple[str, bytes | None]:
    if 300 <= response.status < 400:
        return response.url, b""  # redirects carry no body the page can read
    try:
        return response.url, await response.body()
    except Exception:  # the page navigated away before the body could be read
        return response.url, None


async def expect_status(page: Page, status: str) -> None:
    """Both banners show `status` (the raw value, as text and as data-status)."""
    for banner in ("compact", "integrated"):
        await expect(page.get_by_test_id(f"{banner}-status")).to_have_text(status, timeout=UI_TIMEOUT_MS)
        await expect(page.get_by_test_id(f"{banner}-banner")).to_have_attribute(
            "data-status", status, timeout=UI_TIMEOUT_MS
        )


async def approve_on_strava(page: Page, *, athlete_id: int | None = None) -> int:
    """On the sandbox's consent page: optionally type an existing athlete id (reconnect), then Authorize."""
    await page.wait_for_url(re.compile(r"/sandbox/strava/oauth/authorize\?"), timeout=UI_TIMEOUT_MS)
    field_ = page.locator("#athlete_id")
    if athlete_id is not None:
        await field_.fill(str(athlete_id))
    chosen = int(await field_.input_value())
    await page.click("#approve")
    # tokensvc sends the browser back with strava=confirm&connect_id=…; the app's backend confirms it for its user
    # and the page rewrites its URL to strava=connected.
    await page.wait_for_url(re.compile(r"[?&]strava=connected(&|$)"), timeout=UI_TIMEOUT_MS)
    return chosen


def landing_query(page: Page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


class TestDashboardInChromium:
    async def test_connect_refresh_once_revoke_reconnect_and_sync(self, stack: Stack, screenshots: Path) -> None:
        """Three components mount but tokensvc is asked once; the page never sees a token; reconnect works."""
        started = time.monotonic()
        app_url = f"{stack.app.url}/?user={USER}"
        traffic = Traffic(stack.public_url)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 800})
                page = await context.new_page()
                page.on("request", traffic.on_request)
                page.on("response", traffic.on_response)
                page_errors: list[str] = []
                page.on("pageerror", lambda error: page_errors.append(str(error)))

                # a. No session yet: both banners say so, and the card offers to connect.
                await page.goto(app_url)
                await expect_status(page, "not_connected")
                await expect(page.get_by_test_id("connect-button")).to_be_visible()
                await expect(page.get_by_test_id("sync-button")).to_be_disabled()
                assert traffic.proactive_calls() == 1

                # b. Connect through the sandbox's consent page, the next grant already inside the refresh buffer.
                await stack.control("POST", "/next-grant", json={"expires_in": 600})
                traffic.start_counting()
                await page.get_by_test_id("connect-button").click()
                athlete_id = await approve_on_strava(page)
                assert landing_query(page) == {"user": [USER], "strava": ["connected"]}
                # the app's backend confirmed the connect_id for its user; tokensvc set no cookie on the way back
                assert any(r.url == f"{stack.app.url}/api/connect/complete" for r in traffic.requests[traffic.mark :])
                assert not [c for c in await context.cookies() if c["name"] == "tokensvc_session"]

                # c. The three components mounted; tokensvc was asked once and refreshed once at Strava.
                await expect_status(page, "valid")
                await expect(page.get_by_test_id("refresh-outcome")).to_contain_text("refreshed at Strava")
                await expect(page.get_by_test_id("return-notice")).to_be_visible()
                # The token tokensvc was handed lived 10 minutes; the one it refreshed to lives 6 hours.
                await expect(page.get_by_test_id("expires-in")).to_contain_text(re.compile(r"in (359|360) min"))
                await page.wait_for_load_state("networkidle")
                assert traffic.proactive_calls() == 1
                await expect(page.get_by_test_id("tokensvc-calls")).to_have_text("1")
                stats = await stack.control("GET", "/stats")
                assert stats["calls"]["exchange"] == 1
                assert stats["calls"]["refresh"] == 1
                status = await stack.service("GET", f"/v1/users/{USER}/token-status")
                assert (status["status"], status["athlete_id"]) == ("valid", athlete_id)
                await self.assert_page_saw_no_secret(stack, traffic, athlete_id)

                # d. The screenshot for the README.
                DOCS.mkdir(exist_ok=True)
                await page.screenshot(path=screenshots / "browser-dashboard.png", full_page=True)

                # e. The athlete revokes access on strava.com; tokensvc holds a pair that is due, so the reload
                #    really asks Strava, which refuses: the banners ask to reconnect.
                dead = await stack.control("POST", f"/athletes/{athlete_id}/revoke")
                await stack.service(
                    "PUT",
                    f"/v1/users/{USER}/tokens",
                    json={
                        "access_token": dead["access_token"],
                        "refresh_token": dead["refresh_token"],
                        "expires_at": int(time.time()) + 600,
                        "athlete_id": athlete_id,
                    },
                )
                traffic.start_counting()
                await page.reload()
                await expect_status(page, "needs_reauth")
                await expect(page.get_by_test_id("return-notice")).to_have_count(0)
                await expect(page.get_by_test_id("reauth-reason")).to_contain_text("no longer accepts")
                await expect(page.get_by_test_id("compact-reconnect-link")).to_be_visible()
                await expect(page.get_by_test_id("sync-button")).to_be_disabled()
                assert traffic.proactive_calls() == 1
                assert (await stack.control("GET", "/stats"))["calls"]["refresh"] == 2
                await page.screenshot(path=screenshots / "browser-reconnect.png", full_page=True)

                traffic.start_counting()
                await page.get_by_test_id("reconnect-button").click()
                assert await approve_on_strava(page, athlete_id=athlete_id) == athlete_id
                # The marker of the first connect was dropped from redirect_to, so it appears once.
                assert landing_query(page) == {"user": [USER], "strava": ["connected"]}
                await expect_status(page, "valid")
                assert traffic.proactive_calls() == 1
                status = await stack.service("GET", f"/v1/users/{USER}/token-status")
                assert (status["status"], status["needs_reauth"], status["athlete_id"]) == ("valid", False, athlete_id)
                assert (await stack.control("GET", f"/athletes/{athlete_id}"))["revoked"] is False

                # f. Sync now: asks tokensvc again (ensureFresh), then the app's backend reads the athlete and the
                #    5 newest of their 6 activities through tokensvc's gateway; the card lists them, newest first.
                names = await self.upload_activities(stack, athlete_id, 6)
                traffic.start_counting()
                await page.get_by_test_id("sync-button").click()
                await expect(page.get_by_test_id("sync-status")).to_contain_text("Synced", timeout=UI_TIMEOUT_MS)
                await expect(page.get_by_test_id("sync-detail")).to_contain_text(f"athlete #{athlete_id}")
                await expect(page.get_by_test_id("activity-name")).to_have_text(names[::-1][:5])
                assert traffic.proactive_calls() == 1
                calls = (await stack.control("GET", "/stats"))["calls"]
                assert (calls["athlete"], calls["activities"]) == (1, 1)
                assert not any("/v1/users/" in r.url for r in traffic.requests)  # the service API is the backend's
                await page.screenshot(path=screenshots / "browser-sync.png", full_page=True)
                await self.assert_page_saw_no_secret(stack, traffic, athlete_id)
                assert page_errors == []
            finally:
                await browser.close()
        print(f"browser scenario took {time.monotonic() - started:.1f}s")

    async def upload_activities(self, stack: Stack, athlete_id: int, count: int) -> list[str]:
        """`count` activities on consecutive days, oldest first; their names."""
        names = [f"Tempo run {i + 1}" for i in range(count)]
        start = int(time.time()) - 10 * 86_400
        for i, name in enumerate(names):
            body = {"name": name, "start_date": start + i * 86_400, "distance": 8000 + 500 * i}
            await stack.control("POST", f"/athletes/{athlete_id}/activities", json=body)
        return names

    async def test_a_connect_strava_refuses_for_athlete_capacity_says_the_app_is_full(self, stack: Stack) -> None:
        """The sandbox at its capacity (no athlete more): after the consent the app's backend gets 409
        `athlete_capacity`, the page lands on `strava=capacity` with a clear note and stays not connected."""
        await stack.control("POST", "/capacity", json={"athlete_capacity": 0})
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(f"{stack.app.url}/?user={USER}")
                await expect_status(page, "not_connected")
                await page.get_by_test_id("connect-button").click()
                await page.wait_for_url(re.compile(r"/sandbox/strava/oauth/authorize\?"), timeout=UI_TIMEOUT_MS)
                await page.click("#approve")
                await page.wait_for_url(re.compile(r"[?&]strava=capacity(&|$)"), timeout=UI_TIMEOUT_MS)
                assert landing_query(page) == {"user": [USER], "strava": ["capacity"]}
                await expect(page.get_by_test_id("return-notice")).to_contain_text("limit of connected athletes")
                await expect_status(page, "not_connected")
                status = await stack.service("GET", f"/v1/users/{USER}/token-status")
                assert status["status"] == "missing"
                assert (await stack.control("GET", "/stats"))["calls"]["exchange"] == 1
            finally:
                await browser.close()

    async def assert_page_saw_no_secret(self, stack: Stack, traffic: Traffic, athlete_id: int) -> None:
        """No body the page received holds a Strava token, and no request the page sent holds the API key."""
        current = await stack.control("GET", f"/athletes/{athlete_id}")
        tokens = {current["access_token"].encode(), current["refresh_token"].encode()}
        ledger = await stack.control("GET", "/ledger")
        issued_hashes = {entry["sha256"] for entry in ledger[str(athlete_id)]}
        received = await traffic.received()
        proactive = [body for url, body in received if url == f"{stack.public_url}/proactive-token-refresh"]
        assert proactive, "the page received no answer from tokensvc"
        assert all(body is not None for body in proactive), "an answer from tokensvc could not be read"
        for url, body in received:
            if not body:
                continue
            assert not any(token in body for token in tokens), f"{url} sent a Strava token to the page"
            hashes = {hashlib.sha256(match).hexdigest() for match in HEX40.findall(body)}
            assert not hashes & issued_hashes, f"{url} sent a (refresh) token to the page"
        for request in traffic.requests:
            sent = f"{request.headers} {request.post_data or ''}"
            assert API_KEY not in sent, f"the page sent the API key to {request.url}"
