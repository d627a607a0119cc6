"""The sandbox's push subscriptions: created only after the callback answers the challenge, one per app, and a
revocation (or a test's own event) POSTed to the callback as Strava would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET
from tokensvc.sandbox import SandboxState, create_sandbox_app

CREDENTIALS = {"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET}
CALLBACK = "http://callback.test/hook"


class Receiver:
    """A webhook callback: answers the challenge for `verify_token` and records every event (status `status`)."""

    def __init__(self, verify_token: str = "vt", status: int = 200) -> None:
        self.events: list[dict[str, Any]] = []
        self.status = status
        self.app = FastAPI()

        @self.app.get("/hook", response_model=None)
        async def check(
            challenge: str = Query(alias="hub.challenge"), token: str = Query(alias="hub.verify_token")
        ) -> Any:
            if token != verify_token:
                return JSONResponse({"detail": "forbidden"}, status_code=403)
            return {"hub.challenge": challenge}

        @self.app.post("/hook", response_model=None)
        async def event(request: Request) -> Any:
            self.events.append(await request.json())
            return JSONResponse({}, status_code=self.status)


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
def app(receiver: Receiver) -> FastAPI:
    return create_sandbox_app(push_transport=httpx.ASGITransport(app=receiver.app))


@pytest.fixture
def sandbox(app: FastAPI) -> SandboxState:
    state: SandboxState = app.state.sandbox
    return state


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox") as http:
        yield http


async def subscribe(client: httpx.AsyncClient, verify_token: str = "vt") -> httpx.Response:
    form = {**CREDENTIALS, "callback_url": CALLBACK, "verify_token": verify_token}
    return await client.post("/api/v3/push_subscriptions", data=form)


class TestSubscriptions:
    async def test_a_callback_that_answers_the_challenge_is_subscribed_and_listed(
        self, client: httpx.AsyncClient
    ) -> None:
        created = await subscribe(client)
        assert created.status_code == 201
        listed = (await client.get("/api/v3/push_subscriptions", params=CREDENTIALS)).json()
        assert [(s["id"], s["callback_url"]) for s in listed] == [(created.json()["id"], CALLBACK)]

    async def test_a_callback_that_refuses_the_verify_token_is_not_subscribed(self, client: httpx.AsyncClient) -> None:
        refused = await subscribe(client, verify_token="not-the-receivers")
        assert refused.status_code == 400
        assert refused.json()["errors"][0]["resource"] == "PushSubscription"
        assert (await client.get("/api/v3/push_subscriptions", params=CREDENTIALS)).json() == []

    async def test_one_subscription_per_app_and_deleting_frees_the_slot(self, client: httpx.AsyncClient) -> None:
        first = (await subscribe(client)).json()["id"]
        again = await subscribe(client)
        assert (again.status_code, again.json()["errors"][0]["code"]) == (400, "already exists")
        gone = await client.delete(f"/api/v3/push_subscriptions/{first + 1}", params=CREDENTIALS)
        assert gone.status_code == 404
        assert (await client.delete(f"/api/v3/push_subscriptions/{first}", params=CREDENTIALS)).status_code == 204
        assert (await subscribe(client)).status_code == 201

    async def test_wrong_app_credentials_are_refused(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/v3/push_subscriptions", params={**CREDENTIALS, "client_secret": "nope"})
        assert response.status_code == 401
        assert response.json()["errors"][0]["resource"] == "Application"


class TestPushes:
    async def test_a_revocation_sends_the_deauthorization_event(
        self, client: httpx.AsyncClient, sandbox: SandboxState, receiver: Receiver
    ) -> None:
        """Strava's shape: athlete/update with authorized "false" as a string, owner_id the athlete."""
        subscription_id = (await subscribe(client)).json()["id"]
        athlete = (await client.post("/_control/athletes", json={})).json()
        assert (await client.post(f"/_control/athletes/{athlete['athlete_id']}/revoke")).status_code == 200
        delivered = await client.get("/_control/deliveries", params={"count": 1, "timeout": 10})
        assert delivered.status_code == 200
        (event,) = receiver.events
        assert event | {"event_time": 0} == {
            "aspect_type": "update",
            "event_time": 0,
            "object_id": athlete["athlete_id"],
            "object_type": "athlete",
            "owner_id": athlete["athlete_id"],
            "subscription_id": subscription_id,
            "updates": {"authorized": "false"},
        }

    async def test_a_failing_callback_is_tried_three_times(self, client: httpx.AsyncClient, receiver: Receiver) -> None:
        await subscribe(client)
        receiver.status = 500
        sent = (await client.post("/_control/push", json={"object_type": "athlete"})).json()
        assert (sent["statuses"], sent["delivered"]) == ([500, 500, 500], False)
        assert len(receiver.events) == 3

    async def test_without_a_subscription_nothing_is_sent(self, client: httpx.AsyncClient, receiver: Receiver) -> None:
        athlete = (await client.post("/_control/athletes", json={})).json()
        await client.post(f"/_control/athletes/{athlete['athlete_id']}/revoke")
        assert (await client.post("/_control/push", json={})).status_code == 409
        assert (await client.get("/_control/deliveries")).json() == {"deliveries": []}
        assert receiver.events == []


class SlowFirstReceiver(Receiver):
    """A callback whose first POST never answers (Strava gives up after 2 s); later ones answer 200 at once."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = asyncio.Event()  # never set: the first request hangs until the sandbox's timeout

        @self.app.middleware("http")
        async def hang_first(request: Request, call_next: Any) -> Any:
            if request.method == "POST" and not self.events:
                self.events.append({"hung": True})
                await self.stuck.wait()
            return await call_next(request)


async def seeded(client: httpx.AsyncClient, scope: str) -> int:
    athlete_id: int = (await client.post("/_control/athletes", json={"scope": scope})).json()["athlete_id"]
    return athlete_id


class TestActivityEvents:
    async def test_an_upload_pushes_the_create_event(self, client: httpx.AsyncClient, receiver: Receiver) -> None:
        """Uploading through the control pushes Strava's activity create event (ids only, empty updates)."""
        subscription_id = (await subscribe(client)).json()["id"]
        athlete_id = await seeded(client, "read,activity:read")
        activity = (await client.post(f"/_control/athletes/{athlete_id}/activities", json={"name": "Lunch"})).json()
        assert (await client.get("/_control/deliveries", params={"count": 1, "timeout": 10})).status_code == 200
        (event,) = receiver.events
        assert event | {"event_time": 0} == {
            "aspect_type": "create",
            "event_time": 0,
            "object_id": activity["id"],
            "object_type": "activity",
            "owner_id": athlete_id,
            "subscription_id": subscription_id,
            "updates": {},
        }

    async def test_edits_and_deletions_push_update_and_delete(
        self, client: httpx.AsyncClient, receiver: Receiver
    ) -> None:
        """A control edit sends `updates` with title, type and private as Strava does; a deletion sends delete;
        the API's own PUT pushes an update too."""
        await subscribe(client)
        athlete_id = await seeded(client, "activity:read_all,activity:write")
        activity = (await client.post(f"/_control/athletes/{athlete_id}/activities", json={})).json()
        path = f"/_control/activities/{activity['id']}"
        changed = await client.patch(path, json={"name": "Renamed", "sport_type": "Ride", "private": True})
        assert (changed.json()["name"], changed.json()["private"]) == ("Renamed", True)
        token = (await client.get(f"/_control/athletes/{athlete_id}")).json()["access_token"]
        put = await client.put(
            f"/api/v3/activities/{activity['id']}",
            json={"name": "Via API"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert put.status_code == 200
        assert (await client.delete(path)).status_code == 200
        assert (await client.get(path)).status_code == 405  # the control has no GET; the activity is gone anyway
        await client.get("/_control/deliveries", params={"count": 4, "timeout": 10})
        assert [(e["aspect_type"], e["updates"]) for e in receiver.events] == [
            ("create", {}),
            ("update", {"title": "Renamed", "type": "Ride", "private": "true"}),
            ("update", {"title": "Via API"}),
            ("delete", {}),
        ]
        assert (await client.delete(path)).status_code == 404

    async def test_copies_force_duplicates(
        self, client: httpx.AsyncClient, sandbox: SandboxState, receiver: Receiver
    ) -> None:
        """`copies=3` delivers the same event three times, as Strava's duplicates arrive."""
        await subscribe(client)
        athlete_id = await seeded(client, "activity:read")
        await client.post(f"/_control/athletes/{athlete_id}/activities", params={"copies": 3}, json={})
        await client.get("/_control/deliveries", params={"count": 3, "timeout": 10})
        assert len(receiver.events) == 3
        assert receiver.events[0] == receiver.events[1] == receiver.events[2]
        assert [d.statuses for d in sandbox.push.deliveries] == [[200]] * 3
        sent = await client.post("/_control/push", params={"copies": 2}, json={"object_type": "athlete"})
        assert sent.json()["delivered"] is True
        assert len(receiver.events) == 5

    async def test_no_events_without_a_scope_that_could_read_the_activity(
        self, client: httpx.AsyncClient, sandbox: SandboxState, receiver: Receiver
    ) -> None:
        """Apps without an activity read scope get no activity events; `activity:read` gets none for private ones;
        a revoked athlete's uploads send nothing."""
        await subscribe(client)
        no_scope = await seeded(client, "read")
        public_only = await seeded(client, "activity:read")
        revoked = await seeded(client, "activity:read_all")
        await client.post(f"/_control/athletes/{no_scope}/activities", json={})
        await client.post(f"/_control/athletes/{public_only}/activities", json={"private": True})
        await client.post(f"/_control/athletes/{revoked}/revoke")
        await client.get("/_control/deliveries", params={"count": 1, "timeout": 10})  # the deauthorization
        await client.post(f"/_control/athletes/{revoked}/activities", json={})
        assert [e["object_type"] for e in receiver.events] == ["athlete"]
        assert len(sandbox.push.deliveries) == 1


class TestRetries:
    async def test_a_callback_slower_than_two_seconds_gets_the_event_again(self) -> None:
        """Strava waits 2 s for the 200; a callback that does not answer in time is tried again."""
        receiver = SlowFirstReceiver()
        app = create_sandbox_app(push_transport=httpx.ASGITransport(app=receiver.app))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox") as client:
            await subscribe(client)
            sent = (await client.post("/_control/push", json={"object_type": "athlete"})).json()
        assert (sent["statuses"], sent["delivered"]) == ([None, 200], True)
        assert len(receiver.events) == 2
