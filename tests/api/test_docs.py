"""The console pages as bytes: they name no other host, carry their own CSP, and their assets are served by the
service itself (the browser proof is tests/e2e/test_browser_docs.py)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import make_settings
from tokensvc.api.docs import CONTENT_SECURITY_POLICY
from tokensvc.app import create_app

URL_IN_PAGE = re.compile(r"""(?:src|href|spec-url|data-openapi-url)=['"]?([^'" >]+)""")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The app without its lifespan: the pages and assets need no database."""
    app = create_app(make_settings("sqlite+aiosqlite:///:memory:"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tokensvc.test") as client:
        yield client


class TestConsolePages:
    @pytest.mark.parametrize("path", ["/docs", "/redoc"])
    async def test_every_url_in_the_page_is_this_service(self, http: httpx.AsyncClient, path: str) -> None:
        """Scripts, styles, favicon and the OpenAPI are all paths on this origin; the favicon is declared, so the
        browser does not go looking for one."""
        response = await http.get(path)
        assert response.status_code == 200
        urls = URL_IN_PAGE.findall(response.text)
        assert "/docs/assets/favicon.png" in urls
        assert "/openapi.json" in urls
        assert [url for url in urls if not url.startswith("/")] == []
        assert "<script>" not in response.text  # no inline script: the CSP allows none

    @pytest.mark.parametrize("path", ["/docs", "/redoc"])
    async def test_each_page_sets_the_policy_that_lets_its_assets_run(self, http: httpx.AsyncClient, path: str) -> None:
        """Scripts and connections to this origin only, no framing, no base or form targets elsewhere."""
        policy = (await http.get(path)).headers["content-security-policy"]
        assert policy == CONTENT_SECURITY_POLICY
        directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'"
        assert directives["connect-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"

    async def test_swaggers_public_validator_is_switched_off(self, http: httpx.AsyncClient) -> None:
        """Swagger UI would otherwise ask validator.swagger.io about the document."""
        init = await http.get("/docs/assets/swagger-init.js")
        assert init.status_code == 200
        assert "validatorUrl: null" in init.text

    async def test_the_oauth2_redirect_page_fastapi_would_add_is_not_there(self, http: httpx.AsyncClient) -> None:
        """No OAuth2 scheme is declared, so no redirect helper page is served."""
        assert (await http.get("/docs/oauth2-redirect")).status_code == 404


class TestConsoleAssets:
    @pytest.mark.parametrize(
        ("name", "content_type", "at_least"),
        [
            ("swagger-ui-bundle.js", "text/javascript", 500_000),
            ("swagger-ui.css", "text/css", 50_000),
            ("redoc.standalone.js", "text/javascript", 500_000),
            ("swagger-init.js", "text/javascript", 100),
            ("favicon.png", "image/png", 100),
        ],
    )
    async def test_the_assets_are_served_from_the_installed_packages(
        self, http: httpx.AsyncClient, name: str, content_type: str, at_least: int
    ) -> None:
        """Each asset the pages name is here, whole, with its type and a validator for caching."""
        response = await http.get(f"/docs/assets/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(content_type)
        assert len(response.content) >= at_least
        assert response.headers["etag"]

    async def test_nothing_outside_the_asset_folders_is_reachable(self, http: httpx.AsyncClient) -> None:
        """The static mount serves its folders only."""
        for path in ("/docs/assets/../../app.py", "/docs/assets/%2e%2e/docs.py", "/docs/assets/nope.js"):
            assert (await http.get(path)).status_code == 404, path
