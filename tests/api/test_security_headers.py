"""Every response says nosniff and forbids framing; each page carries a CSP (its own, or the strict default)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import API_KEY, FakeClock
from tokensvc.api.security_headers import DEFAULT_POLICY

STRICT = DEFAULT_POLICY.decode()


def assert_protected(response: httpx.Response) -> None:
    assert response.headers.get("x-content-type-options") == "nosniff", response.url
    assert response.headers.get("x-frame-options") == "DENY", response.url
    assert "frame-ancestors 'none'" in response.headers.get("content-security-policy", ""), response.url


class TestEveryResponse:
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
            ("GET", "/v1/users/nobody/token-status"),  # 200 JSON
            ("GET", "/v1/users/nobody/access-token"),  # the fast path's problem (409 tokens_missing)
            ("GET", "/v1/users/bad%20id/access-token"),  # FastAPI's 422
            ("GET", "/nowhere"),  # 404
            ("POST", "/v1/users/u1/connect"),
            ("GET", "/v1/oauth/strava/callback?code=x&state=forged"),  # the HTML error page
            ("GET", "/v1/me/token-status"),  # 401 without a session
        ],
    )
    async def test_an_api_answer_carries_the_headers_and_the_strict_policy(
        self, client: httpx.AsyncClient, method: str, path: str
    ) -> None:
        """JSON, problems and the small HTML pages: nosniff, DENY, and the default policy."""
        response = await client.request(method, path)
        assert_protected(response)
        assert response.headers["content-security-policy"] == STRICT

    async def test_a_fast_path_token_carries_them_too(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """The access-token fast path skips the middleware stack and adds the same headers itself."""
        stored = await client.put(
            "/v1/users/u1/tokens",
            json={"access_token": "a" * 40, "refresh_token": "r" * 40, "expires_at": int(clock()) + 20_000},
        )
        assert stored.status_code == 200, stored.text
        response = await client.get("/v1/users/u1/access-token")
        assert response.status_code == 200
        assert_protected(response)
        assert response.headers.get_list("x-frame-options") == ["DENY"]

    async def test_a_refused_unauthenticated_call_carries_them(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/users/u1/token-status", headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401
        assert_protected(response)


class TestPagesKeepTheirOwnPolicy:
    async def test_the_dashboard_keeps_its_policy(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/dashboard/login")
        assert_protected(response)
        assert response.headers.get_list("content-security-policy") == [
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        ]

    async def test_the_docs_console_keeps_the_policy_that_lets_its_assets_run(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/docs")
        assert_protected(response)
        policy = response.headers.get_list("content-security-policy")
        assert len(policy) == 1
        assert "script-src 'self'" in policy[0]

    async def test_the_api_key_is_not_needed_for_the_headers(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/healthz", headers={"Authorization": f"Bearer {API_KEY}x"})
        assert_protected(response)
