"""The Strava API gateway over three `tokensvc serve` processes on one Postgres, the sandbox as its own process:
the read window is shared by every replica, and a token Strava invalidated early is refreshed once for all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import sandbox_stats, seed_user, service_env
from tests.e2e.processes import Process, start_service, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

Replicas = Callable[..., list[Process]]
SHORT_WINDOW_SECONDS = 900  # Strava's short rate window: the quarter hours of the UTC clock


async def inside_one_short_window(margin_seconds: float = 30.0) -> None:
    """A burst counted against a window must not straddle a quarter-hour boundary, where the next window admits as
    many again: with less than `margin_seconds` left of this one, wait for the next (a wall-clock boundary, the
    same for every process here, not another process's step)."""
    left = SHORT_WINDOW_SECONDS - time.time() % SHORT_WINDOW_SECONDS
    if left < margin_seconds:
        await asyncio.sleep(left + 0.5)


@pytest.fixture
def replicas(empty_pg_url: str, sandbox_process: Process, tmp_path: Path) -> Iterator[Replicas]:
    """Start three replicas with extra settings, stopped after the test."""
    started: list[Process] = []

    def start(**extra: str) -> list[Process]:
        env = service_env(empty_pg_url, sandbox_process, **extra)
        started.extend(start_service(f"replica-{i}", tmp_path, env) for i in range(3))
        return started

    yield start
    for process in started:
        process.stop()


class TestSharedReadWindow:
    async def test_300_gets_over_3_replicas_against_a_window_of_100(
        self, replicas: Replicas, sandbox_process: Process, http: httpx.AsyncClient
    ) -> None:
        """At most 100 reach Strava (so Strava never answers 429), the rest are 429 with Retry-After."""
        fleet = replicas(TOKENSVC_STRAVA_READ_RATE_LIMIT="100,1000")
        await wait_ready(*fleet)
        await seed_user(http, sandbox_process, fleet[0], "syncer", expires_in=21_600)
        interactive = {"Tokensvc-Priority": "interactive"}
        await inside_one_short_window()
        answers = await asyncio.gather(
            *(http.get(f"{fleet[i % 3].url}/v1/users/syncer/strava/athlete", headers=interactive) for i in range(300))
        )
        statuses = [a.status_code for a in answers]
        stats = await sandbox_stats(http, sandbox_process)
        assert set(statuses) <= {200, 429}, {a.text for a in answers if a.status_code not in (200, 429)}
        assert stats["calls"]["athlete"] == statuses.count(200)
        assert 90 <= statuses.count(200) <= 100
        refused = [a for a in answers if a.status_code == 429]
        assert all(a.json()["code"] == "strava_rate_limited" for a in refused)
        assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
        assert len({a.headers["retry-after"] for a in refused}) > 1  # jittered: not all back at the same second
        # Every replica reports the same DB-wide counts once each has written its tally (its own /v1/stats does).
        for replica in fleet:
            assert (await http.get(f"{replica.url}/v1/stats")).status_code == 200
        reports = [(await http.get(f"{replica.url}/v1/stats")).json() for replica in fleet]
        assert reports[0]["gateway"] == reports[1]["gateway"] == reports[2]["gateway"]
        counted = reports[0]["gateway"]["last_24h"]
        assert (counted["calls"], counted["ok"], counted["rate_limited"]) == (300, statuses.count(200), len(refused))
        assert reports[0]["strava_windows"]["read_15min"] == reports[2]["strava_windows"]["read_15min"]


class TestRecoveryAcrossReplicas:
    async def test_50_calls_over_3_replicas_after_an_early_invalidation_refresh_once(
        self, replicas: Replicas, sandbox_process: Process, http: httpx.AsyncClient
    ) -> None:
        """Strava invalidates the user's access token early: 50 concurrent calls → exactly one refresh, all 200."""
        # Windows large enough for all 50 (and their retries), on both sides: this test is about the refresh.
        fleet = replicas(TOKENSVC_STRAVA_READ_RATE_LIMIT="1000,10000", TOKENSVC_STRAVA_RATE_LIMIT="1000,10000")
        limits = {"limit_15min": 1000, "limit_daily": 10000, "read_limit_15min": 1000, "read_limit_daily": 10000}
        assert (await http.post(f"{sandbox_process.url}/_control/rate-limit", json=limits)).status_code == 200
        await wait_ready(*fleet)
        athlete = await seed_user(http, sandbox_process, fleet[0], "recover", expires_in=21_600)
        invalidated = await http.post(f"{sandbox_process.url}/_control/athletes/{athlete['athlete_id']}/invalidate")
        assert invalidated.status_code == 200
        answers = await asyncio.gather(
            *(http.get(f"{fleet[i % 3].url}/v1/users/recover/strava/athlete") for i in range(50))
        )
        assert [a.status_code for a in answers] == [200] * 50, {a.text for a in answers if a.status_code != 200}
        stats = await sandbox_stats(http, sandbox_process)
        assert stats["calls"]["refresh"] == 1
        assert stats["ledger_violations"] == []
