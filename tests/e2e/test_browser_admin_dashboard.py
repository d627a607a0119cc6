"""The operators' dashboard in a real Chromium against `tokensvc serve --sandbox`: users in several states made through
the service API and the sandbox, then sign in through the form and read the page. Saves its screenshot in the test's
temporary directory, or as docs/dashboard.png (the README's picture) when TOKENSVC_SCREENSHOTS=docs.

Skipped when Chromium (/usr/bin/chromium) is missing, unless TOKENSVC_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Request, async_playwright, expect

from tests.e2e.example_app import CHROMIUM, CHROMIUM_ARGS, ROOT, require_browser
from tests.e2e.processes import Process, start_service, wait_ready

pytestmark = [pytest.mark.browser, pytest.mark.slow]

API_KEY = "sandbox-key"
ADMIN_PASSWORD = "operators-only-e2e"
UI_TIMEOUT_MS = 15_000
HEX40 = re.compile(r"[0-9a-f]{40}")


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where this run's screenshot goes: docs/ only when asked, so a test run leaves the work tree clean."""
    return ROOT / "docs" if os.environ.get("TOKENSVC_SCREENSHOTS") == "docs" else tmp_path


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        message = f"the dashboard browser test needs Chromium at {CHROMIUM} (apt-get install chromium)"
        if require_browser():
            pytest.fail(f"{message} (TOKENSVC_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    return CHROMIUM


@dataclass
class Service:
    process: Process
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.process.url

    async def control(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, f"{self.url}/sandbox/strava/_control{path}", **kwargs)
        response.raise_for_status()
        return response.json()

    async def api(self, method: str, path: str, *, expect_status: int = 200, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        response = await self.http.request(method, f"{self.url}{path}", headers=headers, **kwargs)
        assert response.status_code == expect_status, response.text
        return response.json()

    async def connect(self, user_id: str, expires_in: int) -> dict[str, Any]:
        """An athlete in the sandbox whose tokens are imported for `user_id` through the service API."""
        athlete: dict[str, Any] = await self.control("POST", "/athletes", json={"expires_in": expires_in})
        body = {k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
        await self.api("PUT", f"/v1/users/{user_id}/tokens", json=body)
        return athlete


@pytest.fixture
async def service(chromium: Path, tmp_path: Path) -> AsyncIterator[Service]:
    process = start_service(
        "tokensvc",
        tmp_path,
        {
            "TOKENSVC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'tokensvc.db'}",
            "TOKENSVC_ADMIN_PASSWORD": ADMIN_PASSWORD,
        },
        "--sandbox",
    )
    try:
        await wait_ready(process)
        async with httpx.AsyncClient(timeout=30) as http:
            yield Service(process, http)
    finally:
        process.stop()


async def seed_states(service: Service) -> dict[str, dict[str, Any]]:
    """Seven users: three valid (one of them just refreshed through the sandbox), two expiring (one after a Strava
    500), one expired, and one whose refresh token Strava rejects."""
    athletes = {
        "ana": await service.connect("ana", 6 * 3600),
        "ben": await service.connect("ben", 5 * 3600),
        "cleo": await service.connect("cleo", 900),
        "gus": await service.connect("gus", -120),
    }
    athletes["dora"] = await service.connect("dora", 100)
    refreshed = await service.api("POST", "/v1/users/dora/refresh")
    assert refreshed["refreshed"] is True
    athletes["eli"] = await service.connect("eli", 100)
    await service.control("POST", f"/athletes/{athletes['eli']['athlete_id']}/revoke")
    rejected = await service.api("POST", "/v1/users/eli/refresh", expect_status=409)
    assert rejected["code"] == "reauth_required"
    athletes["finn"] = await service.connect("finn", 100)
    await service.control("POST", "/faults", json={"endpoint": "refresh", "kind": "status", "status": 500})
    unavailable = await service.api("POST", "/v1/users/finn/refresh", expect_status=503)
    assert unavailable["code"] == "provider_unavailable"
    return athletes


async def every_token(service: Service, athletes: dict[str, dict[str, Any]]) -> set[str]:
    """The tokens imported and the ones Strava holds now (dora's rotated pair among them)."""
    tokens: set[str] = set()
    for athlete in athletes.values():
        tokens |= {athlete["access_token"], athlete["refresh_token"]}
        now = await service.control("GET", f"/athletes/{athlete['athlete_id']}")
        tokens |= {value for key, value in now.items() if key.endswith("_token") and isinstance(value, str)}
    return tokens


class TestOperatorsDashboardInChromium:
    async def test_sign_in_and_read_the_dashboard(self, service: Service, chromium: Path, screenshots: Path) -> None:
        """Sign in with the admin password; the page shows the counts, the reconnect row with its reason, the
        failure, the chart's bars; it asks nothing of any other origin and shows no token."""
        athletes = await seed_states(service)
        requests: list[Request] = []
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 900})
                page = await context.new_page()
                page.on("request", lambda request: requests.append(request))

                await page.goto(f"{service.url}/dashboard")
                await expect(page).to_have_url(f"{service.url}/dashboard/login", timeout=UI_TIMEOUT_MS)
                await page.fill("#secret", "not the password")
                await page.click("#sign-in")
                await expect(page.get_by_role("alert")).to_contain_text("That is not the admin password")

                await page.fill("#secret", ADMIN_PASSWORD)
                await page.click("#sign-in")
                await expect(page).to_have_url(f"{service.url}/dashboard", timeout=UI_TIMEOUT_MS)

                for key, count in [
                    ("total", 7),
                    ("valid", 3),
                    ("expiring_soon", 2),
                    ("expired", 1),
                    ("needs_reauth", 1),
                ]:
                    await expect(page.get_by_test_id(f"users-{key}").locator(".value")).to_have_text(str(count))
                reconnect = page.get_by_test_id("must-reconnect").locator("tbody tr")
                await expect(reconnect).to_have_count(1)
                await expect(reconnect.locator("td")).to_have_text(
                    ["eli", str(athletes["eli"]["athlete_id"]), "Strava rejected the refresh token", re.compile("UTC")]
                )
                failures = page.get_by_test_id("failures").locator("tbody tr")
                await expect(failures).to_have_count(2)
                await expect(failures.nth(0).locator("td").nth(1)).to_have_text("finn")
                await expect(failures.nth(0).locator("td").nth(3)).to_have_text("transient")
                await expect(failures.nth(0).locator("td").nth(4)).to_have_text("500")
                await expect(failures.nth(1).locator("td").nth(1)).to_have_text("eli")
                chart = page.get_by_test_id("chart").locator("svg")
                await expect(chart).to_be_visible()
                # All three attempts this hour: one bar of each series, stacked.
                await expect(chart.locator("rect.bar")).to_have_count(3)
                for series in ("success", "failure", "reauth_required"):
                    await expect(chart.locator(f"rect.bar-{series}")).to_have_count(1)
                await expect(page.get_by_test_id("budget-paused")).to_have_text("Not paused")
                await expect(page.get_by_test_id("budget-15min")).to_have_text(re.compile(r"^\d+ / \d+$"))

                html = await page.content()
                for token in await every_token(service, athletes):
                    assert token not in html
                assert not HEX40.search(html)
                await page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)

                await page.get_by_role("button", name="Sign out").click()
                await expect(page).to_have_url(f"{service.url}/dashboard/login", timeout=UI_TIMEOUT_MS)
            finally:
                await browser.close()
        assert requests, "the listener saw the page's requests"
        foreign = [r.url for r in requests if not r.url.startswith(f"{service.url}/")]
        assert foreign == []
