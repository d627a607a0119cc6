"""The audit trail and stats over HTTP, on SQLite and Postgres: `GET /v1/users/{id}/events` and `GET /v1/stats`."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from tests.api.test_tokens_api import assert_problem, put_user
from tests.conftest import FakeClock, make_settings
from tokensvc.config import Settings
from tokensvc.sandbox import FaultSpec, SandboxState
from tokensvc.service.stats import StatsService

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
    async def test_an_empty_service_counts_zero(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """The contract's shape, all zeros; the windows at their default limits, resetting at the next quarter
        hour and midnight; no gateway call, so no success rate."""
        response = await client.get("/v1/stats")
        assert response.status_code == 200
        body = response.json()
        now = int(clock())
        quarter = datetime.fromtimestamp(now - now % 900 + 900, UTC).isoformat().replace("+00:00", "Z")
        midnight = datetime.fromtimestamp(now - now % 86_400 + 86_400, UTC).isoformat().replace("+00:00", "Z")
        assert body.pop("strava_windows") == {
            "overall_15min": {"used": 0, "limit": 200, "resets_at": quarter},
            "overall_daily": {"used": 0, "limit": 2000, "resets_at": midnight},
            "read_15min": {"used": 0, "limit": 100, "resets_at": quarter},
            "read_daily": {"used": 0, "limit": 1000, "resets_at": midnight},
            "paused_until": None,
        }
        assert body.pop("gateway") == {
            "last_24h": {
                "calls": 0,
                "ok": 0,
                "reauth": 0,
                "scope": 0,
                "rate_limited": 0,
                "strava_error": 0,
                "client_error": 0,
                "success_rate": None,
            }
        }
        assert body == {
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
            "athletes": {"connected": 0, "capacity": None, "warning": False},
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

        body = (await client.get("/v1/stats")).json()
        assert {key: body[key] for key in ("users", "refresh", "athletes")} == {
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
            # v1.1: connected athletes are the users holding a live connection (needs_reauth is not)
            "athletes": {"connected": 4, "capacity": None, "warning": False},
        }

    async def test_without_an_athlete_capacity_the_dashboard_shows_none(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """TOKENSVC_STRAVA_ATHLETE_CAPACITY unset (the default): `capacity` null, never a warning, no card."""
        await put_user(client, sandbox, clock, expires_in=6 * 3600)
        assert (await client.get("/v1/stats")).json()["athletes"] == {
            "connected": 1,
            "capacity": None,
            "warning": False,
        }
        page = await client.get("/dashboard")
        assert page.status_code == 200
        assert 'data-testid="users-total"' in page.text
        assert 'data-testid="athlete-capacity"' not in page.text

    async def test_needs_an_api_key(self, client: httpx.AsyncClient) -> None:
        """No key, 401."""
        assert_problem(await client.get("/v1/stats", headers={"Authorization": ""}), 401, "unauthorized")


class TestAthleteCapacity:
    """v1.1: TOKENSVC_STRAVA_ATHLETE_CAPACITY set: connected athletes against it in /v1/stats, /metrics and the
    dashboard, a warning from 80 %."""

    @pytest.fixture
    def settings(self, database_url: str) -> Settings:
        return make_settings(database_url, strava_athlete_capacity=5)

    async def test_stats_metrics_and_dashboard_show_connected_athletes_against_the_capacity(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """3 of 5 (60 %): no warning; a fourth (80 %): warning; a needs_reauth user is not connected."""
        for _ in range(3):
            await put_user(client, sandbox, clock, expires_in=6 * 3600)
        dead = await put_user(client, sandbox, clock, expires_in=600)
        sandbox.revoke(dead.athlete_id)
        assert (await client.post(f"/v1/users/{dead.user_id}/refresh")).status_code == 409
        assert (await client.get("/v1/stats")).json()["athletes"] == {"connected": 3, "capacity": 5, "warning": False}
        page = (await client.get("/dashboard")).text
        assert 'data-testid="athlete-capacity"' in page
        assert "3 / 5" in page
        assert "card capacity-warning" not in page

        await put_user(client, sandbox, clock, expires_in=6 * 3600)
        assert (await client.get("/v1/stats")).json()["athletes"] == {"connected": 4, "capacity": 5, "warning": True}
        page = (await client.get("/dashboard")).text
        assert "4 / 5" in page
        assert "card capacity-warning" in page
        assert "80 %" in page

        stats: StatsService = client.app.state.stats  # type: ignore[attr-defined]
        await stats.update_gauges()
        metrics = (await client.get("/metrics")).text
        assert "tokensvc_strava_athletes_connected 4.0" in metrics
        assert "tokensvc_strava_athlete_capacity 5.0" in metrics
