"""Ending grants at the sandbox: RFC 7009 revoke, deauthorize under /api/v3, and an access token invalidated early."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from tests.sandbox.test_sandbox import FakeClock, asgi_client, error_of, refresh, seed
from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET
from tokensvc.sandbox import SandboxState, create_sandbox_app

BASIC = (SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock) -> FastAPI:
    return create_sandbox_app(clock=clock)


@pytest.fixture
def sandbox(app: FastAPI) -> SandboxState:
    state: SandboxState = app.state.sandbox
    return state


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class TestRevoke:
    @pytest.mark.parametrize(("kind", "hint"), [("refresh_token", "refresh_token"), ("access_token", None)])
    async def test_a_live_token_revokes_the_whole_grant(
        self, client: httpx.AsyncClient, sandbox: SandboxState, kind: str, hint: str | None
    ) -> None:
        """Either token (hint or not) ends the grant: both tokens die, the call is rate-counted and attributed."""
        seeded = await seed(client)
        form = {"token": seeded[kind], **({"token_type_hint": hint} if hint else {})}
        response = await client.post("/oauth/revoke", data=form, auth=BASIC)
        assert (response.status_code, response.json()) == (200, {})
        assert response.headers["X-RateLimit-Usage"] == "1,1"
        assert response.headers["X-ReadRateLimit-Usage"] == "0,0"
        assert error_of(await refresh(client, seeded["refresh_token"]))[2] == "RefreshToken"
        assert (await client.get("/api/v3/athlete", headers=bearer(seeded["access_token"]))).status_code == 401
        assert (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()["revoked"] is True
        assert sandbox.stats()["calls_by_athlete"][str(seeded["athlete_id"])] == {"revoke": 1, "refresh": 1}
        assert sandbox.violations == []

    async def test_already_gone_or_never_issued_is_still_200(self, client: httpx.AsyncClient) -> None:
        """Revoking twice, or a rotated-away or unknown token, answers 200 and changes nothing more."""
        seeded = await seed(client)
        newer = (await refresh(client, seeded["refresh_token"])).json()
        stale = await client.post("/oauth/revoke", data={"token": seeded["refresh_token"]}, auth=BASIC)
        assert stale.status_code == 200
        assert (await refresh(client, newer["refresh_token"])).status_code == 200  # a dead token revoked nothing
        assert (await client.post("/oauth/revoke", data={"token": "f" * 40}, auth=BASIC)).status_code == 200
        live = (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()["refresh_token"]
        for _ in range(2):
            assert (await client.post("/oauth/revoke", data={"token": live}, auth=BASIC)).status_code == 200

    @pytest.mark.parametrize(
        "auth", [None, (SANDBOX_CLIENT_ID, "wrong"), ("1", SANDBOX_CLIENT_SECRET)], ids=["none", "secret", "id"]
    )
    async def test_bad_client_credentials_are_refused_and_revoke_nothing(
        self, client: httpx.AsyncClient, auth: tuple[str, str] | None
    ) -> None:
        """Missing or wrong client credentials: 400/401 in Strava's shape, and the grant lives on."""
        seeded = await seed(client)
        headers = (
            {} if auth is None else {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()}
        )
        response = await client.post("/oauth/revoke", data={"token": seeded["refresh_token"]}, headers=headers)
        assert response.status_code in (400, 401)
        assert error_of(response)[2] == "Application"
        assert (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()["revoked"] is False

    async def test_form_credentials_and_bad_requests(self, client: httpx.AsyncClient) -> None:
        """Client credentials in the form work too; a missing token or an unknown hint is a 400 naming it."""
        seeded = await seed(client)
        credentials = {"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET}
        assert error_of(await client.post("/oauth/revoke", data=credentials))[2:] == ("Token", "token", "missing")
        odd_hint = await client.post("/oauth/revoke", data={"token": "x", "token_type_hint": "id_token"}, auth=BASIC)
        assert error_of(odd_hint)[2:4] == ("Token", "token_type_hint")
        done = await client.post("/oauth/revoke", data={**credentials, "token": seeded["access_token"]})
        assert done.status_code == 200
        assert (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()["revoked"] is True


class TestDeauthorizeUnderTheApiPrefix:
    async def test_api_v3_oauth_deauthorize_is_served(self, client: httpx.AsyncClient, sandbox: SandboxState) -> None:
        """stravalib posts to /api/v3/oauth/deauthorize: it revokes, counts as a deauthorize and is rate-counted."""
        seeded = await seed(client)
        response = await client.post("/api/v3/oauth/deauthorize", headers=bearer(seeded["access_token"]))
        assert (response.status_code, response.json()) == (200, {"access_token": seeded["access_token"]})
        assert response.headers["X-RateLimit-Usage"] == "1,1"
        assert sandbox.calls["deauthorize"] == 1
        assert (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()["revoked"] is True


class TestInvalidate:
    async def test_the_next_refresh_mints_a_new_access_token_early(self, client: httpx.AsyncClient) -> None:
        """After an early invalidation the old access token gets 401 although hours remain, and the next refresh
        mints a new one (normally a refresh with over an hour left returns the same token)."""
        seeded = await seed(client)
        snapshot = (await client.post(f"/_control/athletes/{seeded['athlete_id']}/invalidate")).json()
        assert (snapshot["access_token"], snapshot["refresh_token"]) == (
            seeded["access_token"],
            seeded["refresh_token"],
        )
        answer = await client.get("/api/v3/athlete", headers=bearer(seeded["access_token"]))
        assert error_of(answer) == (401, "Authorization Error", "Athlete", "access_token", "invalid")
        body = (await refresh(client, seeded["refresh_token"])).json()
        assert body["access_token"] != seeded["access_token"]
        assert body["expires_in"] == 21600
        assert (await client.get("/api/v3/athlete", headers=bearer(body["access_token"]))).status_code == 200

    async def test_unknown_athlete_is_404(self, client: httpx.AsyncClient) -> None:
        """Invalidating an athlete the sandbox never connected answers 404."""
        assert (await client.post("/_control/athletes/4242/invalidate")).status_code == 404
