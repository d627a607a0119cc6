"""The sweeper across real processes: three replicas' background loops, and `tokensvc refresh-due` for cron."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import sandbox_stats, seed_user, service_env
from tests.e2e.processes import Process, clean_env, run_cli, start_service, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


async def wait_for_refreshes(http: httpx.AsyncClient, sandbox: Process, count: int, deadline: float = 60) -> Any:
    """A bounded condition wait on the sandbox's counters (the sweepers run on their own timers): until `count`
    refreshes were answered (`calls` counts them on arrival, `refresh_by_athlete` once processed)."""
    async with asyncio.timeout(deadline):
        while True:
            stats = await sandbox_stats(http, sandbox)
            if sum(stats["refresh_by_athlete"].values()) >= count:
                return stats
            await asyncio.sleep(0.1)


class TestThreeSweepingReplicas:
    async def test_each_due_user_is_refreshed_exactly_once_by_the_background_sweepers(
        self, empty_pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """Three replicas sweep every second on one Postgres: 60 due users, 60 refreshes, one per athlete."""
        env = service_env(empty_pg_url, sandbox_process, TOKENSVC_SWEEP_INTERVAL_SECONDS="1")
        replicas = [start_service(f"sweeper-{i}", tmp_path, env) for i in range(3)]
        try:
            await wait_ready(*replicas)
            await http.post(
                f"{sandbox_process.url}/_control/faults",
                json={"endpoint": "refresh", "kind": "latency", "latency_ms": 30, "count": 60},
            )
            athletes = [
                (await seed_user(http, sandbox_process, replicas[i % 3], f"idle-{i}", expires_in=-60))["athlete_id"]
                for i in range(60)
            ]
            stats = await wait_for_refreshes(http, sandbox_process, 60)
            # every sweeper has run at least once more since: nothing further may happen
            await asyncio.gather(*(http.post(f"{r.url}/v1/refresh-sweep") for r in replicas))
            stats = await sandbox_stats(http, sandbox_process)
        finally:
            for replica in replicas:
                replica.stop()
        assert stats["calls"]["refresh"] == 60
        assert sorted(stats["refresh_by_athlete"].values()) == [1] * 60
        assert {int(a) for a in stats["refresh_by_athlete"]} == set(athletes)
        assert stats["ledger_violations"] == []
        assert sum("sweep.finished" in r.log.read_text() for r in replicas) == 3


class TestRefreshDueCommand:
    async def test_refresh_due_refreshes_reports_and_exits_by_outcome(
        self, pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """`tokensvc refresh-due` prints counts; exit 0 when nothing failed, 1 when a refresh failed."""
        env = clean_env(**service_env(pg_url, sandbox_process))
        lines = []
        for i in range(3):
            athlete = (await http.post(f"{sandbox_process.url}/_control/athletes", json={"expires_in": -60})).json()
            record = {k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
            lines.append(json.dumps({"user_id": f"cron-{i}", **record}))
        (tmp_path / "tokens.jsonl").write_text("\n".join(lines) + "\n")
        imported = await run_cli("import", str(tmp_path / "tokens.jsonl"), env=env)
        assert imported.returncode == 0, imported.stderr
        done = await run_cli("refresh-due", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "checked 3, refreshed 3, failed 0, needs_reauth 0"

        more = (await http.post(f"{sandbox_process.url}/_control/athletes", json={"expires_in": -60})).json()
        record = {k: more[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
        (tmp_path / "more.jsonl").write_text(json.dumps({"user_id": "cron-x", **record}) + "\n")
        assert (await run_cli("import", str(tmp_path / "more.jsonl"), env=env)).returncode == 0
        await http.post(
            f"{sandbox_process.url}/_control/faults", json={"endpoint": "refresh", "kind": "status", "status": 500}
        )
        failed = await run_cli("refresh-due", env=env)
        assert failed.returncode == 1
        assert failed.stdout.strip() == "checked 1, refreshed 0, failed 1, needs_reauth 0"
        for output in (done.stdout + done.stderr, failed.stdout + failed.stderr):
            assert more["access_token"] not in output
            assert more["refresh_token"] not in output
