"""The service API over HTTP (ASGI), on SQLite and Postgres: every endpoint's success and error paths."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, FakeClock, Seeded, seed_athlete
from tokensvc.sandbox import FaultSpec, SandboxState

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["title"]
    assert body["detail"]
    assert body["type"].endswith(code)
    return body


async def put_user(client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, *, expires_in: int) -> Seeded:
    user = seed_athlete(sandbox, clock, expires_in=expires_in)
    response = await client.put(
        f"/v1/users/{user.user_id}/tokens",
        json={
            "access_token": user.access_token,
            "refresh_token": user.refresh_token,
            "expires_at": user.expires_at,
            "athlete_id": user.athlete_id,
            "scopes": ["read", "activity:read_all"],
        },
    )
    assert response.status_code == 200, response.text
    return user


class TestAuthentication:
    @pytest.mark.parametrize(
        "headers",
        [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}, {"Authorization": API_KEY}],
        ids=["none", "wrong-key", "basic-scheme", "no-scheme"],
    )
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/v1/users/u1/token-status"),
            ("PUT", "/v1/users/u1/tokens"),
            ("POST", "/v1/users/u1/refresh"),
            ("GET", "/v1/users/u1/access-token"),
            ("DELETE", "/v1/users/u1/tokens"),
            ("GET", "/v1/tokens"),
        ],
    )
    async def test_every_service_endpoint_needs_a_valid_key(
        self, client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
    ) -> None:
        """Missing or wrong key: 401 problem, before anything else is looked at."""
        response = await client.request(
            method, path, headers=headers | {"Authorization": headers.get("Authorization", "")}
        )
        assert_problem(response, 401, "unauthorized")

    async def test_operations_endpoints_need_no_key(self, client: httpx.AsyncClient) -> None:
        """/healthz, /readyz and /metrics are for orchestrators and scrapers."""
        anonymous = {"Authorization": ""}
        assert (await client.get("/healthz", headers=anonymous)).json() == {"status": "ok"}
        assert (await client.get("/readyz", headers=anonymous)).json() == {"status": "ok"}
        metrics = await client.get("/metrics", headers=anonymous)
        assert metrics.status_code == 200
        assert "tokensvc_refresh_total" in metrics.text


class TestImportAndStatus:
    @pytest.mark.dialects("sqlite", "postgres")
    async def test_put_then_status_round_trip(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """PUT stores tokens and returns the TokenStatus; GET reports the same without calling Strava."""
        user = await put_user(client, sandbox, clock, expires_in=5000)
        body = (await client.get(f"/v1/users/{user.user_id}/token-status")).json()
        assert body == {
            "user_id": user.user_id,
            "status": "valid",
            "expires_at": user.expires_at,
            "expires_in": 5000,
            "athlete_id": user.athlete_id,
            "scopes": ["read", "activity:read_all"],
            "last_refreshed_at": None,
            "needs_reauth": False,
            "reauth_reason": None,
        }
        assert sum(sandbox.calls.values()) == 0

    async def test_status_of_an_unknown_user_is_missing(self, client: httpx.AsyncClient) -> None:
        """Never connected: 200 with status `missing` and null expiry fields."""
        body = (await client.get("/v1/users/never-seen/token-status")).json()
        assert (body["status"], body["expires_at"], body["expires_in"], body["athlete_id"]) == (
            "missing",
            None,
            None,
            None,
        )

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_scopes_may_be_sent_comma_separated_and_omitted_fields_are_kept(
        self, client: httpx.AsyncClient
    ) -> None:
        """Replacing tokens without athlete_id or scopes keeps the ones stored."""
        first = {"access_token": "a" * 40, "refresh_token": "b" * 40, "expires_at": 1_800_010_000}
        await client.put("/v1/users/u1/tokens", json=first | {"athlete_id": 7, "scopes": "read,activity:read"})
        body = (await client.put("/v1/users/u1/tokens", json=first)).json()
        assert (body["athlete_id"], body["scopes"]) == (7, ["read", "activity:read"])

    @pytest.mark.parametrize(
        "user_id",
        ["a b", "x" * 65, "%27%3B%20DROP%20TABLE%20user_tokens", "caf%C3%A9", "a%2Fb", "..%2F.."],
        ids=["space", "65-chars", "sql", "unicode", "slash", "dotdot"],
    )
    async def test_odd_user_ids_are_rejected_with_422_or_404(self, client: httpx.AsyncClient, user_id: str) -> None:
        """Anything outside 1..64 of [A-Za-z0-9._-] is a 422 (or 404 when it cannot match a route): never a 500."""
        response = await client.get(f"/v1/users/{user_id}/token-status")
        assert response.status_code in (404, 422)
        assert_problem(
            response, response.status_code, "validation_error" if response.status_code == 422 else "not_found"
        )

    @pytest.mark.parametrize("user_id", ["%2E", "%2E%2E", "%2e%2e"], ids=["dot", "dotdot", "dotdot-lower"])
    async def test_dot_and_dot_dot_are_not_user_ids(self, client: httpx.AsyncClient, user_id: str) -> None:
        """v1.1: `.` and `..` are refused (a user id ends up in paths and URLs, where they mean something else);
        percent-encoded here so the client sends them as the path segment itself."""
        for method, path in (("GET", "token-status"), ("POST", "connect"), ("POST", "session")):
            response = await client.request(method, f"/v1/users/{user_id}/{path}")
            assert_problem(response, 422, "validation_error")

    @pytest.mark.parametrize("user_id", ["...", ".a", "..a", "a.b"])
    async def test_ids_with_dots_that_are_not_dot_segments_are_fine(
        self, client: httpx.AsyncClient, user_id: str
    ) -> None:
        assert (await client.get(f"/v1/users/{user_id}/token-status")).json()["status"] == "missing"

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"access_token": "a", "refresh_token": "b"},
            {"access_token": "a", "refresh_token": "b", "expires_at": "soon"},
            {"access_token": "", "refresh_token": "b", "expires_at": 1},
            {"access_token": "a", "refresh_token": "b", "expires_at": -1},
            {"access_token": "a", "refresh_token": "b", "expires_at": 1, "scopes": ["read", "DROP TABLE"]},
            {"access_token": "a", "refresh_token": "b", "expires_at": 1, "unexpected": True},
            {"access_token": "a" * 600, "refresh_token": "b", "expires_at": 1},
            [1, 2],
        ],
    )
    async def test_invalid_bodies_are_422_and_never_echo_a_token(self, client: httpx.AsyncClient, body: object) -> None:
        """A bad import is a 422 problem naming the field; the token values sent never come back."""
        response = await client.put("/v1/users/u1/tokens", json=body)
        problem = assert_problem(response, 422, "validation_error")
        assert "a" * 40 not in response.text
        assert problem["errors"]
        assert (await client.get("/v1/users/u1/token-status")).json()["status"] == "missing"

    async def test_malformed_json_is_422(self, client: httpx.AsyncClient) -> None:
        """Broken JSON: 422, not a 500."""
        response = await client.put(
            "/v1/users/u1/tokens", content=b'{"access_token": ', headers={"content-type": "application/json"}
        )
        assert_problem(response, 422, "validation_error")

    async def test_a_body_over_64_kib_is_413(self, client: httpx.AsyncClient) -> None:
        """Declared or streamed, more than 64 KiB is refused before it is parsed."""
        big = b'{"access_token": "' + b"a" * (65 * 1024) + b'"}'
        response = await client.put("/v1/users/u1/tokens", content=big, headers={"content-type": "application/json"})
        assert_problem(response, 413, "payload_too_large")

        async def chunks() -> Any:
            for _ in range(70):
                yield b"a" * 1024

        streamed = await client.put(
            "/v1/users/u1/tokens", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_problem(streamed, 413, "payload_too_large")


class TestRefreshEndpoint:
    async def test_refresh_of_a_due_user_refreshes(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """POST …/refresh: RefreshResult with refreshed true and a valid status."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        body = (await client.post(f"/v1/users/{user.user_id}/refresh")).json()
        assert body["success"] is True
        assert body["refreshed"] is True
        assert body["token_status"]["status"] == "valid"
        assert "access_token" not in str(body)

    async def test_refresh_of_a_valid_user_without_force_makes_no_call(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A valid token is left alone; ?force=true refreshes it."""
        user = await put_user(client, sandbox, clock, expires_in=10_000)
        assert (await client.post(f"/v1/users/{user.user_id}/refresh")).json()["refreshed"] is False
        assert sandbox.calls["refresh"] == 0
        assert (await client.post(f"/v1/users/{user.user_id}/refresh?force=true")).json()["refreshed"] is True
        assert sandbox.calls["refresh"] == 1

    async def test_refresh_of_a_missing_user_is_409_tokens_missing(self, client: httpx.AsyncClient) -> None:
        """409 `tokens_missing` with needs_reauth true."""
        body = assert_problem(await client.post("/v1/users/ghost/refresh"), 409, "tokens_missing")
        assert body["needs_reauth"] is True
        assert "authorize_url" in body

    async def test_a_rejected_refresh_token_is_409_reauth_required(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava rejects the refresh token: 409 `reauth_required`; the status says why."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        sandbox.revoke(user.athlete_id)
        body = assert_problem(await client.post(f"/v1/users/{user.user_id}/refresh"), 409, "reauth_required")
        assert body["needs_reauth"] is True
        status = (await client.get(f"/v1/users/{user.user_id}/token-status")).json()
        assert (status["status"], status["reauth_reason"]) == ("needs_reauth", "refresh_token_invalid")

    @pytest.mark.parametrize(("strava_status", "code"), [(500, "provider_unavailable"), (429, "provider_rate_limited")])
    async def test_strava_failures_are_503_with_retry_after(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, strava_status: int, code: str
    ) -> None:
        """Transient Strava failures: 503 with the contract code and a Retry-After header."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=strava_status))
        response = await client.post(f"/v1/users/{user.user_id}/refresh")
        assert_problem(response, 503, code)
        assert int(response.headers["retry-after"]) > 0


@pytest.mark.dialects("sqlite", "postgres")
class TestAccessTokenEndpoint:
    async def test_a_valid_token_comes_back_with_no_store(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """200 AccessToken, `Cache-Control: no-store`, no Strava call."""
        user = await put_user(client, sandbox, clock, expires_in=10_000)
        response = await client.get(f"/v1/users/{user.user_id}/access-token")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert response.json() == {
            "user_id": user.user_id,
            "access_token": user.access_token,
            "token_type": "Bearer",
            "expires_at": user.expires_at,
            "expires_in": 10_000,
            "athlete_id": user.athlete_id,
            "scopes": ["read", "activity:read_all"],
        }
        assert sandbox.calls["refresh"] == 0

    async def test_an_expired_token_is_refreshed_first(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Expired: the caller waits and gets the new token."""
        user = await put_user(client, sandbox, clock, expires_in=-5)
        body = (await client.get(f"/v1/users/{user.user_id}/access-token?min_ttl=600")).json()
        assert body["access_token"] == sandbox.snapshot(user.athlete_id)["access_token"]
        assert body["expires_in"] >= 600

    @pytest.mark.parametrize("min_ttl", ["-1", "3601", "soon"])
    async def test_min_ttl_out_of_range_is_422(self, client: httpx.AsyncClient, min_ttl: str) -> None:
        """min_ttl is 0..3600: Strava only mints a new token inside its last hour."""
        assert_problem(await client.get(f"/v1/users/u1/access-token?min_ttl={min_ttl}"), 422, "validation_error")

    async def test_missing_user_is_409(self, client: httpx.AsyncClient) -> None:
        """No tokens: 409 tokens_missing, never a token."""
        assert_problem(await client.get("/v1/users/ghost/access-token"), 409, "tokens_missing")


class TestDeleteEndpoint:
    async def test_delete_is_204_and_idempotent(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """204 twice; the user is `missing` afterwards and Strava was asked to revoke the grant once."""
        user = await put_user(client, sandbox, clock, expires_in=10_000)
        assert (await client.delete(f"/v1/users/{user.user_id}/tokens")).status_code == 204
        assert (await client.delete(f"/v1/users/{user.user_id}/tokens")).status_code == 204
        assert (await client.get(f"/v1/users/{user.user_id}/token-status")).json()["status"] == "missing"
        assert (sandbox.calls["revoke"], sandbox.calls["deauthorize"]) == (1, 0)
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True

    @pytest.mark.parametrize("strava_status", [429, 500, 503])
    async def test_a_strava_outage_does_not_change_the_answer(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, strava_status: int
    ) -> None:
        """Strava failing the revoke: still 204 at once and `missing`; the grant waits to be revoked later."""
        user = await put_user(client, sandbox, clock, expires_in=10_000)
        sandbox.add_fault(FaultSpec(endpoint="revoke", kind="status", status=strava_status))
        assert (await client.delete(f"/v1/users/{user.user_id}/tokens")).status_code == 204
        assert (await client.get(f"/v1/users/{user.user_id}/token-status")).json()["status"] == "missing"
        assert sandbox.calls["revoke"] == 1
        assert sandbox.snapshot(user.athlete_id)["revoked"] is False


@pytest.mark.dialects("sqlite", "postgres")
class TestListing:
    async def test_list_filters_by_status_oldest_expiry_first_with_a_cursor(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """?status= filters; items come oldest expiry first; the cursor walks every page once."""
        expired = [await put_user(client, sandbox, clock, expires_in=-100 * i) for i in range(1, 4)]
        expiring = [await put_user(client, sandbox, clock, expires_in=100 * i) for i in range(1, 3)]
        await put_user(client, sandbox, clock, expires_in=10_000)
        seen: list[str] = []
        cursor = ""
        while True:
            page = (await client.get(f"/v1/tokens?status=expired,expiring_soon&limit=2&cursor={cursor}")).json()
            seen += [item["user_id"] for item in page["items"]]
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        expected = sorted(expired + expiring, key=lambda u: u.expires_at)
        assert seen == [u.user_id for u in expected]
        everyone = (await client.get("/v1/tokens")).json()["items"]
        assert len(everyone) == 6

    @pytest.mark.parametrize("query", ["status=bogus", "status=missing", "cursor=%%%", "limit=0", "limit=1001"])
    async def test_bad_listing_parameters_are_422(self, client: httpx.AsyncClient, query: str) -> None:
        """Unknown status, `missing` (no row to list), a forged cursor or a bad limit: 422."""
        assert_problem(await client.get(f"/v1/tokens?{query}"), 422, "validation_error")


class TestProtocolEdges:
    async def test_unknown_route_and_wrong_method_are_problems(self, client: httpx.AsyncClient) -> None:
        """404 and 405 answer as problem+json too."""
        assert_problem(await client.get("/v1/nope"), 404, "not_found")
        assert_problem(await client.patch("/v1/users/u1/tokens"), 405, "method_not_allowed")

    async def test_openapi_declares_every_endpoint_with_its_errors(self, client: httpx.AsyncClient) -> None:
        """/openapi.json lists the contract's endpoints, each with its problem responses."""
        spec = (await client.get("/openapi.json")).json()
        paths = spec["paths"]
        expected = {
            ("/v1/users/{user_id}/tokens", "put"): {"401", "409", "422", "413"},
            ("/v1/users/{user_id}/connect/complete", "post"): {"400", "401", "409", "422", "503"},
            ("/v1/users/{user_id}/token-status", "get"): {"401", "422"},
            ("/v1/users/{user_id}/refresh", "post"): {"401", "409", "503"},
            ("/v1/users/{user_id}/access-token", "get"): {"401", "409", "503"},
            ("/v1/users/{user_id}/tokens", "delete"): {"401"},
            ("/v1/tokens", "get"): {"401", "422"},
        }
        for (path, method), statuses in expected.items():
            assert statuses <= set(paths[path][method]["responses"]), (path, method)
        assert (await client.get("/docs")).status_code == 200


class TestDatabaseDown:
    async def test_a_dead_database_is_503_with_retry_after_not_500(self) -> None:
        """Readiness says 503, and API calls answer 503 `database_unavailable` with Retry-After."""
        from asgi_lifespan import LifespanManager

        from tests.conftest import make_settings
        from tokensvc.app import create_app

        app = create_app(make_settings("postgresql+asyncpg://postgres@127.0.0.1:9/nothing"))
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as http:
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                response = await http.get("/v1/users/u1/token-status")
                assert_problem(response, 503, "database_unavailable")
                assert response.headers["retry-after"]
                assert (await http.get("/healthz")).status_code == 200


@pytest.mark.dialects("sqlite", "postgres")
class TestOneAthleteOneUser:
    """v1.1: storing an athlete another user holds is 409 `athlete_in_use` unless the caller moves it."""

    @staticmethod
    def body(seeded: Seeded) -> dict[str, Any]:
        return {
            "access_token": seeded.access_token,
            "refresh_token": seeded.refresh_token,
            "expires_at": seeded.expires_at,
            "athlete_id": seeded.athlete_id,
        }

    async def test_importing_an_athlete_another_user_holds_is_409_and_changes_nothing(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        seeded = seed_athlete(sandbox, clock, expires_in=20_000)
        assert (await client.put("/v1/users/first/tokens", json=self.body(seeded))).status_code == 200
        refused = await client.put("/v1/users/second/tokens", json=self.body(seeded))
        problem = assert_problem(refused, 409, "athlete_in_use")
        assert problem["athlete_id"] == seeded.athlete_id
        assert (await client.get("/v1/users/second/token-status")).json()["status"] == "missing"
        assert (await client.get("/v1/users/first/token-status")).json()["status"] == "valid"
        again = await client.put("/v1/users/first/tokens", json=self.body(seeded))  # the holder itself may
        assert again.status_code == 200

    async def test_replace_moves_the_athlete_and_the_previous_user_becomes_missing(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        seeded = seed_athlete(sandbox, clock, expires_in=20_000)
        await client.put("/v1/users/first/tokens", json=self.body(seeded))
        moved = await client.put("/v1/users/second/tokens?replace=true", json=self.body(seeded))
        assert moved.status_code == 200, moved.text
        assert moved.json()["athlete_id"] == seeded.athlete_id
        assert (await client.get("/v1/users/first/token-status")).json()["status"] == "missing"
        token = (await client.get("/v1/users/second/access-token")).json()["access_token"]
        assert token == seeded.access_token
        # the grant is the athlete's, now the second user's: not revoked
        assert (sandbox.calls["deauthorize"], sandbox.calls["revoke"]) == (0, 0)


@pytest.mark.dialects("sqlite", "postgres")
class TestImportsNeverGoBackwards:
    """v1.1: an import older than the stored pair is 409 stale_import unless replace=true; implausible expiry 422."""

    async def test_an_old_pair_after_a_rotation_is_409_and_the_stored_pair_stays(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await put_user(client, sandbox, clock, expires_in=-60)
        old = {"access_token": user.access_token, "refresh_token": user.refresh_token, "expires_at": user.expires_at}
        rotated = (await client.post(f"/v1/users/{user.user_id}/refresh")).json()
        assert rotated["refreshed"] is True
        response = await client.put(f"/v1/users/{user.user_id}/tokens", json=old)
        problem = assert_problem(response, 409, "stale_import")
        assert "replace=true" in problem["detail"]
        assert user.refresh_token not in response.text
        status = (await client.get(f"/v1/users/{user.user_id}/token-status")).json()
        assert status["expires_at"] == rotated["token_status"]["expires_at"]
        token = (await client.get(f"/v1/users/{user.user_id}/access-token")).json()
        assert sandbox.calls["refresh"] == 1  # the rotated pair is still the one served
        assert token["access_token"] != user.access_token
        forced = await client.put(f"/v1/users/{user.user_id}/tokens", params={"replace": "true"}, json=old)
        assert forced.status_code == 200, forced.text
        assert forced.json()["expires_at"] == user.expires_at

    async def test_the_same_pair_again_or_a_newer_one_is_not_stale(self, client: httpx.AsyncClient) -> None:
        pair = {"access_token": "a" * 40, "refresh_token": "b" * 40, "expires_at": 1_800_010_000}
        assert (await client.put("/v1/users/u1/tokens", json=pair)).status_code == 200
        same_token_earlier = pair | {"expires_at": 1_800_000_000}  # the same refresh token: not a rotation
        assert (await client.put("/v1/users/u1/tokens", json=same_token_earlier)).status_code == 200
        newer = pair | {"refresh_token": "c" * 40, "expires_at": 1_800_020_000}
        assert (await client.put("/v1/users/u1/tokens", json=newer)).status_code == 200
        older = pair | {"refresh_token": "d" * 40, "expires_at": 1_800_010_000}
        assert_problem(await client.put("/v1/users/u1/tokens", json=older), 409, "stale_import")

    @pytest.mark.parametrize(
        ("expires_at", "hint"),
        [(1_800_010_000_000, "milliseconds"), (1_800_000_000 + 3 * 365 * 86_400, "a year ahead")],
        ids=["milliseconds", "years-ahead"],
    )
    async def test_an_implausible_expiry_is_422_and_says_so(
        self, client: httpx.AsyncClient, clock: FakeClock, expires_at: int, hint: str
    ) -> None:
        body = {"access_token": "a" * 40, "refresh_token": "b" * 40, "expires_at": expires_at}
        problem = assert_problem(await client.put("/v1/users/u1/tokens", json=body), 422, "validation_error")
        assert hint in problem["detail"]
        assert problem["errors"][0]["loc"] == ["body", "expires_at"]
        assert (await client.get("/v1/users/u1/token-status")).json()["status"] == "missing"
