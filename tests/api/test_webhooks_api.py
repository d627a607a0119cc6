"""`/v1/webhooks/strava` over HTTP (ASGI): the subscription check, events stored before the 200, bad input as
4xx problems, and a subscription made through the sandbox whose push ends in a deauthorized user."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from pydantic import SecretStr

from tests.conftest import API_KEY, STRAVA_TEST_BASE, FakeClock, Seeded, import_body, make_settings, seed_athlete
from tokensvc.app import create_app
from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Settings
from tokensvc.providers.strava import StravaClient
from tokensvc.sandbox import SandboxState
from tokensvc.store import webhook_events

VERIFY_TOKEN = "verify-me-please"
PATH = "/v1/webhooks/strava"


@pytest.fixture
def settings(database_url: str) -> Settings:
    """The processor's loop off: what the endpoint stored is what the test reads."""
    return make_settings(
        database_url, strava_webhook_verify_token=SecretStr(VERIFY_TOKEN), webhook_poll_interval_seconds=0
    )


def event(athlete_id: int, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "aspect_type": "update",
        "event_time": 1_800_000_000,
        "object_id": athlete_id,
        "object_type": "athlete",
        "owner_id": athlete_id,
        "subscription_id": 1001,
        "updates": {"authorized": "false"},
    }
    return body | changes


async def stored_events(client: httpx.AsyncClient) -> list[webhook_events.StoredWebhookEvent]:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        return await webhook_events.list_recent(conn, limit=100)


def challenge(token: str | None = VERIFY_TOKEN, **extra: str) -> dict[str, str]:
    params = {"hub.mode": "subscribe", "hub.challenge": "15f7d1a91c1f40f8a748fd134752feb3"} | extra
    if token is not None:
        params["hub.verify_token"] = token
    return params


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code


class TestSubscriptionCheck:
    async def test_our_verify_token_gets_the_challenge_back(self, client: httpx.AsyncClient) -> None:
        """200 with `{"hub.challenge": X}` and nothing else; no API key needed."""
        response = await client.get(PATH, params=challenge(), headers={"Authorization": ""})
        assert response.status_code == 200
        assert response.json() == {"hub.challenge": "15f7d1a91c1f40f8a748fd134752feb3"}

    @pytest.mark.parametrize("token", ["wrong", "", VERIFY_TOKEN + "x", VERIFY_TOKEN.upper()])
    async def test_any_other_verify_token_is_forbidden(self, client: httpx.AsyncClient, token: str) -> None:
        """403 `forbidden`, and the challenge is not echoed."""
        response = await client.get(PATH, params=challenge(token))
        assert_problem(response, 403, "forbidden")
        assert "15f7d1a9" not in response.text

    @pytest.mark.parametrize(
        "params",
        [
            challenge(None),
            {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
            challenge(**{"hub.mode": "unsubscribe"}),
            {},
        ],
    )
    async def test_missing_or_odd_parameters_are_422(self, client: httpx.AsyncClient, params: dict[str, str]) -> None:
        """A check without its parameters is a validation error, not a 500 and not a 200."""
        assert_problem(await client.get(PATH, params=params), 422, "validation_error")

    async def test_without_a_configured_verify_token_every_check_is_forbidden(
        self, database_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """No TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN: nobody can subscribe this service, whatever they send."""
        app = create_app(make_settings(database_url), clock=clock, strava_transport=strava_transport)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tokensvc.test") as http:
                for token in ("", "None", VERIFY_TOKEN):
                    assert_problem(await http.get(PATH, params=challenge(token)), 403, "forbidden")


@pytest.fixture
async def athlete(client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock) -> int:
    """A connected athlete (events for athletes nobody holds are dropped before anything is stored)."""
    user = seed_athlete(sandbox, clock, expires_in=20_000)
    imported = await client.put(f"/v1/users/{user.user_id}/tokens", json=import_body(user).model_dump())
    assert imported.status_code == 200
    return user.athlete_id


class TestEvents:
    @pytest.mark.dialects("sqlite", "postgres")
    async def test_a_deauthorization_is_stored_before_the_200(self, client: httpx.AsyncClient, athlete: int) -> None:
        """The 200 comes after the commit: the athlete's pending check is there the moment the answer is, and it
        keeps nothing of the body but the ids and times."""
        padded = event(athlete, updates={"authorized": "false", "padding": "x" * 60_000})
        response = await client.post(PATH, json=padded, headers={"Authorization": ""})
        assert response.status_code == 200
        assert response.json() == {"received": True}
        (stored,) = await stored_events(client)
        assert (stored.owner_id, stored.state, stored.dedupe_key) == (athlete, "pending", f"deauth:{athlete}")
        engine = client.app.state.engine  # type: ignore[attr-defined]
        async with engine.connect() as conn:
            payload = (await conn.execute(sa.text("SELECT payload FROM strava_webhook_events"))).scalar_one()
        assert payload == ""

    @pytest.mark.dialects("sqlite", "postgres")
    async def test_repeats_and_replays_are_acknowledged_and_coalesced(
        self, client: httpx.AsyncClient, athlete: int
    ) -> None:
        """Strava's retries, and events with other times and other contents for the athlete, all get 200: one
        pending check."""
        bodies = [event(athlete)] * 3 + [event(athlete, event_time=t, object_id=t) for t in range(1, 50)]
        responses = [await client.post(PATH, json=body) for body in bodies]
        assert {r.status_code for r in responses} == {200}
        assert len(await stored_events(client)) == 1

    async def test_an_event_for_an_athlete_nobody_holds_stores_nothing(self, client: httpx.AsyncClient) -> None:
        """Athlete ids are public: an event for one no user holds is counted and dropped."""
        response = await client.post(PATH, json=event(4242))
        assert response.status_code == 200
        assert await stored_events(client) == []

    async def test_once_our_subscription_is_known_events_naming_another_are_dropped(
        self, client: httpx.AsyncClient, athlete: int
    ) -> None:
        """The service learned its subscription id (1001): an event naming 7 stores nothing; 1001 does."""
        await client.app.state.webhooks.learn_subscription(1001)  # type: ignore[attr-defined]
        assert (await client.post(PATH, json=event(athlete, subscription_id=7))).status_code == 200
        assert await stored_events(client) == []
        assert (await client.post(PATH, json=event(athlete, subscription_id=1001))).status_code == 200
        assert len(await stored_events(client)) == 1

    @pytest.mark.parametrize(
        "body",
        [
            event(4242, object_type="activity", aspect_type="create", updates={}),
            event(4242, updates={"authorized": "true"}),
            event(4242, object_type="club"),
        ],
    )
    async def test_other_events_are_acknowledged_and_ignored(
        self, client: httpx.AsyncClient, body: dict[str, Any]
    ) -> None:
        response = await client.post(PATH, json=body)
        assert response.status_code == 200
        assert await stored_events(client) == []

    @pytest.mark.parametrize(
        "content",
        [
            b"not json",
            b"{",
            b"[]",
            b"null",
            b'"athlete"',
            b"{}",
            b'{"object_type": "athlete"}',
            b'{"aspect_type":"update","event_time":1,"object_id":1,"object_type":"athlete","owner_id":"x",'
            b'"subscription_id":1,"updates":{"authorized":"false"}}',
            b'{"aspect_type":"update","event_time":1,"object_id":1,"object_type":"athlete","owner_id":1e400,'
            b'"subscription_id":1,"updates":{"authorized":"false"}}',
            b'{"aspect_type":"update","event_time":-1,"object_id":1,"object_type":"athlete","owner_id":1,'
            b'"subscription_id":1,"updates":{"authorized":"false"}}',
            b'{"aspect_type":"update","event_time":1,"object_id":1,"object_type":"athlete","owner_id":'
            + b"9" * 40
            + b',"subscription_id":1,"updates":{"authorized":"false"}}',
            b'{"aspect_type":"update","event_time":1,"object_id":1,"object_type":"' + b"x" * 5000 + b'","owner_id":1,'
            b'"subscription_id":1,"updates":[]}',
            b'{"aspect_type":"update","event_time":1,"object_id":true,"object_type":"athlete","owner_id":1,'
            b'"subscription_id":1,"updates":{"authorized":"false"}}',
            b'{"object_type": "\'; DROP TABLE user_tokens; --"}',
            b"\xff\xfe\x00",
        ],
    )
    async def test_malformed_bodies_are_422_and_store_nothing(self, client: httpx.AsyncClient, content: bytes) -> None:
        """Not JSON, not an object, missing or ill-typed fields, absurd numbers: 422 problem, never a 500."""
        response = await client.post(PATH, content=content, headers={"Content-Type": "application/json"})
        assert_problem(response, 422, "validation_error")
        assert await stored_events(client) == []

    async def test_an_oversized_body_is_413(self, client: httpx.AsyncClient) -> None:
        body = event(4242, updates={"authorized": "false", "padding": "x" * 70_000})
        assert_problem(await client.post(PATH, json=body), 413, "payload_too_large")

    async def test_a_dead_database_is_503_with_retry_after(
        self, tmp_path: Any, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """No table to store into (think: the database went away): Strava gets a 503 and retries later."""
        settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", webhook_poll_interval_seconds=0)
        app = create_app(settings, clock=clock, strava_transport=strava_transport)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tokensvc.test") as http:
                response = await http.post(PATH, json=event(4242))
        assert_problem(response, 503, "database_unavailable")
        assert response.headers["retry-after"].isdigit()


async def wait_until(condition: Callable[[], Awaitable[bool]], deadline: float = 15.0) -> None:
    """A bounded condition wait: check, then yield briefly, until true or the deadline passes."""
    async with asyncio.timeout(deadline):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.01)


class TestThroughTheSandbox:
    @pytest.fixture
    async def live(
        self,
        database_url: str,
        clock: FakeClock,
        sandbox: SandboxState,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> AsyncIterator[httpx.AsyncClient]:
        """The service with its processor running, and the sandbox able to call it back (both over ASGI)."""
        settings = make_settings(
            database_url, strava_webhook_verify_token=SecretStr(VERIFY_TOKEN), webhook_poll_interval_seconds=30
        )
        app = create_app(settings, clock=clock, strava_transport=strava_transport)
        async with LifespanManager(app) as manager:
            sandbox.push.transport = httpx.ASGITransport(app=manager.app)
            transport = httpx.ASGITransport(app=manager.app)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://tokensvc.test", headers=headers) as http:
                http.app = app  # type: ignore[attr-defined]
                yield http

    @pytest.fixture
    async def strava(self, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport) -> AsyncIterator[StravaClient]:
        """A Strava client with the application's credentials, as the service has, for the app's own calls."""
        client = StravaClient(
            base_url=STRAVA_TEST_BASE,
            client_id=SANDBOX_CLIENT_ID,
            client_secret=SANDBOX_CLIENT_SECRET,
            transport=strava_transport,
            clock=clock,
        )
        try:
            yield client
        finally:
            await client.aclose()

    async def test_a_revocation_pushed_by_strava_ends_in_deauthorized(
        self,
        live: httpx.AsyncClient,
        strava: StravaClient,
        sandbox: SandboxState,
        clock: FakeClock,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> None:
        """Subscribe (Strava checks our challenge), the athlete revokes, Strava pushes, the processor wakes,
        confirms and applies: the user is needs_reauth (deauthorized) and access-token answers 409."""
        subscription_id = await strava.create_subscription("http://tokensvc.test/v1/webhooks/strava", VERIFY_TOKEN)
        assert [s.id for s in await strava.list_subscriptions()] == [subscription_id]
        user: Seeded = seed_athlete(sandbox, clock, expires_in=20_000)
        imported = await live.put(f"/v1/users/{user.user_id}/tokens", json=import_body(user).model_dump())
        assert imported.status_code == 200
        async with httpx.AsyncClient(transport=strava_transport, base_url="http://strava.test") as control:
            assert (await control.post(f"/_control/athletes/{user.athlete_id}/revoke")).status_code == 200
            delivered = await control.get("/_control/deliveries", params={"count": 1, "timeout": 10})
        assert delivered.status_code == 200
        assert [d["statuses"] for d in delivered.json()["deliveries"]] == [[200]]
        assert sandbox.push.deliveries[0].statuses == [200]

        async def deauthorized() -> bool:
            status = (await live.get(f"/v1/users/{user.user_id}/token-status")).json()
            return bool(status["reauth_reason"] == "deauthorized")

        await wait_until(deauthorized)
        response = await live.get(f"/v1/users/{user.user_id}/access-token")
        assert_problem(response, 409, "reauth_required")
        assert response.json()["reauth_reason"] == "deauthorized"

    async def test_a_subscription_with_the_wrong_verify_token_is_refused_by_strava(
        self, live: httpx.AsyncClient, strava: StravaClient
    ) -> None:
        """Strava's challenge reaches us with a token that is not ours: 403, so Strava refuses to subscribe."""
        from tokensvc.providers.strava import ProviderRequestError

        with pytest.raises(ProviderRequestError, match="callback"):
            await strava.create_subscription("http://tokensvc.test/v1/webhooks/strava", "not-ours")
        assert await strava.list_subscriptions() == []


SECRET = "s3cret-path-segment-0123456789"


class TestSecretPath:
    @pytest.fixture
    def settings(self, database_url: str) -> Settings:
        return make_settings(
            database_url,
            strava_webhook_verify_token=SecretStr(VERIFY_TOKEN),
            strava_webhook_path_secret=SecretStr(SECRET),
            webhook_poll_interval_seconds=0,
        )

    async def test_the_secret_path_answers_the_check_and_takes_events(
        self, client: httpx.AsyncClient, athlete: int
    ) -> None:
        """With TOKENSVC_STRAVA_WEBHOOK_PATH_SECRET set, `/v1/webhooks/strava/{secret}` is the callback."""
        checked = await client.get(f"{PATH}/{SECRET}", params=challenge())
        assert checked.json() == {"hub.challenge": "15f7d1a91c1f40f8a748fd134752feb3"}
        assert (await client.post(f"{PATH}/{SECRET}", json=event(athlete))).status_code == 200
        assert len(await stored_events(client)) == 1

    @pytest.mark.parametrize("path", [PATH, f"{PATH}/wrong-secret-0123456789", f"{PATH}/{SECRET}x"])
    async def test_every_other_path_is_404_and_stores_nothing(
        self, client: httpx.AsyncClient, athlete: int, path: str
    ) -> None:
        """The bare path and any other segment: 404 for the check and for events; nothing stored."""
        assert (await client.get(path, params=challenge())).status_code == 404
        assert (await client.post(path, json=event(athlete))).status_code == 404
        assert (await client.post(path, content=b"not json")).status_code == 404  # refused before the body
        assert await stored_events(client) == []


async def test_without_a_path_secret_a_secret_path_is_404(client: httpx.AsyncClient, athlete: int) -> None:
    """Unset, only the bare path serves: `/v1/webhooks/strava/<anything>` is 404."""
    assert_problem(await client.post(f"{PATH}/{SECRET}", json=event(athlete)), 404, "not_found")
    assert await stored_events(client) == []
