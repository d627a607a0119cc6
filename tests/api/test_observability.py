"""Metrics and request-id logs over HTTP (ASGI), on SQLite and Postgres."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from tests.api.test_tokens_api import put_user
from tests.conftest import API_KEY, FakeClock, tasks_finished
from tests.logcapture import captured_logs
from tokensvc.app import create_app
from tokensvc.config import Settings
from tokensvc.sandbox import FaultSpec, SandboxState
from tokensvc.service.stats import StatsService


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


DB_WIDE = (
    "tokensvc_users",
    "tokensvc_rate_budget_remaining",
    "tokensvc_rate_limit_paused_until",
    "tokensvc_notifications_pending",
)


def db_wide(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[object, float]:
    """The samples of the DB-wide gauges only (the process's own counters move with every request)."""
    return {key: v for key, v in samples.items() if key[0] in DB_WIDE}


class TestMetrics:
    async def test_strava_requests_are_counted_by_endpoint_and_status(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A refresh (200), a failing refresh (503) and a delete's revoke (200) each count once under their label."""
        name = "tokensvc_strava_requests_total"
        before = await scrape(client)
        user = await put_user(client, sandbox, clock, expires_in=60)
        await client.post(f"/v1/users/{user.user_id}/refresh")
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=503))
        await client.post(f"/v1/users/{user.user_id}/refresh?force=true")
        await client.delete(f"/v1/users/{user.user_id}/tokens")
        after = await scrape(client)
        for endpoint, status in [("token_refresh", "200"), ("token_refresh", "503"), ("revoke", "200")]:
            delta = value(after, name, endpoint=endpoint, status=status) - value(
                before, name, endpoint=endpoint, status=status
            )
            assert delta == 1, (endpoint, status)

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_refresh_outcomes_and_lock_waits_are_recorded(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """`tokensvc_refresh_total{outcome,trigger}` and one lock-wait observation per guarded round."""
        before = await scrape(client)
        user = await put_user(client, sandbox, clock, expires_in=60)
        await client.post(f"/v1/users/{user.user_id}/refresh")
        after = await scrape(client)
        refreshed = {"outcome": "refreshed", "trigger": "api"}
        assert (
            value(after, "tokensvc_refresh_total", **refreshed) - value(before, "tokensvc_refresh_total", **refreshed)
            == 1
        )
        assert value(after, "tokensvc_lock_wait_seconds_count") - value(before, "tokensvc_lock_wait_seconds_count") == 1

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_db_wide_gauges_follow_the_database_through_the_gauges_job(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Users by status and pending notifications follow the database; the rate budget and its pause follow
        the shared budget row (each as of the gauges job's latest pass)."""
        stats: StatsService = client.app.state.stats  # type: ignore[attr-defined]
        valid = await put_user(client, sandbox, clock, expires_in=6 * 3600)
        soon = await put_user(client, sandbox, clock, expires_in=600)
        await stats.update_gauges()  # what the job does every TOKENSVC_GAUGE_INTERVAL_SECONDS
        samples = await scrape(client)
        assert value(samples, "tokensvc_users", status="valid") == 1
        assert value(samples, "tokensvc_users", status="expiring_soon") == 1
        assert value(samples, "tokensvc_users", status="needs_reauth") == 0
        full_15min = value(samples, "tokensvc_rate_budget_remaining", window="15min")
        full_daily = value(samples, "tokensvc_rate_budget_remaining", window="daily")
        assert full_15min > 0
        assert full_daily > 0
        assert value(samples, "tokensvc_rate_limit_paused_until") == 0

        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=429, retry_after=120))
        assert (await client.post(f"/v1/users/{soon.user_id}/refresh")).status_code == 503
        await stats.update_gauges()
        samples = await scrape(client)
        # a token call takes no unit (Strava does not count it); its 429 pauses token calls
        assert value(samples, "tokensvc_rate_budget_remaining", window="15min") == full_15min
        assert value(samples, "tokensvc_rate_limit_paused_until") == clock() + 120
        assert (await client.delete(f"/v1/users/{valid.user_id}/tokens")).status_code in (200, 204)
        await stats.update_gauges()
        samples = await scrape(client)
        assert value(samples, "tokensvc_rate_budget_remaining", window="15min") == full_15min - 1  # the revoke
        assert value(samples, "tokensvc_rate_budget_remaining", window="daily") == full_daily - 1
        full_read = value(samples, "tokensvc_rate_budget_remaining", window="read_15min")
        assert full_read == 100
        assert value(samples, "tokensvc_notifications_pending") == 0

    async def test_a_scrape_never_queries_the_database(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Twenty scrapes send no statement at all; they serve what the gauges job read last, and only its next
        pass shows a change."""
        stats: StatsService = client.app.state.stats  # type: ignore[attr-defined]
        await stats.gauges.stop()  # this test runs the job's passes itself
        await stats.update_gauges()
        statements: list[str] = []

        def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            statements.append(statement)

        engine = client.app.state.engine.sync_engine  # type: ignore[attr-defined]
        sa.event.listen(engine, "before_cursor_execute", record)
        try:
            before = db_wide(await scrape(client))
            await put_user(client, sandbox, clock, expires_in=6 * 3600)
            statements.clear()
            for _ in range(20):
                assert db_wide(await scrape(client)) == before
            assert statements == []
            await stats.update_gauges()
            assert any("user_tokens" in statement for statement in statements)
        finally:
            sa.event.remove(engine, "before_cursor_execute", record)
        after = await scrape(client)
        assert value(after, "tokensvc_users", status="valid") == 1
        assert ("tokensvc_users", (("status", "valid"),)) in before

    async def test_the_service_runs_the_gauges_job_on_its_own(
        self, settings: Settings, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport, sandbox: SandboxState
    ) -> None:
        """With TOKENSVC_GAUGE_INTERVAL_SECONDS=1 an imported user shows in the gauges within a few seconds, and
        nobody called the job's pass by hand."""
        app = create_app(
            settings.model_copy(update={"gauge_interval_seconds": 1.0}), clock=clock, strava_transport=strava_transport
        )
        async with LifespanManager(app) as manager:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app),
                base_url="http://tokensvc.test",
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as http:
                for expected in (0, 1):  # the empty database, then one user: each shown by a pass of the job
                    if expected:
                        await put_user(http, sandbox, clock, expires_in=6 * 3600)
                    async with asyncio.timeout(10):  # a bounded wait for the job's next pass
                        while True:
                            if value(await scrape(http), "tokensvc_users", status="valid") == expected:
                                break
                            await asyncio.sleep(0.05)

    async def test_no_user_id_appears_in_any_label(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Labels are small fixed sets: a user id never becomes one."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        await client.post(f"/v1/users/{user.user_id}/refresh")
        text = (await client.get("/metrics")).text
        assert "tokensvc_strava_requests_total" in text
        assert user.user_id not in text
        assert str(user.athlete_id) not in text


class TestRequestIds:
    async def test_every_line_of_a_request_carries_its_id_and_one_completion_line(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The id is generated, echoed, on every line the request logs, and gone once the request is over."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        with captured_logs() as logs:
            response = await client.post(f"/v1/users/{user.user_id}/refresh?force=false")
            after = await client.get("/v1/stats")
        request_id = response.headers["x-request-id"]
        lines = [line for line in logs.lines() if line.get("request_id") == request_id]
        assert [line["event"] for line in lines] == ["token.refresh.succeeded", "request.completed"]
        assert after.status_code == 200
        completed = lines[-1]
        assert completed["method"] == "POST"
        assert completed["path"] == "/v1/users/{user_id}/refresh"
        assert completed["status"] == 200
        assert completed["level"] == "info"
        assert completed["duration_ms"] >= 0
        assert after.headers["x-request-id"] != request_id
        # Nothing of these requests is logged without its id (the background loops log on their own schedule).
        outside = [line["event"] for line in logs.lines() if "request_id" not in line]
        assert [event for event in outside if not event.startswith(("housekeeping.", "webhook.processor"))] == []

    @pytest.mark.parametrize("incoming", ["abc-123", "A.b_c-9", "x" * 64])
    async def test_a_well_formed_incoming_id_is_honoured(self, client: httpx.AsyncClient, incoming: str) -> None:
        """The caller's id is kept, so one id follows a call across services."""
        with captured_logs() as logs:
            response = await client.get("/v1/users/u1/token-status", headers={"X-Request-ID": incoming})
        assert response.headers["x-request-id"] == incoming
        assert [line["request_id"] for line in logs.events("request.completed")] == [incoming]

    @pytest.mark.parametrize("incoming", ["", "x" * 65, "has space", 'quote"', "new\\nline", "ünï"])
    async def test_a_malformed_incoming_id_is_replaced(self, client: httpx.AsyncClient, incoming: str) -> None:
        """Anything else is replaced by a generated id (it could forge log content)."""
        response = await client.get("/v1/stats", headers=[(b"X-Request-ID", incoming.encode())])
        echoed = response.headers["x-request-id"]
        assert echoed != incoming
        assert len(echoed) == 32

    async def test_probes_are_not_logged_but_echo_the_id(self, client: httpx.AsyncClient) -> None:
        """Load balancers and Prometheus call these every few seconds: no line, but the id is echoed like anywhere."""
        with captured_logs() as logs:
            for path in ("/healthz", "/readyz", "/metrics"):
                response = await client.get(path, headers={"X-Request-ID": "probe-7"})
                assert response.status_code == 200
                assert response.headers["x-request-id"] == "probe-7"
                assert len((await client.get(path)).headers["x-request-id"]) == 32  # one of our own
            await client.get("/v1/stats")
        assert [line["path"] for line in logs.events("request.completed")] == ["/v1/stats"]

    async def test_errors_and_unknown_routes_are_logged_with_their_status_and_path_without_query(
        self, client: httpx.AsyncClient
    ) -> None:
        """A 422, a 404 and a 401 each produce one completion line with the status sent."""
        with captured_logs() as logs:
            await client.get("/v1/users/bad%20id/token-status?secret=1")
            await client.get("/v1/nowhere?x=1")
            await client.get("/v1/stats", headers={"Authorization": ""})
        summary = [(line["path"], line["status"]) for line in logs.events("request.completed")]
        assert summary == [
            ("/v1/users/{user_id}/token-status", 422),
            ("/v1/nowhere", 404),
            ("/v1/stats", 401),
        ]

    async def test_a_background_refresh_names_its_request_as_parent_not_as_its_own(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The refresh an access-token call starts in the background outlives the request: its lines carry
        `parent_request_id`, never the request's `request_id`."""
        user = await put_user(client, sandbox, clock, expires_in=1200)  # due, but long enough for min_ttl=300
        with captured_logs() as logs:
            # "+300" is valid but not plain digits: the fast path leaves it to the FastAPI route, inside the
            # request-id middleware (fast-path hits carry no request id at all).
            async with tasks_finished():
                response = await client.get(f"/v1/users/{user.user_id}/access-token", params={"min_ttl": "+300"})
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        succeeded = logs.events("token.refresh.succeeded")
        assert len(succeeded) == 1
        assert succeeded[0]["parent_request_id"] == request_id
        assert "request_id" not in succeeded[0]


class TestRefreshDecisionLogs:
    async def test_the_log_says_still_valid_refreshed_or_failed_and_why(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Each refresh decision leaves one line an operator can read: skipped (with reason), succeeded, failed."""
        user = await put_user(client, sandbox, clock, expires_in=60)
        with captured_logs() as logs:
            await client.post(f"/v1/users/{user.user_id}/refresh")
            await client.post(f"/v1/users/{user.user_id}/refresh")
            sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=500))
            await client.post(f"/v1/users/{user.user_id}/refresh?force=true")
        decisions = [
            (line["event"], line.get("reason") or line.get("outcome"))
            for line in logs.lines()
            if line["event"] in {"token.refresh.succeeded", "token.refresh.skipped", "token.refresh.failed"}
        ]
        assert decisions == [
            ("token.refresh.succeeded", None),
            ("token.refresh.skipped", "still_valid"),
            ("token.refresh.failed", "transient"),
        ]
        assert logs.events("token.refresh.transient_failure")[0]["strava_status"] == 500
