"""Notifications across real processes: a `tokensvc serve` replica, the sandbox, and the application's receiver (a
real HTTP server in this test) that is down first. The notification arrives once, also across a SIGKILL."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import asyncpg_dsn
from tests.e2e.conftest import seed_user, service_env
from tests.e2e.processes import Process, free_port, start_service, wait_ready
from tokensvc.crypto import generate_notify_secret

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DEADLINE = 60.0


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """The application's webhook endpoint: started on demand on a port chosen before, answering 204 to all."""

    port: int
    deliveries: list[Delivery] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/tokensvc"

    def start(self) -> None:
        deliveries = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver(free_port())
    yield receiver
    receiver.stop()


def notify_env(database_url: str, sandbox: Process, receiver: Receiver, secret: str) -> dict[str, str]:
    """Short poll and backoff, so a receiver that comes up is served within about a second."""
    return service_env(
        database_url,
        sandbox,
        TOKENSVC_NOTIFY_URL=receiver.url,
        TOKENSVC_NOTIFY_SECRET=secret,
        TOKENSVC_NOTIFY_POLL_SECONDS="0.2",
        TOKENSVC_NOTIFY_BACKOFF_SECONDS="0.2",
        TOKENSVC_NOTIFY_BACKOFF_MAX_SECONDS="0.5",
        TOKENSVC_NOTIFY_TIMEOUT_SECONDS="2",
    )


async def outbox(database_url: str) -> tuple[int, int]:
    """(notifications, of which undelivered)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        row = await conn.fetchrow("SELECT count(*), count(*) FILTER (WHERE delivered_at IS NULL) FROM notifications")
    finally:
        await conn.close()
    assert row is not None
    return int(row[0]), int(row[1])


async def wait_until_delivered(database_url: str, count: int) -> None:
    """A bounded condition wait: `count` notifications, all marked delivered (after which none is sent again)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            if await outbox(database_url) == (count, 0):
                return
            await asyncio.sleep(0.1)


async def wait_for_log(process: Process, text: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while True:
            if text in process.log.read_text():
                return
            await asyncio.sleep(0.1)


async def cause_needs_reauth(http: httpx.AsyncClient, sandbox: Process, replica: Process, user_id: str) -> Any:
    """The athlete revokes access at Strava; the next refresh is rejected and the user needs to reconnect."""
    athlete = await seed_user(http, sandbox, replica, user_id, expires_in=60)
    await http.post(f"{sandbox.url}/_control/athletes/{athlete['athlete_id']}/revoke")
    response = await http.post(f"{replica.url}/v1/users/{user_id}/refresh")
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "reauth_required"
    return athlete


def check_delivery(delivery: Delivery, secret: str, user_id: str, athlete: Any) -> None:
    payload = Webhook(secret).verify(delivery.body, delivery.headers)
    assert payload["type"] == "token.needs_reauth"
    assert payload["data"]["user_id"] == user_id
    assert payload["data"]["reason"] == "refresh_token_invalid"
    assert payload["data"]["connect_url"].endswith("/v1/oauth/strava/authorize")
    for token in (athlete["access_token"], athlete["refresh_token"]):
        assert token.encode() not in delivery.body


class TestReceiverDownThenUp:
    async def test_the_notification_arrives_once_when_the_receiver_comes_up(
        self,
        empty_pg_url: str,
        sandbox_process: Process,
        receiver: Receiver,
        http: httpx.AsyncClient,
        tmp_path: Path,
    ) -> None:
        """Nothing listens at TOKENSVC_NOTIFY_URL: attempts fail and are retried; once it listens, one delivery."""
        secret = generate_notify_secret()
        replica = start_service("notifier", tmp_path, notify_env(empty_pg_url, sandbox_process, receiver, secret))
        try:
            await wait_ready(replica)
            athlete = await cause_needs_reauth(http, sandbox_process, replica, "down-then-up")
            await wait_for_log(replica, "notification.delivery_failed")  # the receiver really was down
            assert receiver.deliveries == []
            receiver.start()
            await wait_until_delivered(empty_pg_url, 1)
        finally:
            replica.stop()
        assert len(receiver.deliveries) == 1
        check_delivery(receiver.deliveries[0], secret, "down-then-up", athlete)
        log = replica.log.read_text()
        assert "notification.delivered" in log
        for token in (athlete["access_token"], athlete["refresh_token"], secret):
            assert token not in log


class TestCrashBeforeDelivery:
    async def test_a_notification_committed_before_a_sigkill_is_delivered_once_after_the_restart(
        self,
        empty_pg_url: str,
        sandbox_process: Process,
        receiver: Receiver,
        http: httpx.AsyncClient,
        tmp_path: Path,
    ) -> None:
        """The change commits, the receiver is down, the replica is killed; the next replica delivers it once."""
        secret = generate_notify_secret()
        env = notify_env(empty_pg_url, sandbox_process, receiver, secret)
        first = start_service("before-crash", tmp_path, env)
        try:
            await wait_ready(first)
            athlete = await cause_needs_reauth(http, sandbox_process, first, "crash")
            assert await outbox(empty_pg_url) == (1, 1)  # committed with the change, not delivered
        finally:
            first.popen.kill()  # SIGKILL: no graceful stop, no chance to deliver
            first.stop()
        receiver.start()
        second = start_service("after-crash", tmp_path, env)
        try:
            await wait_ready(second)
            await wait_until_delivered(empty_pg_url, 1)
        finally:
            second.stop()
        assert len(receiver.deliveries) == 1
        check_delivery(receiver.deliveries[0], secret, "crash", athlete)
