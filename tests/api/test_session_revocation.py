"""Revocable sessions: `DELETE …/tokens` ends the user's browser sessions, dashboard sign-out ends admin ones, on
every replica (the watermark is in the database). Before issue 14 both kept working until they expired."""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager
from pydantic import SecretStr

from tests.conftest import FakeClock, make_settings
from tokensvc.app import create_app

pytestmark = pytest.mark.dialects("sqlite", "postgres")

BASE = "http://tokensvc.test"
PASSWORD = "correct horse battery staple"


async def session_for(client: httpx.AsyncClient, user_id: str) -> str:
    response = await client.post(f"/v1/users/{user_id}/session")
    assert response.status_code == 200, response.text
    token: str = response.json()["session_token"]
    return token


async def status_with(client: httpx.AsyncClient, token: str) -> int:
    response = await client.get("/v1/me/token-status", headers={"Authorization": f"Bearer {token}"})
    return response.status_code


class TestUserSessions:
    async def test_deleting_the_tokens_ends_the_users_sessions(
        self, client: httpx.AsyncClient, clock: FakeClock
    ) -> None:
        """A session minted before `DELETE …/tokens` is refused after it; one minted later works; another
        user's session is untouched."""
        alice, bob = await session_for(client, "alice"), await session_for(client, "bob")
        assert await status_with(client, alice) == 200
        clock.advance(0.5)
        assert (await client.delete("/v1/users/alice/tokens")).status_code == 204
        assert await status_with(client, alice) == 401
        assert await status_with(client, bob) == 200
        clock.advance(0.5)
        assert await status_with(client, await session_for(client, "alice")) == 200

    async def test_the_cookie_is_ended_too(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        token = await session_for(client, "carol")
        clock.advance(1)
        await client.delete("/v1/users/carol/tokens")
        client.cookies.set("tokensvc_session", token)
        try:
            response = await client.get("/v1/me/token-status", headers={"Authorization": ""})
        finally:
            client.cookies.clear()
        assert response.status_code == 401


class TestAdminSessions:
    async def test_sign_out_ends_the_cookie_even_when_replayed_and_on_every_replica(
        self, database_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """The cookie copied before sign-out no longer opens the dashboard, at this replica or another."""
        settings = make_settings(database_url, admin_password=SecretStr(PASSWORD))
        one = create_app(settings, clock=clock, strava_transport=strava_transport)
        two = create_app(settings, clock=clock, strava_transport=strava_transport)
        async with (
            LifespanManager(one),
            LifespanManager(two),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=one), base_url=BASE) as first,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=two), base_url=BASE) as second,
        ):
            assert (await first.post("/dashboard/login", data={"secret": PASSWORD})).status_code == 303
            cookie = first.cookies["tokensvc_admin"]
            second.cookies.set("tokensvc_admin", cookie)
            assert (await second.get("/dashboard")).status_code == 200
            clock.advance(1)
            assert (await first.post("/dashboard/logout", headers={"origin": BASE})).status_code == 303
            first.cookies.set("tokensvc_admin", cookie)
            assert (await first.get("/dashboard")).status_code == 303
            assert (await second.get("/dashboard")).status_code == 303
            clock.advance(1)
            second.cookies.clear()
            assert (await second.post("/dashboard/login", data={"secret": PASSWORD})).status_code == 303
            assert (await second.get("/dashboard")).status_code == 200
