"""Forwarded Strava events: every activity or athlete event for a connected athlete is put in the notification
outbox before the 200, one row per event and user however often Strava retries it, with only Strava's documented
`updates`, and capped per athlete and hour. SQLite and Postgres."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from tests.conftest import FakeClock, make_settings, seed_user
from tokensvc.app import Resources
from tokensvc.config import Settings
from tokensvc.crypto import generate_notify_secret
from tokensvc.sandbox import SandboxState
from tokensvc.schemas import StravaEvent

pytestmark = pytest.mark.dialects("sqlite", "postgres")

SUBSCRIPTION_ID = 1001
EVENT_TIME = 1_800_000_000
CAP = 5


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(
        database_url,
        notify_url="http://app.test/tokensvc-events",
        notify_secret=SecretStr(generate_notify_secret()),
        webhook_poll_interval_seconds=0,
        webhook_forward_per_athlete_hour=CAP,
    )


def activity(athlete_id: int, *, object_id: int = 555, aspect: str = "create", **changes: Any) -> StravaEvent:
    body: dict[str, Any] = {
        "aspect_type": aspect,
        "event_time": EVENT_TIME,
        "object_id": object_id,
        "object_type": "activity",
        "owner_id": athlete_id,
        "subscription_id": SUBSCRIPTION_ID,
        "updates": {},
    }
    return StravaEvent.model_validate(body | changes)


async def outbox(res: Resources) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, type, payload) of every notification, oldest first."""
    async with res.engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT id, event_type, payload FROM notifications ORDER BY created_at, id"))
        return [(r[0], r[1], json.loads(r[2])) for r in rows]


class TestForwarded:
    async def test_an_upload_is_one_notification_for_its_user_whatever_strava_retries(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Three deliveries of one create: stored at the first (before the 200), the same row after; the payload
        is the contract's, and no Strava call is made."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        received = [await resources.webhooks.receive(activity(user.athlete_id)) for _ in range(3)]
        assert received == [True, False, False]
        ((message_id, event_type, payload),) = await outbox(resources)
        assert message_id.startswith("msg_")
        assert event_type == "strava.activity.created"
        assert payload["type"] == "strava.activity.created"
        assert payload["data"] == {
            "user_id": user.user_id,
            "athlete_id": user.athlete_id,
            "object_type": "activity",
            "object_id": 555,
            "aspect_type": "create",
            "updates": {},
            "event_time": EVENT_TIME,
            "subscription_id": SUBSCRIPTION_ID,
        }
        assert sum(sandbox.calls.values()) == 0

    @pytest.mark.parametrize(
        ("aspect", "object_type", "expected"),
        [
            ("update", "activity", "strava.activity.updated"),
            ("delete", "activity", "strava.activity.deleted"),
            ("update", "athlete", "strava.athlete.updated"),
        ],
    )
    async def test_each_kind_has_its_type(
        self,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        aspect: str,
        object_type: str,
        expected: str,
    ) -> None:
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        event = activity(user.athlete_id, aspect=aspect, object_type=object_type, updates={"title": "Lunch"})
        assert await resources.webhooks.receive(event) is True
        assert [(t, p["data"]["updates"]) for _, t, p in await outbox(resources)] == [(expected, {"title": "Lunch"})]

    async def test_only_documented_updates_are_kept_and_bounded(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Padding, unknown keys, nested values, a lone surrogate and an over-long title are left out."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        updates = {
            "title": "x" * 256,
            "type": "Ride",
            "private": True,
            "authorized": "\ud800",
            "padding": "p" * 50_000,
            "nested": {"a": [1, 2, 3]},
        }
        assert await resources.webhooks.receive(activity(user.athlete_id, aspect="update", updates=updates))
        ((_, _, payload),) = await outbox(resources)
        assert payload["data"]["updates"] == {"type": "Ride", "private": True}
        async with resources.engine.connect() as conn:
            length = (await conn.execute(sa.text("SELECT length(payload) FROM notifications"))).scalar_one()
        assert length < 600

    async def test_events_for_an_athlete_nobody_holds_are_dropped(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        await seed_user(resources, sandbox, clock, expires_in=20_000)
        assert await resources.webhooks.receive(activity(424_242)) is False
        assert await outbox(resources) == []

    async def test_without_a_notify_url_nothing_is_stored(
        self, database_url: str, sandbox: SandboxState, clock: FakeClock, strava_transport: Any
    ) -> None:
        """No TOKENSVC_NOTIFY_URL: nowhere to deliver, so the event is acknowledged and dropped."""
        from tokensvc.app import open_resources

        settings = make_settings(database_url, webhook_poll_interval_seconds=0)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
            user = await seed_user(res, sandbox, clock, expires_in=20_000)
            assert await res.webhooks.receive(activity(user.athlete_id)) is False
            assert await outbox(res) == []


class TestCap:
    async def test_a_burst_beyond_the_cap_is_dropped_until_the_hour_turns(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """CAP distinct events are stored, the next ones dropped (retries of a stored one stay duplicates); the
        next clock hour stores again; another athlete has a cap of its own."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        other = await seed_user(resources, sandbox, clock, expires_in=20_000)
        stored = [await resources.webhooks.receive(activity(user.athlete_id, object_id=i)) for i in range(CAP + 3)]
        assert stored == [True] * CAP + [False] * 3
        assert await resources.webhooks.receive(activity(other.athlete_id)) is True
        assert len(await outbox(resources)) == CAP + 1
        clock.advance(3600)
        assert await resources.webhooks.receive(activity(user.athlete_id, object_id=99)) is True
        assert len(await outbox(resources)) == CAP + 2
