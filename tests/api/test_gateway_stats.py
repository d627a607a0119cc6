"""The gateway in `/v1/stats`, `/metrics` and the dashboard, on both databases: the shared Strava windows (used,
limit, reset), the gateway's calls by outcome and the sync success rate, the same from every replica."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.api import test_gateway as gw
from tests.conftest import FakeClock, make_settings
from tokensvc.sandbox import SandboxState
from tokensvc.sandbox.faults import FaultSpec
from tokensvc.service.dashboard import DashboardService
from tokensvc.service.gateway_stats import OUTCOMES
from tokensvc.service.stats import StatsService

pytestmark = pytest.mark.dialects("sqlite", "postgres")

HOUR = 3600
INTERACTIVE = {"Tokensvc-Priority": "interactive"}


@pytest.fixture
def recording(strava_transport: httpx.AsyncBaseTransport) -> gw.Recording:
    return gw.Recording(strava_transport)


async def one_of_each(http: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock) -> list[int]:
    """Two served calls and one of every kind of failure; the statuses the caller saw. The read window is 4
    (interactive may spend all of it): the GETs that reach Strava are the two served ones, the 404 and the
    refused scope, so the fifth GET is refused for the window."""
    seeded = await gw.connect(http, sandbox, clock)
    narrow = await gw.connect(http, sandbox, clock, scope="read")
    dead = await gw.connect(http, sandbox, clock)
    sandbox.revoke(dead.athlete_id)
    statuses = [(await http.get(gw.gateway(seeded, "athlete"), headers=INTERACTIVE)).status_code for _ in range(2)]
    statuses.append((await http.get(gw.gateway(narrow, "athlete/activities"), headers=INTERACTIVE)).status_code)
    statuses.append((await http.get(gw.gateway(seeded, "activities/999999"), headers=INTERACTIVE)).status_code)
    statuses.append((await http.get(gw.gateway(seeded, "athlete"), headers=INTERACTIVE)).status_code)
    statuses.append((await http.put(gw.gateway(dead, "activities/1"), json={"name": "x"})).status_code)
    sandbox.add_fault(FaultSpec(endpoint="activity_update", kind="status", status=502))
    statuses.append((await http.put(gw.gateway(seeded, "activities/1"), json={"name": "x"})).status_code)
    return statuses


EXPECTED = {"ok": 2, "scope": 1, "client_error": 1, "rate_limited": 1, "reauth": 1, "strava_error": 1}


class TestStats:
    async def test_windows_outcomes_and_the_success_rate(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: gw.Recording
    ) -> None:
        """Seven calls, one per outcome but two served: /v1/stats counts each, the success rate is 2/7, and the
        windows show what reached Strava against the limits, with the resets at the next quarter and midnight."""
        settings = make_settings(database_url, strava_read_rate_limit="4,1000", strava_rate_limit="50,500")
        async with gw.service(settings, clock, recording) as http:
            statuses = await one_of_each(http, sandbox, clock)
            body: dict[str, Any] = (await http.get("/v1/stats")).json()
        assert statuses == [200, 200, 403, 404, 429, 409, 503]
        gateway = body["gateway"]["last_24h"]
        assert {k: gateway[k] for k in OUTCOMES} == EXPECTED
        assert gateway["calls"] == 7
        assert gateway["success_rate"] == round(2 / 7, 4)
        windows = body["strava_windows"]
        sent = len(recording.api_calls())  # every one a rate-counted call
        assert windows["read_15min"]["used"] == windows["read_daily"]["used"] == 4
        assert windows["overall_15min"]["used"] == windows["overall_daily"]["used"] == sent
        assert (windows["read_15min"]["limit"], windows["read_daily"]["limit"]) == (4, 1000)
        assert (windows["overall_15min"]["limit"], windows["overall_daily"]["limit"]) == (50, 500)
        now = int(clock())
        quarter = datetime.fromtimestamp(now - now % 900 + 900, UTC)
        midnight = datetime.fromtimestamp(now - now % 86_400 + 86_400, UTC)
        assert datetime.fromisoformat(windows["read_15min"]["resets_at"]) == quarter
        assert datetime.fromisoformat(windows["overall_daily"]["resets_at"]) == midnight
        assert windows["paused_until"] is None

    async def test_no_calls_is_no_rate_and_old_calls_leave_after_24_hours(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: gw.Recording
    ) -> None:
        """Before any call the rate is null; a call counts for 24 hourly buckets, then no more."""
        async with gw.service(make_settings(database_url), clock, recording) as http:
            empty = (await http.get("/v1/stats")).json()["gateway"]["last_24h"]
            seeded = await gw.connect(http, sandbox, clock)
            assert (await http.get(gw.gateway(seeded, "athlete"))).status_code == 200
            counted = (await http.get("/v1/stats")).json()["gateway"]["last_24h"]
            clock.advance(24 * HOUR)
            gone = (await http.get("/v1/stats")).json()["gateway"]["last_24h"]
        assert (empty["calls"], empty["success_rate"]) == (0, None)
        assert (counted["calls"], counted["ok"], counted["success_rate"]) == (1, 1, 1.0)
        assert gone["calls"] == 0

    async def test_every_replica_answers_the_same(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: gw.Recording
    ) -> None:
        """Calls through one replica, stats from another: once the first has flushed its tally (its background
        job does every gauge interval, here 5 minutes; its own /v1/stats does at once), the second reports the same
        counts."""
        settings = make_settings(
            database_url, strava_read_rate_limit="4,1000", strava_rate_limit="50,500", gauge_interval_seconds=300
        )
        async with gw.service(settings, clock, recording) as first, gw.service(settings, clock, recording) as other:
            await one_of_each(first, sandbox, clock)
            before = (await other.get("/v1/stats")).json()
            mine = (await first.get("/v1/stats")).json()
            theirs = (await other.get("/v1/stats")).json()
        assert before["gateway"]["last_24h"]["calls"] == 0  # not flushed yet: the replica's counts are its own
        assert theirs["gateway"] == mine["gateway"]
        assert theirs["strava_windows"] == mine["strava_windows"]
        assert theirs["gateway"]["last_24h"]["calls"] == 7

    async def test_a_replicas_counts_are_written_when_it_stops(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: gw.Recording
    ) -> None:
        """Counts not yet flushed when a replica shuts down are written on the way out (nothing else wrote them:
        its tally job runs every 5 minutes here, and it served no /v1/stats)."""
        settings = make_settings(database_url, gauge_interval_seconds=300)
        async with gw.service(settings, clock, recording) as http:
            seeded = await gw.connect(http, sandbox, clock)
            assert (await http.get(gw.gateway(seeded, "athlete"))).status_code == 200
        async with gw.service(settings, clock, recording) as http:
            counted = (await http.get("/v1/stats")).json()["gateway"]["last_24h"]
        assert (counted["calls"], counted["ok"]) == (1, 1)


class TestMetricsAndDashboard:
    async def test_metrics_and_the_dashboard_show_the_same_numbers(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: gw.Recording
    ) -> None:
        """The DB-wide gauges (24-hour calls by outcome, success ratio, windows used/limit/reset) and the
        dashboard's view report what /v1/stats does; the per-process counter has the same outcome labels."""
        settings = make_settings(database_url, strava_read_rate_limit="4,1000", strava_rate_limit="50,500")
        async with gw.service(settings, clock, recording) as http:
            await one_of_each(http, sandbox, clock)
            stats: StatsService = http.app.state.stats  # type: ignore[attr-defined]
            body = (await http.get("/v1/stats")).json()
            await stats.update_gauges()
            text = (await http.get("/metrics")).text
            dashboard: DashboardService = http.app.state.dashboard  # type: ignore[attr-defined]
            view = await dashboard.view()
        for outcome, count in EXPECTED.items():
            assert sample(text, "tokensvc_gateway_calls_last_24h", outcome=outcome) == count
            assert sample(text, "tokensvc_gateway_calls_total", outcome=outcome) >= count
        counter_labels = {
            line.split('"')[1] for line in text.splitlines() if line.startswith("tokensvc_gateway_calls_total{")
        }
        assert counter_labels <= set(OUTCOMES)
        assert sample(text, "tokensvc_gateway_success_ratio") == round(2 / 7, 4)
        windows = body["strava_windows"]
        assert sample(text, "tokensvc_strava_window_used", window="read_15min") == windows["read_15min"]["used"]
        assert sample(text, "tokensvc_strava_window_limit", window="daily") == windows["overall_daily"]["limit"]
        reset = datetime.fromisoformat(windows["overall_15min"]["resets_at"]).timestamp()
        assert sample(text, "tokensvc_strava_window_reset_timestamp_seconds", window="15min") == reset
        assert view.gateway.counts == EXPECTED | {k: 0 for k in OUTCOMES if k not in EXPECTED}
        assert view.gateway.success_rate == body["gateway"]["last_24h"]["success_rate"]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{inner}}} " if labels else f"{name} "
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))
