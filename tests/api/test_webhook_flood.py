"""A flood of 10,000 forged Strava events over HTTP (RELIABILITY.md: "a flood of forged webhook events"): forged
deauthorizations and padded activity events for real athletes, events for athletes nobody holds, events naming
another subscription. Every one is answered 200; Strava is asked a few times per athlete at most, and the
database grows by less than 1 MB (tables and indexes; Postgres measured with `pg_total_relation_size`, SQLite by
its pages after a checkpoint; WAL aside). SQLite and Postgres."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from tests.conftest import FakeClock, import_body, make_settings, seed_athlete
from tokensvc.config import Settings
from tokensvc.crypto import generate_notify_secret
from tokensvc.sandbox import SandboxState
from tokensvc.service.webhooks import StravaWebhooks

PATH = "/v1/webhooks/strava"
OURS = 1001
EVENTS = 10_000
ATHLETES = 3
CHUNK = 1_000  # the processor runs and the clock moves a minute after each chunk
CONCURRENCY = 50
MB = 1024 * 1024


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Every setting an attacker would meet configured; notifications on (so forwarded events are stored) but not
    delivered during the flood (their retries would be growth of another kind); the processor run by the test."""
    return make_settings(
        database_url,
        strava_webhook_verify_token=SecretStr("verify-me-please"),
        notify_url="http://app.test/tokensvc-events",
        notify_secret=SecretStr(generate_notify_secret()),
        notify_poll_seconds=300,
        webhook_poll_interval_seconds=0,
    )


def forged(n: int, athletes: list[int]) -> dict[str, Any]:
    """Event number `n`: a deauthorization or an activity event for a real athlete, either for an unknown
    athlete, or one naming another subscription; all different, many padded."""
    kind = n % 5
    athlete = athletes[n % len(athletes)] if kind in (0, 1, 4) else 9_000_000 + n
    body: dict[str, Any] = {
        "aspect_type": "update",
        "event_time": 1_800_000_000 + n,
        "object_id": athlete,
        "object_type": "athlete",
        "owner_id": athlete,
        "subscription_id": 77 if kind == 4 else OURS,
        "updates": {"authorized": "false", "padding": "x" * 8_000},
    }
    if kind in (1, 3):
        body |= {"object_type": "activity", "object_id": 10_000_000 + n, "aspect_type": "create"}
        body["updates"] = {"title": "t" * 255, "padding": "y" * 8_000}
    return body


async def database_bytes(http: httpx.AsyncClient) -> int:
    engine = http.app.state.engine  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            query = (
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'"
            )
            return int((await conn.execute(sa.text(query))).scalar_one())
        await conn.execute(sa.text("PRAGMA wal_checkpoint(TRUNCATE)"))
        pages = (await conn.execute(sa.text("PRAGMA page_count"))).scalar_one()
        size = (await conn.execute(sa.text("PRAGMA page_size"))).scalar_one()
        return int(pages) * int(size)


# 20,000 requests over ASGI: minutes on a loaded machine
pytestmark = [pytest.mark.slow, pytest.mark.dialects("sqlite", "postgres")]


class TestFlood:
    async def test_ten_thousand_forged_events_cost_a_few_checks_per_athlete_and_under_a_megabyte(
        self, client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """All 200; each real athlete checked at most twice in the flood's ten minutes (one check at a time,
        then the re-check delay); tokens kept; growth < 1 MB."""
        athletes = []
        for _ in range(ATHLETES):
            user = seed_athlete(sandbox, clock, expires_in=20_000)
            imported = await client.put(f"/v1/users/{user.user_id}/tokens", json=import_body(user).model_dump())
            assert imported.status_code == 200
            athletes.append(user.athlete_id)
        webhooks: StravaWebhooks = client.app.state.webhooks  # type: ignore[attr-defined]
        await webhooks.learn_subscription(OURS)
        before = await database_bytes(client)
        calls_before = sum(sandbox.calls.values())
        statuses: list[int] = []
        gate = asyncio.Semaphore(CONCURRENCY)

        async def send(n: int) -> None:
            async with gate:
                statuses.append((await client.post(PATH, json=forged(n, athletes))).status_code)

        for start in range(0, EVENTS, CHUNK):
            async with asyncio.TaskGroup() as group:
                for n in range(start, start + CHUNK):
                    group.create_task(send(n))
            await webhooks.process_once()
            clock.advance(60)
        assert statuses == [200] * EVENTS
        strava_calls = sum(sandbox.calls.values()) - calls_before
        assert strava_calls <= 2 * ATHLETES
        assert strava_calls >= ATHLETES  # the checks did happen: each forged deauthorization was looked into
        growth = await database_bytes(client) - before
        print(f"flood: {EVENTS} events, {strava_calls} Strava calls, database growth {growth / 1024:.0f} KiB")
        assert growth < MB
        for athlete in athletes:
            status = (await client.get(f"/v1/users/user-{athlete}/token-status")).json()
            assert status["status"] == "valid"
