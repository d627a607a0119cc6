"""The usual mistakes callers make, each answered with a problem that says what to do: a body that is not JSON
(415), JSON that does not parse (422, saying where in words), a 401 that names its scheme, and Strava's own token
answer pasted into the import as it is. None of it depends on the database: SQLite only."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.api.test_tokens_api import assert_problem
from tests.conftest import FakeClock, make_settings, seed_athlete
from tokensvc.config import Settings
from tokensvc.sandbox import SandboxState


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return make_settings(sqlite_url)


def pair(sandbox: SandboxState, clock: FakeClock, *, expires_in: int = 20_000) -> dict[str, Any]:
    user = seed_athlete(sandbox, clock, expires_in=expires_in)
    return {
        "access_token": user.access_token,
        "refresh_token": user.refresh_token,
        "expires_at": user.expires_at,
        "athlete_id": user.athlete_id,
    }


JSON_ENDPOINTS = [
    ("PUT", "/v1/users/u1/tokens"),
    ("POST", "/v1/users/u1/connect"),
    ("POST", "/v1/webhooks/strava"),
]


class TestBodiesThatAreNotJson:
    @pytest.mark.parametrize(("method", "path"), JSON_ENDPOINTS)
    @pytest.mark.parametrize(
        ("content_type", "said"),
        [
            ("application/x-www-form-urlencoded", "this one was application/x-www-form-urlencoded"),
            ("text/plain; charset=utf-8", "this one was text/plain"),
            (None, "it came with no Content-Type"),
        ],
    )
    async def test_form_text_or_no_content_type_is_415_saying_what_to_send(
        self, client: httpx.AsyncClient, method: str, path: str, content_type: str | None, said: str
    ) -> None:
        """A JSON text sent as a form, as text/plain or with no Content-Type is 415, not a 422 about dictionaries;
        nothing is stored."""
        headers = {"content-type": content_type} if content_type else {}
        body = b'{"access_token": "a", "refresh_token": "b", "expires_at": 1900000000}'
        response = await client.request(method, path, content=body, headers=headers)
        problem = assert_problem(response, 415, "unsupported_media_type")
        assert "Content-Type: application/json" in problem["detail"]
        assert said in problem["detail"]
        assert (await client.get("/v1/users/u1/token-status")).json()["status"] == "missing"

    async def test_a_declared_media_type_that_is_no_media_type_is_not_echoed(self, client: httpx.AsyncClient) -> None:
        """Whatever a caller puts in the header is not repeated back (it could carry anything)."""
        response = await client.put(
            "/v1/users/u1/tokens", content=b"{}", headers={"content-type": "x" * 300 + "/token-like"}
        )
        problem = assert_problem(response, 415, "unsupported_media_type")
        assert "xxxx" not in problem["detail"]

    @pytest.mark.parametrize(
        "content_type", ["application/json", "application/json; charset=utf-8", "application/merge-patch+json"]
    )
    async def test_json_media_types_are_read_as_json(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, content_type: str
    ) -> None:
        """application/json, with parameters, and any +json type are JSON."""
        response = await client.put(
            "/v1/users/u1/tokens", content=json.dumps(pair(sandbox, clock)), headers={"content-type": content_type}
        )
        assert response.status_code == 200, response.text

    async def test_an_optional_body_may_be_left_out_without_a_content_type(self, client: httpx.AsyncClient) -> None:
        """connect's body is optional: no body at all needs no Content-Type."""
        response = await client.post("/v1/users/u1/connect")
        assert response.status_code == 200, response.text
        assert response.json()["authorize_url"]


class TestMalformedJson:
    @pytest.mark.parametrize(
        ("body", "where"),
        [
            (b'{"access_token": "a" "refresh_token": "b"}', "Expecting ',' delimiter at line 1, column 22"),
            (b'{\n  "access_token": "a",\n  "refresh_token": }', "Expecting value at line 3, column 20"),
            (b'{"access_token": "a", "refresh_token":', "Expecting value at line 1, column 39"),
        ],
    )
    async def test_a_syntax_error_says_where_in_words(self, client: httpx.AsyncClient, body: bytes, where: str) -> None:
        """422 whose detail and error name the line and column, and whose `loc` is the body, not an offset that
        reads like a field name (`["body", "24"]`)."""
        response = await client.put("/v1/users/u1/tokens", content=body, headers={"content-type": "application/json"})
        problem = assert_problem(response, 422, "validation_error")
        assert problem["detail"] == f"the body is not valid JSON: {where}"
        assert problem["errors"] == [{"loc": ["body"], "msg": where, "type": "json_invalid"}]

    async def test_the_error_quotes_nothing_of_the_body(self, client: httpx.AsyncClient) -> None:
        """Where, never what: a token in a broken body is not echoed."""
        secret = "f" * 40
        response = await client.put(
            "/v1/users/u1/tokens",
            content=f'{{"access_token": "{secret}",'.encode(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422
        assert secret not in response.text


class TestUnauthorizedNamesItsScheme:
    @pytest.mark.parametrize("authorization", ["", "Bearer wrong-key", "Basic dXNlcjpwYXNz"])
    async def test_the_service_api_401_carries_www_authenticate_bearer(
        self, client: httpx.AsyncClient, authorization: str
    ) -> None:
        """Missing, wrong or another scheme: 401 with `WWW-Authenticate: Bearer realm="tokensvc"` (RFC 9110)."""
        response = await client.get("/v1/users/u1/token-status", headers={"Authorization": authorization})
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == 'Bearer realm="tokensvc"'

    async def test_the_browser_401s_carry_it_too(self, client: httpx.AsyncClient) -> None:
        """The session endpoints take a session token as a bearer, and say so when there is none."""
        me = await client.get("/v1/me/token-status", headers={"Authorization": ""})
        assert me.headers["www-authenticate"].startswith("Bearer")
        dashboard = await client.post(
            "/proactive-token-refresh", json={}, headers={"Authorization": "", "content-type": "application/json"}
        )
        assert dashboard.status_code == 401
        assert dashboard.headers["www-authenticate"].startswith("Bearer")
        assert dashboard.json()["needs_reauth"] is True  # still the dashboard's shape


class TestStravaShapedImports:
    async def test_the_sandboxs_athlete_answer_is_imported_as_it_is(
        self, client: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """`POST /sandbox/strava/_control/athletes` answers with `scope`: pasted as it is, the scopes are kept."""
        athlete = sandbox.create_athlete(expires_in=600, scope="read,activity:read_all")
        response = await client.put("/v1/users/u1/tokens", json=dict(athlete))
        assert response.status_code == 200, response.text
        assert response.json()["scopes"] == ["read", "activity:read_all"]
        assert response.json()["athlete_id"] == athlete["athlete_id"]

    async def test_stravas_own_token_answer_is_imported_as_it_is(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """An exchange answer (token_type, expires_in, athlete{...}) with the redirect's scope: athlete.id is the
        athlete, the scope string the scopes."""
        tokens = pair(sandbox, clock)
        body = {
            "token_type": "Bearer",
            "expires_at": tokens["expires_at"],
            "expires_in": 20_000,
            "refresh_token": tokens["refresh_token"],
            "access_token": tokens["access_token"],
            "athlete": {"id": tokens["athlete_id"], "username": "marianne_t", "firstname": "Marianne"},
            "scope": "read activity:read_all",
        }
        response = await client.put("/v1/users/u1/tokens", json=body)
        assert response.status_code == 200, response.text
        status = response.json()
        assert (status["athlete_id"], status["scopes"]) == (tokens["athlete_id"], ["read", "activity:read_all"])

    @pytest.mark.parametrize(
        ("extra", "said"),
        [
            ({"scope": "read", "scopes": ["read"]}, "give `scopes` or Strava's `scope`, not both"),
            ({"athlete": {"id": 2}, "athlete_id": 1}, "`athlete_id` and `athlete.id` name different athletes"),
            ({"token_type": "Basic"}, "Input should be 'Bearer'"),
            ({"athlete": {"id": "7"}}, "Input should be a valid integer"),
        ],
    )
    async def test_contradictions_and_wrong_types_are_422(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, extra: dict[str, Any], said: str
    ) -> None:
        """Two names for one thing that disagree, or Strava's fields with the wrong values: refused, nothing stored."""
        body = {k: v for k, v in pair(sandbox, clock).items() if k != "athlete_id"} | extra
        problem = assert_problem(await client.put("/v1/users/u1/tokens", json=body), 422, "validation_error")
        assert said in problem["detail"]
        assert (await client.get("/v1/users/u1/token-status")).json()["status"] == "missing"


class TestStatusFilter:
    @pytest.mark.parametrize(
        "query",
        ["status=expired,expiring_soon", "status=expired&status=expiring_soon", "status=expired,&status=expiring_soon"],
    )
    async def test_the_comma_form_and_the_repeated_form_list_the_same_users(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, query: str
    ) -> None:
        """The contract's comma form and the repeated form generated clients send are the same filter."""
        for user_id, expires_in in (("soon", 600), ("gone", -60), ("fine", 20_000)):
            assert (
                await client.put(f"/v1/users/{user_id}/tokens", json=pair(sandbox, clock, expires_in=expires_in))
            ).status_code == 200
        listed = (await client.get(f"/v1/tokens?{query}")).json()["items"]
        assert [item["user_id"] for item in listed] == ["gone", "soon"]


@pytest.mark.parametrize("query", ["cursor=a&cursor=", "limit=5&limit=6"])
async def test_a_single_value_parameter_given_twice_is_422(client: httpx.AsyncClient, query: str) -> None:
    """Not the last value taken silently (Schemathesis sent two cursors, one empty, and got the first page)."""
    response = await client.get(f"/v1/tokens?{query}")
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    assert response.json()["errors"][0]["loc"] == ["query", query.split("=")[0]]


@pytest.mark.parametrize("query", ["status=", "status=,", "status=&status="])
async def test_a_status_filter_that_names_no_status_is_422(client: httpx.AsyncClient, query: str) -> None:
    """Not read as "every user" (Schemathesis sent `status=`): leaving the parameter out means that."""
    response = await client.get(f"/v1/tokens?{query}")
    assert response.status_code == 422
    assert "status" in response.json()["detail"]
