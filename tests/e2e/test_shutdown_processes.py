"""SIGTERM to a `tokensvc serve` process while its refreshes are held at Strava: none is cut between Strava's
answer and the commit, and the process exits within TOKENSVC_SHUTDOWN_TIMEOUT_SECONDS."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import sandbox_stats, seed_user, service_env
from tests.e2e.processes import Process, start_service, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SHUTDOWN_SECONDS = 12


def wait_exit(process: Process, deadline: float) -> int:
    try:
        return process.popen.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{process.name} did not exit within {deadline} s")


class TestSigtermDrains:
    async def test_refreshes_held_at_strava_finish_before_the_process_exits(
        self, empty_pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """Three refreshes are at Strava when SIGTERM arrives; Strava answers afterwards: every caller gets its
        new token, every new pair is stored (another replica reads them valid), and the process exits in time."""
        env = service_env(empty_pg_url, sandbox_process, TOKENSVC_SHUTDOWN_TIMEOUT_SECONDS=str(SHUTDOWN_SECONDS))
        draining = start_service("draining", tmp_path, env)
        other = start_service("other", tmp_path, env)
        try:
            await wait_ready(draining, other)
            users = [f"held-{i}" for i in range(3)]
            for user in users:
                await seed_user(http, sandbox_process, other, user, expires_in=-60)
            sandbox = sandbox_process.url
            await http.post(f"{sandbox}/_control/hold", json={"endpoint": "refresh"})
            calls = [asyncio.create_task(http.get(f"{draining.url}/v1/users/{u}/access-token")) for u in users]
            held = await http.get(f"{sandbox}/_control/held", params={"count": 3, "timeout": 10})
            assert held.status_code == 200
            started = time.monotonic()
            draining.popen.send_signal(signal.SIGTERM)
            # Let the signal land before Strava answers (the log line is the process's own word for it).
            for _ in range(100):
                if "service.shutdown_started" in draining.log.read_text():
                    break
                await asyncio.sleep(0.05)
            await http.post(f"{sandbox}/_control/release")
            answers = await asyncio.gather(*calls)
            code = await asyncio.to_thread(wait_exit, draining, SHUTDOWN_SECONDS + 5)
            elapsed = time.monotonic() - started
            assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
            for user, answer in zip(users, answers, strict=True):
                status = (await http.get(f"{other.url}/v1/users/{user}/token-status")).json()
                assert status["status"] == "valid", (user, status)
                again = (await http.get(f"{other.url}/v1/users/{user}/access-token")).json()
                assert again["access_token"] == answer.json()["access_token"]
            assert (await sandbox_stats(http, sandbox_process))["calls"]["refresh"] == 3
            assert code in (0, -signal.SIGTERM)
            assert elapsed < SHUTDOWN_SECONDS + 2
            assert "token.refresh.cut_at_shutdown" not in draining.log.read_text()
        finally:
            draining.stop()
            other.stop()
