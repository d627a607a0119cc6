"""The sandbox's push subscriptions: created only after the callback answers the challenge, one per app, and a
revocation (or a test's own event) POSTed to the callback as Strava would."""

from __future__ import annotations

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
