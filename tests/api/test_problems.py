"""Answers to input the framework would otherwise refuse wrongly or bend (found by Schemathesis, tests/fuzz)."""

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


class TestStrictBodies:
    @pytest.mark.parametrize(
        "changes",
        [{"athlete_id": True}, {"expires_at": "1900000000"}, {"expires_at": 1.5}, {"access_token": 12345}],
    )
    async def test_values_of_the_wrong_json_type_are_422_not_coerced(
        self, client: httpx.AsyncClient, changes: dict[str, object]
    ) -> None:
        """`true` is not athlete 1 and "1900000000" is not a time: a wrong JSON type is refused, nothing stored."""
        body = {"access_token": "a", "refresh_token": "b", "expires_at": 1_900_000_000, "athlete_id": 7} | changes
        response = await client.put("/v1/users/u1/tokens", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error"
        assert (await client.get("/v1/users/u1/token-status")).json()["status"] == "missing"

    async def test_scopes_may_still_be_comma_separated_as_strava_writes_them(self, client: httpx.AsyncClient) -> None:
        """Strictness is about types: the documented string form of `scopes` keeps working."""
        body = {"access_token": "a", "refresh_token": "b", "expires_at": 1_800_010_000, "scopes": "read,activity:read"}
        response = await client.put("/v1/users/u1/tokens", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["scopes"] == ["read", "activity:read"]

    async def test_connect_refuses_a_non_string_redirect(self, client: httpx.AsyncClient) -> None:
        """The connect body is strict too."""
        response = await client.post("/v1/users/u1/connect", json={"approval_prompt": "force", "redirect_to": 5})
        assert response.status_code == 422, response.text
