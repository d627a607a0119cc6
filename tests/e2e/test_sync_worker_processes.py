"""The sync end to end over real processes: the sandbox, `tokensvc serve`, and the example worker
(examples/sync_worker.py) as its own process. An activity uploaded at Strava (its create event pushed three times)
reaches the worker as one signed `strava.activity.created` for the right user, and the worker reads it through the
gateway: 200 with the activity. On Postgres and on SQLite."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from standardwebhooks import Webhook

from tests.e2e.conftest import API_KEY, sandbox_stats, seed_user, service_env
from tests.e2e.processes import Process, clean_env, free_port, run_cli, start_service, wait_ready
from tokensvc.crypto import generate_notify_secret
from tokensvc.db import make_engine

pytestmark = [pytest.mark.slow, pytest.mark.dialects("sqlite", "postgres")]

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "examples" / "sync_worker.py"
VERIFY_TOKEN = "e2e-verify-token"
PATH_SECRET = "e2e-path-secret-0123456789abcdef"
DEADLINE = 60.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def service_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database the service migrates itself: a SQLite file, or a fresh Postgres database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'tokensvc.db'}"
    return str(request.getfixturevalue("empty_pg_url"))


def start_worker(log_dir: Path, *, tokensvc_url: str, secret: str, record: Path) -> Process:
    """`python examples/sync_worker.py …` on a free port, as a user would run it."""
    port = free_port()
    log = log_dir / "sync-worker.log"
    args = ["--tokensvc-url", tokensvc_url, "--api-key", API_KEY, "--notify-secret", secret]
    with log.open("wb") as sink:
        popen = subprocess.Popen(
            [sys.executable, str(WORKER), *args, "--port", str(port), "--record", str(record)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    return Process("sync-worker", popen, f"http://127.0.0.1:{port}", log)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def wait_for_record(path: Path, kind: str) -> dict[str, Any]:
    """A bounded condition poll on the worker's record file (it is another process)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            found = [r for r in records(path) if r["kind"] == kind]
            if found:
                return found[0]
            await asyncio.sleep(0.05)


async def wait_outbox_delivered(database_url: str) -> None:
    """Until the outbox holds notifications and none is undelivered (no delivery follows then)."""
    engine = make_engine(database_url)
    sql = text("SELECT count(*), sum(CASE WHEN delivered_at IS NULL THEN 1 ELSE 0 END) FROM notifications")
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                async with engine.connect() as conn:
                    total, undelivered = (await conn.execute(sql)).one()
                if total and not undelivered:
                    return
                await asyncio.sleep(0.1)
    finally:
        await engine.dispose()


class TestSyncWorker:
    async def test_an_upload_is_fetched_once_through_the_gateway(
        self, service_db: str, sandbox_process: Process, tmp_path: Path, http: httpx.AsyncClient
    ) -> None:
        """At default settings: Strava's three tries of the create event are one signed `strava.activity.created`
        for the right user, one gateway read answers 200 with the activity, and the delete is applied without one."""
        secret = generate_notify_secret()
        record = tmp_path / "synced.jsonl"
        service_port = free_port()
        worker = start_worker(tmp_path, tokensvc_url=f"http://127.0.0.1:{service_port}", secret=secret, record=record)
        env = service_env(
            service_db,
            sandbox_process,
            TOKENSVC_NOTIFY_URL=f"{worker.url}/hooks/tokensvc",
            TOKENSVC_NOTIFY_SECRET=secret,
            TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN=VERIFY_TOKEN,
            TOKENSVC_STRAVA_WEBHOOK_PATH_SECRET=PATH_SECRET,
        )
        service = start_service("service", tmp_path, env, port=service_port)
        try:
            await wait_ready(worker, service)
            created = await run_cli(
                "strava-subscription", "create", env=service.env | {"TOKENSVC_PUBLIC_URL": service.url}
            )
            assert created.returncode == 0, created.stderr
            athlete = await seed_user(http, sandbox_process, service, "syncs", expires_in=20_000)
            await seed_user(http, sandbox_process, service, "bystander", expires_in=20_000)

            started = time.monotonic()
            uploaded = await http.post(
                f"{sandbox_process.url}/_control/athletes/{athlete['athlete_id']}/activities",
                params={"copies": 3},
                json={"name": "Morning Tempo", "distance": 10_000},
            )
            assert uploaded.status_code == 200, uploaded.text
            activity_id = uploaded.json()["id"]
            delivered = await http.get(f"{sandbox_process.url}/_control/deliveries", params={"count": 3, "timeout": 10})
            assert [d["statuses"] for d in delivered.json()["deliveries"]] == [[200], [200], [200]]

            fetched = await wait_for_record(record, "fetched")
            print(f"upload to activity fetched by the worker: {time.monotonic() - started:.2f}s (default settings)")
            # The athlete deletes it: the worker forgets it without calling Strava.
            assert (await http.delete(f"{sandbox_process.url}/_control/activities/{activity_id}")).status_code == 200
            delivered = await http.get(f"{sandbox_process.url}/_control/deliveries", params={"count": 4, "timeout": 10})
            assert delivered.json()["deliveries"][3]["statuses"] == [200]
            deleted = await wait_for_record(record, "deleted")
            await wait_outbox_delivered(service_db)
            await self.assert_forged_and_replayed_are_not_synced(worker, secret, record)
        finally:
            worker.stop()
            service.stop()

        received = [r for r in records(record) if r["kind"] == "received" and r["type"].startswith("strava.")]
        # Strava's three tries are one notification; the delete is another.
        assert [r["type"] for r in received] == ["strava.activity.created", "strava.activity.deleted"], received
        assert (deleted["user_id"], deleted["activity_id"]) == ("syncs", activity_id)
        assert received[0]["data"]["user_id"] == "syncs"
        assert received[0]["data"]["object_id"] == activity_id
        assert [r for r in records(record) if r["kind"] == "fetched"] == [fetched]
        assert (fetched["user_id"], fetched["activity_id"], fetched["status"]) == ("syncs", activity_id, 200)
        assert (fetched["activity"]["id"], fetched["activity"]["name"]) == (activity_id, "Morning Tempo")
        assert fetched["activity"]["distance"] == 10_000
        stats = await sandbox_stats(http, sandbox_process)
        assert stats["calls"]["activity"] == 1  # one read at Strava, through the gateway, none for the delete
        for token in (athlete["access_token"], athlete["refresh_token"]):
            assert token not in record.read_text()
            assert token not in worker.log.read_text()

    async def assert_forged_and_replayed_are_not_synced(self, worker: Process, secret: str, record: Path) -> None:
        """A delivery without a valid signature is refused; a replay of a handled `webhook-id` is not synced again."""
        first = next(r for r in records(record) if r["kind"] == "received" and r["type"].startswith("strava."))
        body = json.dumps({"type": first["type"], "timestamp": "2026-12-01T10:00:00Z", "data": first["data"]})
        async with httpx.AsyncClient(timeout=10) as client:
            forged = await client.post(
                f"{worker.url}/hooks/tokensvc",
                content=body,
                headers={"webhook-id": "msg_forged", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"},
            )
            assert forged.status_code == 401
            now = datetime.now(UTC)
            signature = Webhook(secret).sign(first["webhook_id"], now, body)
            replay = {
                "webhook-id": first["webhook_id"],
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signature,
            }
            assert (await client.post(f"{worker.url}/hooks/tokensvc", content=body, headers=replay)).status_code == 204
        assert (await wait_for_record(record, "duplicate"))["webhook_id"] == first["webhook_id"]
