"""Strava webhooks across real processes: `tokensvc serve` and the sandbox, the push subscription made with the
CLI, and a revocation at the sandbox pushed back to the service over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.e2e.conftest import seed_user, service_env
from tests.e2e.processes import Process, run_cli, start_service, wait_ready
from tests.e2e.test_notify_processes import Receiver, notify_env, receiver, wait_until_delivered
from tokensvc.crypto import generate_notify_secret

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
__all__ = ["receiver"]  # the fixture, shared with the notification tests

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
        subscription_id = int(created.stdout.split()[3])
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
            # the id the CLI learned: an event naming another subscription would be dropped unchecked
            "subscription_id": subscription_id,
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


PATH_SECRET = "e2e-path-secret-0123456789abcdef"


class TestForwardedEvents:
    async def test_an_upload_reaches_the_app_once_signed_whatever_strava_retries(
        self, pg_url: str, sandbox_process: Process, tmp_path: Path, http: httpx.AsyncClient, receiver: Receiver
    ) -> None:
        """The CLI subscribes at the secret path; the athlete uploads; the sandbox pushes the create event three
        times; the app's receiver gets exactly one `strava.activity.created` for the right user, verified with
        the `standardwebhooks` library; the bare path is 404."""
        secret = generate_notify_secret()
        env = notify_env(pg_url, sandbox_process, receiver, secret) | {
            "TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN": VERIFY_TOKEN,
            "TOKENSVC_STRAVA_WEBHOOK_PATH_SECRET": PATH_SECRET,
        }
        receiver.start()
        service = start_service("forwarding", tmp_path, env)
        try:
            await wait_ready(service)
            cli_env = service.env | {"TOKENSVC_PUBLIC_URL": service.url}
            created = await run_cli("strava-subscription", "create", env=cli_env)
            assert created.returncode == 0, created.stderr
            assert PATH_SECRET not in created.stdout
            bare = await http.post(f"{service.url}/v1/webhooks/strava", json={})
            assert bare.status_code == 404
            athlete = await seed_user(http, sandbox_process, service, "syncs", expires_in=20_000)
            uploaded = await http.post(
                f"{sandbox_process.url}/_control/athletes/{athlete['athlete_id']}/activities", params={"copies": 3}
            )
            assert uploaded.status_code == 200, uploaded.text
            delivered = await http.get(f"{sandbox_process.url}/_control/deliveries", params={"count": 3, "timeout": 10})
            assert [d["statuses"] for d in delivered.json()["deliveries"]] == [[200], [200], [200]]
            await wait_until_delivered(pg_url, 1)
        finally:
            service.stop()
        (delivery,) = receiver.deliveries
        payload = Webhook(secret).verify(delivery.body, delivery.headers)
        assert payload["type"] == "strava.activity.created"
        assert payload["data"]["user_id"] == "syncs"
        assert payload["data"]["athlete_id"] == athlete["athlete_id"]
        assert payload["data"]["object_id"] == uploaded.json()["id"]
        assert payload["data"]["aspect_type"] == "create"
        for token in (athlete["access_token"], athlete["refresh_token"]):
            assert token.encode() not in delivery.body
        assert PATH_SECRET not in service.log.read_text()
