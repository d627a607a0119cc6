"""Three `tokensvc serve` processes on one Postgres, the sandbox as its own process, real HTTP in between."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import sandbox_stats, seed_user, service_env
from tests.e2e.processes import Process, start_service, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def replicas(empty_pg_url: str, sandbox_process: Process, tmp_path: Path) -> Iterator[list[Process]]:
    """Three replicas started at the same moment on one empty database (they migrate it under the lock)."""
    env = service_env(empty_pg_url, sandbox_process)
    processes = [start_service(f"replica-{i}", tmp_path, env) for i in range(3)]
    yield processes
    for process in processes:
        process.stop()


def assert_no_token_in_logs(processes: list[Process], tokens: list[str]) -> None:
    for process in processes:
        text = process.log.read_text()
        for token in tokens:
            assert token not in text, f"a token appeared in {process.name}'s log"


class TestThreeReplicas:
    async def test_300_concurrent_callers_for_an_expired_user_cause_exactly_one_refresh(
        self, replicas: list[Process], sandbox_process: Process, http: httpx.AsyncClient
    ) -> None:
        """300 concurrent access-token calls spread over 3 processes: Strava saw 1 refresh, all got one token."""
        await wait_ready(*replicas)
        athlete = await seed_user(http, sandbox_process, replicas[0], "runner-1", expires_in=-60)
        # Latency at Strava keeps the refresh in flight while every caller arrives.
        await http.post(
            f"{sandbox_process.url}/_control/faults", json={"endpoint": "refresh", "kind": "latency", "latency_ms": 300}
        )
        responses = await asyncio.gather(
            *(http.get(f"{replicas[i % 3].url}/v1/users/runner-1/access-token") for i in range(300))
        )
        assert [r.status_code for r in responses] == [200] * 300, {r.text for r in responses if r.status_code != 200}
        tokens = {r.json()["access_token"] for r in responses}
        stats = await sandbox_stats(http, sandbox_process)
        newest = (await http.get(f"{sandbox_process.url}/_control/athletes/{athlete['athlete_id']}")).json()
        assert stats["calls"]["refresh"] == 1
        assert tokens == {newest["access_token"]}
        assert stats["ledger_violations"] == []
        assert_no_token_in_logs(
            replicas,
            [athlete["access_token"], athlete["refresh_token"], newest["access_token"], newest["refresh_token"]],
        )

    async def test_a_seeded_rotation_race_gives_no_false_needs_reauth(
        self,
        replicas: list[Process],
        sandbox_process: Process,
        http: httpx.AsyncClient,
        empty_pg_url: str,
    ) -> None:
        """Another client rotates and imports through replica B while replica A's refresh is at Strava.

        The sandbox holds A's refresh; the rotation kills the token A sent; B's import commits at once (A holds
        a claim, no lock); on release Strava rejects A's token and A's re-read finds the newer token: A's caller
        gets it, and nobody is flagged.
        """
        await wait_ready(*replicas)
        a, b = replicas[0], replicas[1]
        athlete = await seed_user(http, sandbox_process, a, "racer", expires_in=-60)
        sandbox = sandbox_process.url
        await http.post(f"{sandbox}/_control/hold", json={"endpoint": "refresh"})
        from_a = asyncio.create_task(http.get(f"{a.url}/v1/users/racer/access-token"))
        assert (await http.get(f"{sandbox}/_control/held", params={"count": 1, "timeout": 10})).status_code == 200
        rotated = (await http.post(f"{sandbox}/_control/athletes/{athlete['athlete_id']}/rotate")).json()
        # A holds a claim, not a lock: B's import does not wait for A's call at Strava.
        imported = await http.put(
            f"{b.url}/v1/users/racer/tokens",
            json={k: rotated[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")},
        )
        await http.post(f"{sandbox}/_control/release")
        got = await from_a
        assert imported.status_code == 200
        assert got.status_code == 200, got.text
        assert got.json()["access_token"] == rotated["access_token"]
        status = (await http.get(f"{replicas[2].url}/v1/users/racer/token-status")).json()
        assert (status["status"], status["needs_reauth"]) == ("valid", False)

    async def test_a_lost_answer_is_not_retried_and_the_next_attempt_flags_clearly(
        self, empty_pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """Strava rotates but the answer never arrives: 503 and one call; then one more call tells the truth."""
        service = start_service(
            "short-timeout",
            tmp_path,
            service_env(
                empty_pg_url,
                sandbox_process,
                TOKENSVC_STRAVA_TIMEOUT_SECONDS="1",
                TOKENSVC_STRAVA_TOKEN_TIMEOUT_SECONDS="1",
            ),
        )
        try:
            await wait_ready(service)
            await seed_user(http, sandbox_process, service, "unlucky", expires_in=-60)
            await http.post(
                f"{sandbox_process.url}/_control/faults",
                json={"endpoint": "refresh", "kind": "lost_answer", "hang_seconds": 5},
            )
            first = await http.get(f"{service.url}/v1/users/unlucky/access-token")
            assert first.status_code == 503
            assert first.json()["code"] == "provider_unavailable"
            assert first.headers["retry-after"]
            assert (await sandbox_stats(http, sandbox_process))["calls"]["refresh"] == 1
            status = (await http.get(f"{service.url}/v1/users/unlucky/token-status")).json()
            assert status["status"] == "expired"  # stored tokens untouched by the failure
            second = await http.get(f"{service.url}/v1/users/unlucky/access-token")
            assert second.status_code == 409
            assert second.json()["code"] == "reauth_required"
            third = await http.get(f"{service.url}/v1/users/unlucky/access-token")
            assert third.status_code == 409
            assert (await sandbox_stats(http, sandbox_process))["calls"]["refresh"] == 2
            assert "token.refresh.answer_lost" in service.log.read_text()
        finally:
            service.stop()
