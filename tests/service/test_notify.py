"""Notifications: one per change of state, written with the change, delivered signed and retried until a 2xx."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from pydantic import SecretStr
from standardwebhooks import Webhook

from tests.conftest import FakeClock, Seeded, import_body, make_settings, seed_athlete, seed_user
from tokensvc.app import Resources, notification_deliverer, open_resources
from tokensvc.backoff import backoff_seconds
from tokensvc.config import Settings
from tokensvc.crypto import generate_notify_secret
from tokensvc.db import make_engine
from tokensvc.errors import ReauthRequired
from tokensvc.models import notifications, token_events
from tokensvc.sandbox import SandboxState
from tokensvc.service.journal import Journal
from tokensvc.service.notify import NotificationDeliverer
from tokensvc.store.stats import notifications_pending

pytestmark = pytest.mark.dialects("sqlite", "postgres")

SECRET = generate_notify_secret()
RECEIVER_URL = "http://receiver.test/hooks/tokensvc"
CONNECT_URL = "http://tokensvc.test/v1/oauth/strava/authorize"


@pytest.fixture
def clock() -> FakeClock:
    """Near the real time: receivers (and `Webhook.verify`) refuse a `webhook-timestamp` more than 5 minutes off."""
    return FakeClock(float(int(time.time())))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, notify_url=RECEIVER_URL, notify_secret=SecretStr(SECRET))


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    def verified(self) -> Any:
        """The payload, once its Standard Webhooks signature checked out (raises otherwise)."""
        return Webhook(SECRET).verify(self.body, self.headers)


Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


@dataclass
class Receiver:
    """The application's webhook endpoint at its HTTP boundary: records every request, answers `statuses` in turn
    (then 200)."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.received.append(Received(dict(request.headers), request.content))
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200)

    def transport(self, handler: Handler | None = None) -> httpx.MockTransport:
        return httpx.MockTransport(handler or self.handle)


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
async def deliverer(
    settings: Settings, resources: Resources, clock: FakeClock, receiver: Receiver
) -> AsyncIterator[NotificationDeliverer]:
    notifier = notification_deliverer(settings, resources.engine, clock=clock, transport=receiver.transport())
    assert notifier is not None
    yield notifier
    await notifier.stop()


async def outbox_rows(res: Resources) -> list[dict[str, Any]]:
    async with res.engine.connect() as conn:
        rows = (await conn.execute(sa.select(notifications).order_by(notifications.c.created_at))).all()
    return [dict(row._mapping) for row in rows]


async def recorded_text(res: Resources) -> str:
    """Every outbox and audit row, as text: what a database dump would show of them."""
    async with res.engine.connect() as conn:
        rows = [*(await conn.execute(sa.select(notifications))).all(), *(await conn.execute(sa.select(token_events)))]
    return "\n".join(repr(tuple(row)) for row in rows)


def assert_no_token(text: str, *users: Seeded) -> None:
    for user in users:
        assert user.access_token not in text
        assert user.refresh_token not in text


async def make_needs_reauth(res: Resources, sandbox: SandboxState, clock: FakeClock) -> Seeded:
    """A user whose refresh token Strava rejects, hit by many callers at once and by more attempts after."""
    user = await seed_user(res, sandbox, clock, expires_in=60)
    sandbox.revoke(user.athlete_id)
    callers: list[Coroutine[Any, Any, object]] = [res.service.refresh(user.user_id) for _ in range(10)]
    callers += [res.service.access_token(user.user_id, min_ttl=3600) for _ in range(10)]
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, ReauthRequired) for r in results), results
    for _ in range(3):
        with pytest.raises(ReauthRequired):
            await res.service.refresh(user.user_id, force=True)
    return user


class TestOnePerChangeOfState:
    async def test_a_rejected_refresh_token_is_one_signed_needs_reauth_however_many_callers_hit_it(
        self,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
    ) -> None:
        """Twenty concurrent callers and three more attempts: one `token.needs_reauth`, with reason and connect URL,
        whose signature verifies; no token in it or in any recorded row."""
        user = await make_needs_reauth(resources, sandbox, clock)
        rows = await outbox_rows(resources)
        assert [r["event_type"] for r in rows] == ["token.needs_reauth"]

        report = await deliverer.deliver_due()

        assert (report.delivered, report.failed) == (1, 0)
        assert len(receiver.received) == 1
        sent = receiver.received[0]
        assert sent.headers["content-type"] == "application/json"
        assert sent.headers["webhook-id"] == rows[0]["id"]
        assert sent.body == rows[0]["payload"].encode()
        payload = sent.verified()
        assert payload["type"] == "token.needs_reauth"
        assert payload["data"] == {
            "user_id": user.user_id,
            "status": "needs_reauth",
            "reason": "refresh_token_invalid",
            "athlete_id": user.athlete_id,
            "connect_url": CONNECT_URL,
        }
        assert_no_token(sent.body.decode() + json.dumps(sent.headers) + await recorded_text(resources), user)

    async def test_a_needs_reauth_user_who_gets_tokens_again_has_recovered(
        self,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
    ) -> None:
        """Importing a new pair for a `needs_reauth` user is one `token.recovered`; importing again is none."""
        user = await make_needs_reauth(resources, sandbox, clock)
        fresh = seed_athlete(sandbox, clock, expires_in=21600)
        renewed = Seeded(user.user_id, fresh.athlete_id, fresh.access_token, fresh.refresh_token, fresh.expires_at)
        await resources.service.import_tokens(user.user_id, import_body(renewed))
        await resources.service.import_tokens(user.user_id, import_body(renewed))

        await deliverer.deliver_due()

        # Concurrent POSTs may arrive in any order; receivers order by the payload's `timestamp`.
        payloads = {r.verified()["type"]: r.verified()["data"] for r in receiver.received}
        assert sorted(payloads) == ["token.needs_reauth", "token.recovered"]
        assert len(receiver.received) == 2
        recovered = payloads["token.recovered"]
        assert recovered == {
            "user_id": user.user_id,
            "status": "valid",
            "previous_reason": "refresh_token_invalid",
            "via": "imported",
        }
        assert_no_token(b"".join(r.body for r in receiver.received).decode(), user, renewed)
        assert_no_token(await recorded_text(resources), user, renewed)

    async def test_deleting_a_users_tokens_is_one_revoked(
        self,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
    ) -> None:
        """DELETE deauthorizes at Strava and deletes: one `token.revoked`; a second DELETE (a no-op) sends none."""
        user = await seed_user(resources, sandbox, clock, expires_in=21600)
        await resources.service.refresh(user.user_id, force=True)  # a refresh is no change of state
        await resources.service.delete(user.user_id)
        await resources.service.delete(user.user_id)

        await deliverer.deliver_due()

        assert [r.verified()["data"] for r in receiver.received] == [
            {
                "user_id": user.user_id,
                "status": "missing",
                "reason": "deleted",
                "athlete_id": user.athlete_id,
                "connect_url": CONNECT_URL,
            }
        ]
        assert receiver.received[0].verified()["type"] == "token.revoked"
        issued = Seeded(user.user_id, user.athlete_id, *_latest_pair(sandbox, user.athlete_id))
        assert_no_token(receiver.received[0].body.decode() + await recorded_text(resources), user, issued)


def _latest_pair(sandbox: SandboxState, athlete_id: int) -> tuple[str, str, int]:
    snapshot = sandbox.snapshot(athlete_id)
    return snapshot["access_token"], snapshot["refresh_token"], snapshot["expires_at"]


class TestWithoutNotifyUrl:
    async def test_changes_are_audited_but_nothing_is_enqueued(
        self, database_url: str, sandbox: SandboxState, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """No TOKENSVC_NOTIFY_URL: the needs_reauth and the revocation are in the audit trail, the outbox is empty."""
        settings = make_settings(database_url)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
            assert notification_deliverer(settings, res.engine, clock=clock) is None
            user = await make_needs_reauth(res, sandbox, clock)
            await res.service.delete(user.user_id)
            async with res.engine.connect() as conn:
                kinds = list((await conn.execute(sa.select(token_events.c.kind))).scalars())
            assert {"needs_reauth", "revoked"} <= set(kinds)
            assert await outbox_rows(res) == []


class TestRetries:
    async def test_a_receiver_answering_500_gets_it_again_later_with_the_same_id_and_takes_it_once(
        self,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
    ) -> None:
        """500, then (after the backoff, not before) 200: two attempts, one webhook-id, delivered once."""
        receiver.statuses = [500]
        counted = {result: _notifications_counted(result) for result in ("delivered", "failed")}
        user = await seed_user(resources, sandbox, clock, expires_in=21600)
        await resources.service.delete(user.user_id)

        first = await deliverer.deliver_due()
        [row] = await outbox_rows(resources)
        assert (first.delivered, first.failed) == (0, 1)
        assert (row["attempts"], row["last_error"], row["delivered_at"]) == (1, "HTTP 500", None)
        assert clock() < row["next_attempt_at"] <= clock() + deliverer.backoff_seconds + 1

        early = await deliverer.deliver_due()  # not due yet: the backoff holds
        assert (early.delivered, early.failed, len(receiver.received)) == (0, 0, 1)

        clock.advance(deliverer.backoff_seconds + 1)
        second = await deliverer.deliver_due()
        assert (second.delivered, second.failed) == (1, 0)
        clock.advance(deliverer.backoff_max_seconds + 1)
        assert (await deliverer.deliver_due()).delivered == 0  # delivered rows are never sent again

        assert [r.headers["webhook-id"] for r in receiver.received] == [row["id"], row["id"]]
        assert all(r.verified()["type"] == "token.revoked" for r in receiver.received)
        [row] = await outbox_rows(resources)
        assert row["attempts"] == 2
        assert row["delivered_at"] is not None
        assert row["last_error"] is None
        async with resources.engine.connect() as conn:
            assert await notifications_pending(conn) == 0
        assert {r: _notifications_counted(r) - n for r, n in counted.items()} == {"delivered": 1, "failed": 1}

    async def test_a_receiver_that_is_down_is_retried_and_the_error_names_no_body(
        self, settings: Settings, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Connection refused: the attempt is recorded by exception class; the row stays pending for later."""

        async def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        notifier = notification_deliverer(
            settings, resources.engine, clock=clock, transport=httpx.MockTransport(refuse)
        )
        assert notifier is not None
        try:
            user = await seed_user(resources, sandbox, clock, expires_in=21600)
            await resources.service.delete(user.user_id)
            report = await notifier.deliver_due()
        finally:
            await notifier.stop()
        [row] = await outbox_rows(resources)
        assert (report.failed, row["attempts"], row["last_error"], row["delivered_at"]) == (1, 1, "ConnectError", None)
        async with resources.engine.connect() as conn:
            assert await notifications_pending(conn) == 1


def _notifications_counted(result: str) -> float:
    labels = {"event_type": "token.revoked", "result": result}
    return REGISTRY.get_sample_value("tokensvc_notifications_total", labels) or 0.0


class TestBackoff:
    def test_delays_double_from_the_first_up_to_the_cap_with_jitter(self) -> None:
        """Attempt n waits 50 to 100% of min(cap, first x 2^(n-1))."""
        for attempt, ceiling in [(1, 5), (2, 10), (3, 20), (10, 2560), (11, 3600), (500, 3600)]:
            delays = [backoff_seconds(attempt, first=5, cap=3600) for _ in range(50)]
            assert all(ceiling / 2 <= d <= ceiling for d in delays)


class TestBackgroundLoop:
    async def test_started_it_delivers_what_is_due_and_stopping_lets_the_attempt_in_flight_finish(
        self, settings: Settings, resources: Resources, sandbox: SandboxState, clock: FakeClock, receiver: Receiver
    ) -> None:
        """A wake starts a pass; `stop` waits for the POST in flight and records it; later rows wait for a start."""
        arrived = asyncio.Event()
        answer = asyncio.Event()

        async def slow(request: httpx.Request) -> httpx.Response:
            arrived.set()
            await answer.wait()
            return await receiver.handle(request)

        notifier = notification_deliverer(settings, resources.engine, clock=clock, transport=receiver.transport(slow))
        assert notifier is not None
        first = await seed_user(resources, sandbox, clock, expires_in=21600)
        await resources.service.delete(first.user_id)
        notifier.start()
        notifier.wake()
        async with asyncio.timeout(10):
            await arrived.wait()
        stopping = asyncio.create_task(notifier.stop())
        second = await seed_user(resources, sandbox, clock, expires_in=21600)
        await resources.service.delete(second.user_id)
        answer.set()
        async with asyncio.timeout(10):
            await stopping

        assert [r.verified()["data"]["user_id"] for r in receiver.received] == [first.user_id]
        rows = {r["user_id"]: r for r in await outbox_rows(resources)}
        assert rows[first.user_id]["delivered_at"] is not None
        assert rows[second.user_id]["delivered_at"] is None


@pytest.mark.postgres
class TestTwoReplicas:
    async def test_two_deliverers_on_one_postgres_never_send_a_row_twice(self, pg_url: str, clock: FakeClock) -> None:
        """Two deliverers (own engines, like two replicas) drain 40 rows at the same time: each row sent once."""
        settings = make_settings(pg_url, notify_url=RECEIVER_URL, notify_secret=SecretStr(SECRET))
        receiver = Receiver()
        busy: set[str] = set()
        both_busy = asyncio.Event()

        def handler(name: str) -> Handler:
            async def handle(request: httpx.Request) -> httpx.Response:
                busy.add(name)
                if len(busy) == 2:
                    both_busy.set()
                async with asyncio.timeout(10):  # each replica's first batch waits until the other one is sending
                    await both_busy.wait()
                return await receiver.handle(request)

            return handle

        engines = [make_engine(pg_url), make_engine(pg_url)]
        journal = Journal(clock=clock, notify=True, connect_url=CONNECT_URL)
        async with engines[0].begin() as conn:
            for i in range(40):
                await journal.needs_reauth(conn, f"user-{i}", athlete_id=i, reason="deauthorized")
        deliverers = [
            notification_deliverer(settings, engine, clock=clock, transport=receiver.transport(handler(name)))
            for engine, name in zip(engines, ["a", "b"], strict=True)
        ]
        try:
            reports = await asyncio.gather(*(d.deliver_due() for d in deliverers if d is not None))
        finally:
            for d in deliverers:
                if d is not None:
                    await d.stop()
            for engine in engines:
                await engine.dispose()

        ids = [r.headers["webhook-id"] for r in receiver.received]
        assert len(ids) == 40
        assert len(set(ids)) == 40
        assert all(report.delivered > 0 for report in reports)
        assert sum(report.delivered for report in reports) == 40
