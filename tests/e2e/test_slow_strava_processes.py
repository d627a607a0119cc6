"""A slow Strava (issue 11) over real processes: one `tokensvc serve` process has more refreshes waiting at Strava
(held by the sandbox) than its database pool has connections. Nothing
waits on Strava holding a connection, a transaction or a lock (on SQLite, the write lock): readiness, a valid
user's token, a status read, Strava's webhook POST and another user's import all answer while the refreshes wait.
Then every refresh completes with exactly one Strava call. On SQLite and on Postgres, at default settings.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import sandbox_stats, seed_user, service_env
from tests.e2e.processes import Process, start_service, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.dialects("sqlite", "postgres")]

DUE = 12  # over the default pool of 5 connections; all 12 wait at Strava (32 token slots)
AT_STRAVA = DUE
PROBE_TIMEOUT = 5.0  # before the claim, an import behind a slow refresh waited for the pool (10 s) or the lock


def webhook_event(athlete_id: int) -> dict[str, object]:
    return {
        "object_type": "activity",
        "object_id": int(time.time() * 1000) % 10**9,
        "aspect_type": "create",
        "owner_id": athlete_id,
        "subscription_id": 1,
        "event_time": int(time.time()),
    }


class TestSlowStrava:
    async def test_reads_readiness_webhooks_and_writes_answer_while_refreshes_wait_at_strava(
        self, database_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """12 refreshes are sent while Strava holds every refresh call: all 12 wait there. Meanwhile
        every probe answers 200 within 5 s, and the 12 calls are still held at Strava when they have (so nothing
        above waited for a Strava answer). On release all 12 refresh, one Strava call each."""
        env = service_env(database_url, sandbox_process, TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN="slow-verify-token")
        service = start_service("slow", tmp_path, env)
        try:
            await wait_ready(service)
            for i in range(DUE):
                await seed_user(http, sandbox_process, service, f"due-{i}", expires_in=600)  # inside the buffer
            valid = await seed_user(http, sandbox_process, service, "valid", expires_in=6 * 3600)
            sandbox = sandbox_process.url
            await http.post(f"{sandbox}/_control/hold", json={"endpoint": "refresh"})
            refreshes = [asyncio.create_task(http.post(f"{service.url}/v1/users/due-{i}/refresh")) for i in range(DUE)]
            held = await http.get(f"{sandbox}/_control/held", params={"count": AT_STRAVA, "timeout": 20})
            assert held.status_code == 200, held.text

            url = service.url
            probes = {
                "readyz": await http.get(f"{url}/readyz", timeout=PROBE_TIMEOUT),
                "access-token": await http.get(f"{url}/v1/users/valid/access-token", timeout=PROBE_TIMEOUT),
                "token-status": await http.get(f"{url}/v1/users/due-0/token-status", timeout=PROBE_TIMEOUT),
                "webhook": await http.post(
                    f"{url}/v1/webhooks/strava", json=webhook_event(valid["athlete_id"]), timeout=PROBE_TIMEOUT
                ),
            }
            athlete = (await http.post(f"{sandbox}/_control/athletes", json={"expires_in": 6 * 3600})).json()
            probes["import"] = await http.put(
                f"{url}/v1/users/newcomer/tokens",
                json={k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")},
                timeout=PROBE_TIMEOUT,
            )
            assert {name: r.status_code for name, r in probes.items()} == dict.fromkeys(probes, 200), {
                name: r.text for name, r in probes.items()
            }
            assert probes["access-token"].json()["access_token"] == valid["access_token"]
            still = await http.get(f"{sandbox}/_control/held", params={"count": AT_STRAVA, "timeout": 0})
            assert still.json()["held"] == AT_STRAVA  # no refresh was answered while the probes ran
            assert not any(task.done() for task in refreshes)

            await http.post(f"{sandbox}/_control/release")
            answers = await asyncio.gather(*refreshes)
            assert [a.status_code for a in answers] == [200] * DUE, [a.text for a in answers]
            assert all(a.json()["refreshed"] for a in answers)
            stats = await sandbox_stats(http, sandbox_process)
            assert stats["calls"]["refresh"] == DUE
            assert stats["ledger_violations"] == []
        finally:
            service.stop()
