"""Strava's push subscriptions: one per application, checked with a challenge at creation, and events POSTed to
its callback (an athlete revoking access sends a deauthorization, an upload, edit or deletion an activity event),
each tried up to three times until the callback answers 200 within two seconds, as Strava does.

Deliveries made on the sandbox's own initiative (a revocation) run in the background, as Strava's do, so a client
that revokes while holding a database lock is never made to wait for its own webhook; tests wait for them with
`wait_delivered` (an event, not polling). Deliveries a test asks for (`/_control/push`) are awaited in the request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import httpx

from . import errors

logger = logging.getLogger(__name__)

CALLBACK_TIMEOUT: Final = 2.0  # Strava gives the callback two seconds to answer
DELIVERY_ATTEMPTS: Final = 3  # and tries an event at most three times
FIRST_SUBSCRIPTION_ID: Final = 1001


@dataclass
class Subscription:
    id: int
    application_id: str
    callback_url: str
    verify_token: str
    created_at: int

    def as_json(self, iso: Callable[[int], str]) -> dict[str, Any]:
        return {
            "id": self.id,
            "resource_state": 2,
            "application_id": self.application_id,
            "callback_url": self.callback_url,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.created_at),
        }


@dataclass
class Delivery:
    """One event sent to the callback: the status of each attempt (None for a connection failure)."""

    event: dict[str, Any]
    statuses: list[int | None] = field(default_factory=list)

    @property
    def delivered(self) -> bool:
        return bool(self.statuses) and self.statuses[-1] == 200

    def as_json(self) -> dict[str, Any]:
        return {"event": self.event, "statuses": self.statuses, "delivered": self.delivered}


def subscription_error(status: int, field_name: str, code: str) -> errors.StravaError:
    message = "Resource Not Found" if status == 404 else "Bad Request"
    return errors.StravaError(status, message, "PushSubscription", field_name, code)


class Push:
    """The subscription and its deliveries. `transport` (tests) replaces the network for callback requests."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.transport = transport
        self.subscription: Subscription | None = None
        self.deliveries: list[Delivery] = []
        self._next_id = FIRST_SUBSCRIPTION_ID
        self._tasks: set[asyncio.Task[Delivery]] = set()
        self._changed = asyncio.Event()

    def reset(self) -> None:
        self.subscription = None
        self.deliveries = []
        self._signal()

    def dump(self) -> dict[str, Any]:
        """The subscription (and the next id), for a restart; deliveries are not kept."""
        return {"next_id": self._next_id, "subscription": asdict(self.subscription) if self.subscription else None}

    def load(self, data: dict[str, Any]) -> None:
        self._next_id = int(data["next_id"])
        self.subscription = Subscription(**data["subscription"]) if data["subscription"] else None

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport, timeout=CALLBACK_TIMEOUT, headers={"User-Agent": "sandbox"})

    async def subscribe(self, *, application_id: str, callback_url: str, verify_token: str, now: int) -> Subscription:
        """Check the callback with a challenge as Strava does (200 echoing it within 2 s), then subscribe.

        Raises StravaError when a subscription exists or the callback does not verify.
        """
        if self.subscription is not None:
            raise subscription_error(400, "", "already exists")
        if not callback_url.startswith(("http://", "https://")):
            raise subscription_error(400, "callback url", "invalid")
        challenge = secrets.token_urlsafe(16)
        query = {"hub.mode": "subscribe", "hub.challenge": challenge, "hub.verify_token": verify_token}
        try:
            async with self._client() as http:
                response = await http.get(callback_url, params=query)
            echoed = response.json().get("hub.challenge") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            echoed = None
        if echoed != challenge:
            raise subscription_error(400, "callback url", "GET to callback URL does not return 200")
        self.subscription = Subscription(self._next_id, application_id, callback_url, verify_token, now)
        self._next_id += 1
        logger.info("push subscription %d created", self.subscription.id)
        return self.subscription

    def unsubscribe(self, subscription_id: int) -> None:
        if self.subscription is None or self.subscription.id != subscription_id:
            raise subscription_error(404, "id", "not found")
        self.subscription = None

    def deauthorization(self, athlete_id: int, now: int) -> dict[str, Any] | None:
        """The event Strava sends when an athlete revokes access; None without a subscription."""
        if self.subscription is None:
            return None
        return {
            "aspect_type": "update",
            "event_time": now,
            "object_id": athlete_id,
            "object_type": "athlete",
            "owner_id": athlete_id,
            "subscription_id": self.subscription.id,
            "updates": {"authorized": "false"},
        }

    def activity_event(
        self, activity_id: int, athlete_id: int, aspect: str, updates: dict[str, str], now: int
    ) -> dict[str, Any] | None:
        """An activity's create/update/delete event (ids only, as Strava sends); None without a subscription."""
        if self.subscription is None:
            return None
        return {
            "aspect_type": aspect,
            "event_time": now,
            "object_id": activity_id,
            "object_type": "activity",
            "owner_id": athlete_id,
            "subscription_id": self.subscription.id,
            "updates": updates,
        }

    def send_in_background(self, event: dict[str, Any], *, copies: int = 1) -> None:
        """Deliver `event` `copies` times (Strava's duplicates), each retried on its own, without waiting."""
        for _ in range(copies):
            task = asyncio.get_running_loop().create_task(self.send(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def send(self, event: dict[str, Any]) -> Delivery:
        """POST `event` to the callback until it answers 200, at most three times."""
        delivery = Delivery(event)
        url = self.subscription.callback_url if self.subscription is not None else None
        if url is not None:
            async with self._client() as http:
                for _ in range(DELIVERY_ATTEMPTS):
                    try:
                        # The whole answer within two seconds, as Strava counts it (httpx's own timeouts are per
                        # phase, and an in-process transport has none).
                        async with asyncio.timeout(CALLBACK_TIMEOUT):
                            status: int | None = (await http.post(url, json=event)).status_code
                    except (httpx.HTTPError, TimeoutError):
                        status = None
                    delivery.statuses.append(status)
                    if status == 200:
                        break
        self.deliveries.append(delivery)
        self._signal()
        return delivery

    async def wait_delivered(self, count: int) -> None:
        """Return once `count` deliveries have finished (callers bound it with `asyncio.timeout`)."""
        while len(self.deliveries) < count:
            changed = self._changed
            await changed.wait()

    def _signal(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
