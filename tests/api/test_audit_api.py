"""The audit trail and stats over HTTP, on SQLite and Postgres: `GET /v1/users/{id}/events` and `GET /v1/stats`."""

from __future__ import annotations

import httpx
import pytest

from tests.api.test_tokens_api import assert_problem, put_user
from tests.conftest import FakeClock
from tokensvc.sandbox import FaultSpec, SandboxState

EVENT_FIELDS = {"id", "occurred_at", "kind", "trigger", "outcome", "strava_status", "duration_ms", "detail"}


class TestUserEvents:
    async def test_a_user_with_no_events_has_an_empty_page(self, client: httpx.AsyncClient) -> None:
        """An unknown user is not an error: empty items, no cursor."""
        response = await client.get("/v1/users/nobody/events")
        assert response.status_code == 200
        assert response.json() == {"items": [], "next_cursor": None}

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_history_lists_import_failures_and_changes_of_state_newest_first(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Each failed refresh attempt and change of state is one item, with its trigger, outcome and Strava status;
        a plain success is only counted (`/v1/stats`), not listed."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        assert (await client.post(f"/v1/users/{user.user_id}/refresh")).status_code == 200
        clock.advance(6 * 3600)  # the sandbox grants six hours: now the token is due again
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=502))
        assert (await client.post(f"/v1/users/{user.user_id}/refresh")).status_code == 503
        sandbox.revoke(user.athlete_id)
        assert (await client.post(f"/v1/users/{user.user_id}/refresh")).status_code == 409

        items = (await client.get(f"/v1/users/{user.user_id}/events")).json()["items"]
        assert all(set(item) == EVENT_FIELDS for item in items)
        summary = [(i["kind"], i["trigger"], i["outcome"], i["strava_status"]) for i in items]
        assert summary == [
            ("needs_reauth", "api", None, None),
            ("refresh", "api", "rejected", 400),
            ("refresh", "api", "transient", 502),
            ("imported", None, None, None),
        ]
        ids = [i["id"] for i in items]
        assert ids == sorted(ids, reverse=True)
        assert items[0]["occurred_at"].endswith("Z") or items[0]["occurred_at"].endswith("+00:00")
        assert all(i["duration_ms"] is not None and i["duration_ms"] >= 0 for i in items if i["kind"] == "refresh")

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_a_success_that_ends_a_run_of_failures_is_listed_with_how_many(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Two 502s, then a success: the history shows how the failure streak ended."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=502, count=2))
        for _ in range(2):
            assert (await client.post(f"/v1/users/{user.user_id}/refresh")).status_code == 503
        assert (await client.post(f"/v1/users/{user.user_id}/refresh")).status_code == 200
        items = (await client.get(f"/v1/users/{user.user_id}/events")).json()["items"]
        summary = [(i["kind"], i["outcome"], i["strava_status"], i["detail"]) for i in items]
        assert summary[0] == ("refresh", "succeeded", 200, "after 2 failures")
        assert [s[1] for s in summary[1:]] == ["transient", "transient", None]

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_pages_follow_the_cursor_without_gaps_or_repeats(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """limit=2 over five events: three pages, every event once, the last page without a cursor."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=502, count=4))
        for _ in range(4):
            assert (await client.post(f"/v1/users/{user.user_id}/refresh?force=true")).status_code == 503
        everything = (await client.get(f"/v1/users/{user.user_id}/events")).json()["items"]
        assert len(everything) == 5

        seen: list[int] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
            page = (await client.get(f"/v1/users/{user.user_id}/events", params=params)).json()
            seen += [item["id"] for item in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [item["id"] for item in everything]
        assert pages == 3

    async def test_another_users_events_are_not_listed(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The history is per user."""
        first = await put_user(client, sandbox, clock, expires_in=60)
        second = await put_user(client, sandbox, clock, expires_in=60)
        await client.post(f"/v1/users/{first.user_id}/refresh")
        items = (await client.get(f"/v1/users/{second.user_id}/events")).json()["items"]
        assert [i["kind"] for i in items] == ["imported"]

    @pytest.mark.parametrize(
        "query",
        ["limit=0", "limit=501", "limit=x", "cursor=not-a-cursor", "cursor=MTIz", "cursor=ZXYxOi01"],
        ids=["limit-0", "limit-501", "limit-text", "cursor-garbage", "cursor-foreign", "cursor-negative"],
    )
    async def test_bad_parameters_are_422(self, client: httpx.AsyncClient, query: str) -> None:
        """limit is 1..500; a cursor the service did not issue is refused, not guessed at."""
        assert_problem(await client.get(f"/v1/users/u1/events?{query}"), 422, "validation_error")

    @pytest.mark.parametrize("user_id", ["a" * 65, "bad%20id", "%27%3B%20DROP"])
    async def test_odd_user_ids_are_422(self, client: httpx.AsyncClient, user_id: str) -> None:
        """The user id is validated like every other route's."""
        assert_problem(await client.get(f"/v1/users/{user_id}/events"), 422, "validation_error")

    async def test_needs_an_api_key(self, client: httpx.AsyncClient) -> None:
        """No key, 401."""
        response = await client.get("/v1/users/u1/events", headers={"Authorization": ""})
        assert_problem(response, 401, "unauthorized")


class TestStats:
    async def test_an_empty_service_counts_zero(self, client: httpx.AsyncClient) -> None:
        """The contract's shape, all zeros."""
        response = await client.get("/v1/stats")
        assert response.status_code == 200
        assert response.json() == {
            "users": {
                "total": 0,
                "valid": 0,
                "expiring_soon": 0,
                "expired": 0,
                "needs_reauth": 0,
                "active": 0,
                "idle": 0,
            },
            "refresh": {"last_24h": {"success": 0, "failure": 0, "reauth_required": 0}},
        }

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_counts_users_by_status_and_refreshes_of_the_last_day(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Users by status now; refresh attempts (success, transient failure, rejection) within 24 hours only."""
        old = await put_user(client, sandbox, clock, expires_in=60)
        assert (await client.post(f"/v1/users/{old.user_id}/refresh")).status_code == 200
        clock.advance(25 * 3600)  # that success is now older than a day; `old` has expired meanwhile

        await put_user(client, sandbox, clock, expires_in=6 * 3600)  # valid
        soon = await put_user(client, sandbox, clock, expires_in=600)  # expiring_soon, then refreshed → valid
        assert (await client.post(f"/v1/users/{soon.user_id}/refresh")).status_code == 200
        flaky = await put_user(client, sandbox, clock, expires_in=600)  # a transient failure: stays expiring_soon
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=500))
        assert (await client.post(f"/v1/users/{flaky.user_id}/refresh")).status_code == 503
        dead = await put_user(client, sandbox, clock, expires_in=600)  # rejected: needs_reauth
        sandbox.revoke(dead.athlete_id)
        assert (await client.post(f"/v1/users/{dead.user_id}/refresh")).status_code == 409

        assert (await client.get("/v1/stats")).json() == {
            # v1.1: the four that can be refreshed were all asked about (imported) within TOKENSVC_SWEEP_ACTIVE_DAYS
            "users": {
                "total": 5,
                "valid": 2,
                "expiring_soon": 1,
                "expired": 1,
                "needs_reauth": 1,
                "active": 4,
                "idle": 0,
            },
            "refresh": {"last_24h": {"success": 1, "failure": 1, "reauth_required": 1}},
        }

    async def test_needs_an_api_key(self, client: httpx.AsyncClient) -> None:
        """No key, 401."""
        assert_problem(await client.get("/v1/stats", headers={"Authorization": ""}), 401, "unauthorized")


class TestOpenApi:
    async def test_both_endpoints_declare_their_problems(self, client: httpx.AsyncClient) -> None:
        """OpenAPI documents the new endpoints with their error responses."""
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert {"200", "401", "422", "503"} <= set(paths["/v1/users/{user_id}/events"]["get"]["responses"])
        assert {"200", "401", "503"} <= set(paths["/v1/stats"]["get"]["responses"])
