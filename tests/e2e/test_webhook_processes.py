"""Strava webhooks across real processes: `tokensvc serve` and the sandbox, the push subscription made with the
CLI, and a revocation at the sandbox pushed back to the service over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import seed_user, service_env
from tests.e2e.processes import Process, run_cli, start_service, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

VERIFY_TOKEN = "e2e-verify-token"
DEADLINE = 30.0


@pytest.fixture
def service(pg_url: str, sandbox_process: Process, tmp_path: Path) -> Iterator[Process]:
    env = service_env(pg_url, sandbox_process, TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN=VERIFY_TOKEN)
    process = start_service("service", tmp_path, env)
    yield process
    process.stop()


async def wait_for_status(http: httpx.AsyncClient, service: Process, user_id: str, reason: str) -> dict[str, object]:
    """A bounded condition poll on token-status (the service offers no event to wait on across processes)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            status: dict[str, object] = (await http.get(f"{service.url}/v1/users/{user_id}/token-status")).json()
            if status["reauth_reason"] == reason:
                return status
            await asyncio.sleep(0.05)


class TestDeauthorizationWebhook:
    async def test_a_revocation_at_strava_reaches_the_service_and_discards_the_tokens(
        self, service: Process, sandbox_process: Process, http: httpx.AsyncClient
    ) -> None:
        """The CLI subscribes (the sandbox checks the service's challenge over HTTP); the athlete revokes; the
        sandbox pushes the event; the service confirms it with the sandbox and ends needs_reauth/deauthorized."""
        await wait_ready(service)
        cli_env = service.env | {"TOKENSVC_PUBLIC_URL": service.url}
        created = await run_cli("strava-subscription", "create", env=cli_env)
        assert created.returncode == 0, created.stderr
        assert f"for {service.url}/v1/webhooks/strava" in created.stdout
        shown = await run_cli("strava-subscription", "show", env=cli_env)
        assert shown.returncode == 0, shown.stderr
        assert f"{service.url}/v1/webhooks/strava" in shown.stdout

        healthy = await seed_user(http, sandbox_process, service, "keeps-tokens", expires_in=20_000)
        athlete = await seed_user(http, sandbox_process, service, "revokes", expires_in=20_000)
        revoked = await http.post(f"{sandbox_process.url}/_control/athletes/{athlete['athlete_id']}/revoke")
        assert revoked.status_code == 200
        delivered = await http.get(f"{sandbox_process.url}/_control/deliveries", params={"count": 1, "timeout": 10})
        assert [d["statuses"] for d in delivered.json()["deliveries"]] == [[200]]

        status = await wait_for_status(http, service, "revokes", "deauthorized")
        assert status["status"] == "needs_reauth"
        refused = await http.get(f"{service.url}/v1/users/revokes/access-token")
        assert refused.status_code == 409
        assert refused.json()["reauth_reason"] == "deauthorized"

        # A forged event for the healthy athlete: the sandbox still honours its token, so nothing changes.
        forged = {
            "aspect_type": "update",
            "event_time": 1,
            "object_id": healthy["athlete_id"],
            "object_type": "athlete",
            "owner_id": healthy["athlete_id"],
            "subscription_id": 1,
            "updates": {"authorized": "false"},
        }
        calls_before = (await http.get(f"{sandbox_process.url}/_control/stats")).json()["calls"]["athlete"]
        sent = await http.post(f"{sandbox_process.url}/_control/push", json=forged)
        assert sent.json()["statuses"] == [200]

        async with asyncio.timeout(DEADLINE):  # until the service has asked the sandbox about the token
            while True:
                stats = (await http.get(f"{sandbox_process.url}/_control/stats")).json()
                if stats["calls"]["athlete"] > calls_before:
                    break
                await asyncio.sleep(0.05)
        token = await http.get(f"{service.url}/v1/users/keeps-tokens/access-token")
        assert token.status_code == 200
        assert token.json()["access_token"] == healthy["access_token"]

        deleted = await run_cli("strava-subscription", "delete", env=cli_env)
        assert deleted.returncode == 0, deleted.stderr
        assert (await run_cli("strava-subscription", "show", env=cli_env)).returncode == 1
        assert athlete["access_token"] not in service.log.read_text()
