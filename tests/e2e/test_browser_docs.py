"""The API console (/docs, Swagger UI) and reference (/redoc) in a real Chromium against `tokensvc serve --sandbox`,
with every request to a host other than 127.0.0.1 blocked, as on a network that reaches nothing but the service:
Authorize with the API key, Try it out on token-status and access-token, and read the answers. Saves its screenshot
in the test's temporary directory, or as docs/console.png (the README's picture) when TOKENSVC_SCREENSHOTS=docs.

Skipped when Chromium (/usr/bin/chromium) is missing, unless TOKENSVC_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import BrowserContext, ConsoleMessage, Page, Route, async_playwright, expect

from tests.e2e.example_app import CHROMIUM, CHROMIUM_ARGS, ROOT, require_browser
from tests.e2e.processes import Process, start_service, wait_ready
from tokensvc.config import SANDBOX_API_KEY

pytestmark = [pytest.mark.browser, pytest.mark.slow]

UI_TIMEOUT_MS = 15_000
# ReDoc's bundle renders its "API docs by Redocly" logo from Redocly's CDN, with no option to leave it out; the
# page's CSP refuses it before any request is made (and the element removes itself on the error). That refusal is
# the only one expected, and the test checks it stays the only one.
REDOC_ATTRIBUTION = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where this run's screenshot goes: docs/ only when asked, so a test run leaves the work tree clean."""
    return ROOT / "docs" if os.environ.get("TOKENSVC_SCREENSHOTS") == "docs" else tmp_path


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        message = f"the console browser test needs Chromium at {CHROMIUM} (apt-get install chromium)"
        if require_browser():
            pytest.fail(f"{message} (TOKENSVC_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture
async def service(chromium: Path, tmp_path: Path) -> AsyncIterator[Process]:
    """`tokensvc serve --sandbox` on SQLite, at default settings."""
    process = start_service(
        "tokensvc", tmp_path, {"TOKENSVC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'tokensvc.db'}"}, "--sandbox"
    )
    try:
        await wait_ready(process)
        yield process
    finally:
        process.stop()


@dataclass
class Offline:
    """What the page tried beyond 127.0.0.1 (each one refused) and what it said on its console."""

    refused: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    async def route(self, route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            await route.continue_()
        else:
            self.refused.append(route.request.url)
            await route.abort("internetdisconnected")

    def watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.console.append(f"{message.type}: {message.text}")


async def offline_context(playwright: Any, chromium: Path) -> tuple[Any, BrowserContext, Offline]:
    browser = await playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    offline = Offline()
    await context.route("**/*", offline.route)
    return browser, context, offline


async def connect_user(service: Process, user_id: str) -> dict[str, Any]:
    """An athlete connected in the sandbox with six hours left, imported for `user_id`."""
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {SANDBOX_API_KEY}"}) as http:
        athlete = (await http.post(f"{service.url}/sandbox/strava/_control/athletes", json={})).raise_for_status()
        imported = await http.put(f"{service.url}/v1/users/{user_id}/tokens", json=athlete.json())
        imported.raise_for_status()
        result: dict[str, Any] = athlete.json()
        return result


async def try_it_out(page: Page, operation_id: str, user_id: str) -> Any:
    """Expand an operation, Try it out with `user_id`, Execute; the JSON body of the answer shown, once it is 200."""
    operation = page.locator(f"#operations-tokens-{operation_id}")
    await operation.locator(".opblock-summary").click()
    await operation.get_by_role("button", name="Try it out").click()
    await operation.locator("input[placeholder='user_id']").fill(user_id)
    await operation.get_by_role("button", name="Execute").click()
    answer = operation.locator(".live-responses-table tbody")
    await expect(answer.locator(".response-col_status").first).to_have_text("200", timeout=UI_TIMEOUT_MS)
    return json.loads(await answer.locator(".microlight").first.inner_text())


class TestConsoleOffline:
    async def test_authorize_and_try_it_out_with_no_other_host_reachable(
        self, service: Process, chromium: Path, screenshots: Path
    ) -> None:
        """Swagger UI loads from the service alone, Authorize takes the API key, and Try it out shows the user's
        token status and access token; nothing asked another host, and the CSP refused nothing."""
        athlete = await connect_user(service, "42")
        async with async_playwright() as playwright:
            browser, context, offline = await offline_context(playwright, chromium)
            try:
                page = await context.new_page()
                offline.watch(page)
                response = await page.goto(f"{service.url}/docs")
                assert response is not None
                assert "script-src 'self'" in (await response.all_headers())["content-security-policy"]
                await expect(page.locator(".information-container .title")).to_contain_text(
                    "tokensvc", timeout=UI_TIMEOUT_MS
                )

                await page.locator("button.authorize").first.click()
                api_key = page.locator(".auth-container").filter(
                    has=page.locator("h4", has_text=re.compile(r"^ApiKey\b"))
                )
                await api_key.locator("input").fill(SANDBOX_API_KEY)
                await api_key.locator("button.authorize").click()
                await expect(api_key.get_by_role("heading", name="Authorized")).to_be_visible()
                await page.locator(".modal-ux button.btn-done").first.click()

                status = await try_it_out(page, "get_token_status", "42")
                assert status["status"] == "valid"
                assert status["athlete_id"] == athlete["athlete_id"]
                token = await try_it_out(page, "get_access_token", "42")
                assert token["access_token"] == athlete["access_token"]
                assert token["expires_in"] >= 300

                await page.locator("#operations-tokens-get_access_token").scroll_into_view_if_needed()
                await page.screenshot(path=str(screenshots / "console.png"))
            finally:
                await browser.close()
        assert offline.refused == []
        assert offline.console == []

    async def test_the_reference_renders_with_no_other_host_reachable(self, service: Process, chromium: Path) -> None:
        """ReDoc renders every tag and operation from the service alone; its CDN logo is refused by the CSP before
        any request, and nothing else is."""
        async with async_playwright() as playwright:
            browser, context, offline = await offline_context(playwright, chromium)
            try:
                page = await context.new_page()
                offline.watch(page)
                await page.goto(f"{service.url}/redoc")
                await expect(page.get_by_role("heading", name="Get Access Token")).to_be_visible(timeout=UI_TIMEOUT_MS)
                await expect(page.get_by_role("heading", name="tokensvc (0.1.0)")).to_be_visible()
                await expect(page.locator(f"img[src='{REDOC_ATTRIBUTION}']")).to_have_count(0)
            finally:
                await browser.close()
        assert offline.refused == []
        assert [line for line in offline.console if REDOC_ATTRIBUTION not in line] == []
