"""Problem rendering for input the framework itself refuses (found by the Schemathesis run in tests/fuzz)."""

from __future__ import annotations

import httpx
import pytest


class TestUndecodableBodies:
    @pytest.mark.parametrize("path", ["/v1/users/u1/tokens", "/v1/users/u1/connect"])
    async def test_a_body_that_is_not_utf8_is_a_422_problem_not_a_400(
        self, client: httpx.AsyncClient, path: str
    ) -> None:
        """FastAPI answers 400 to bytes it cannot decode; the contract says malformed JSON is 422 `validation_error`."""
        method = "PUT" if path.endswith("/tokens") else "POST"
        response = await client.request(method, path, content=b"\x80", headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["code"] == "validation_error"
        assert problem["status"] == 422
        assert (await client.get("/v1/users/u1/token-status")).json()["status"] == "missing"
