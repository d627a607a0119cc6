"""Behaviour of the Strava sandbox, driven over HTTP the way tokensvc and its tests drive it."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI

from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET
from tokensvc.sandbox import FaultSpec, SandboxState, create_sandbox_app

START = 1_700_000_100.0  # 2023-11-14 22:15:00 UTC, a quarter-hour boundary
CREDENTIALS = {"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET}
HEX40 = re.compile(r"[0-9a-f]{40}")


class FakeClock:
    """A clock tests move by hand, so expiry and windows never depend on wall time."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox")


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


async def refresh(client: httpx.AsyncClient, token: str, path: str = "/oauth/token") -> httpx.Response:
    return await client.post(path, data={**CREDENTIALS, "grant_type": "refresh_token", "refresh_token": token})


async def exchange(client: httpx.AsyncClient, code: str, path: str = "/oauth/token") -> httpx.Response:
    return await client.post(path, data={**CREDENTIALS, "grant_type": "authorization_code", "code": code})


async def seed(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/_control/athletes", json=body)
    assert response.status_code == 200
    seeded: dict[str, Any] = response.json()
    return seeded


def error_of(response: httpx.Response) -> tuple[int, str, str, str, str]:
    body = response.json()
    (error,) = body["errors"]
    return response.status_code, body["message"], error["resource"], error["field"], error["code"]


def query_of(location: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(location).query, keep_blank_values=True)


class ConsentForm(HTMLParser):
    """Reads the consent page the way a browser would submit it."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}
        self.scopes: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.action = attributes["action"] or ""
        elif tag == "input" and attributes.get("type") == "checkbox":
            assert "checked" in attributes
            self.scopes.append(attributes["value"] or "")
        elif tag == "input":
            self.fields[attributes["name"] or ""] = attributes.get("value") or ""


async def consent(
    client: httpx.AsyncClient,
    *,
    decision: str = "approve",
    scope: str = "read,activity:read_all",
    uncheck: tuple[str, ...] = (),
    athlete_id: int | None = None,
    redirect_uri: str = "http://localhost:8000/callback",
    prefix: str = "",
) -> httpx.Response:
    """Open the consent page, then post its form as the athlete would."""
    page = await client.get(
        f"{prefix}/oauth/authorize",
        params={
            "client_id": SANDBOX_CLIENT_ID,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "approval_prompt": "force",
            "scope": scope,
            "state": "st4te",
        },
    )
    assert page.status_code == 200
    form = ConsentForm(page.text)
    data: dict[str, str | list[str]] = {**form.fields, "decision": decision}
    data["scope"] = [s for s in form.scopes if s not in uncheck]
    if athlete_id is not None:
        data["athlete_id"] = str(athlete_id)
    return await client.post(form.action, data=data)


async def connect(client: httpx.AsyncClient, **kwargs: Any) -> dict[str, Any]:
    """The whole browser flow plus the code exchange; returns the token response."""
    location = (await consent(client, **kwargs)).headers["location"]
    response = await exchange(client, query_of(location)["code"][0])
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


class TestConsent:
    async def test_page_lists_requested_scopes_checked_and_both_buttons(self, client: httpx.AsyncClient) -> None:
        """The page names the app, checks every requested scope and offers Authorize and Cancel."""
        page = await client.get(
            "/oauth/authorize",
            params={
                "client_id": SANDBOX_CLIENT_ID,
                "redirect_uri": "http://localhost/cb",
                "response_type": "code",
                "scope": "read,activity:read_all,profile:read_all",
            },
        )
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>Authorize Sandbox app — Strava sandbox</title>" in page.text
        assert '<button id="approve" name="decision" value="approve">Authorize</button>' in page.text
        assert '<button id="deny" name="decision" value="deny">Cancel</button>' in page.text
        form = ConsentForm(page.text)
        assert form.scopes == ["read", "activity:read_all", "profile:read_all"]
        assert form.action == "/oauth/authorize"
        assert int(form.fields["athlete_id"]) > 0
        assert "http" not in page.text.replace("http://localhost/cb", "")

    async def test_approve_redirects_with_state_code_and_scope(self, client: httpx.AsyncClient) -> None:
        """Approving answers 303 to redirect_uri with state, a code and the granted scopes."""
        response = await consent(client, redirect_uri="http://localhost:8000/callback?tenant=a")
        assert response.status_code == 303
        location = response.headers["location"]
        assert location.startswith("http://localhost:8000/callback?tenant=a&state=st4te&code=")
        query = query_of(location)
        assert query["scope"] == ["read,activity:read_all"]
        assert HEX40.fullmatch(query["code"][0])

    async def test_deny_redirects_with_access_denied(self, client: httpx.AsyncClient) -> None:
        """Cancelling answers 303 with error=access_denied and the state, and no code."""
        response = await consent(client, decision="deny")
        assert response.status_code == 303
        assert query_of(response.headers["location"]) == {"error": ["access_denied"], "state": ["st4te"]}

    async def test_unchecked_scopes_are_not_granted(self, client: httpx.AsyncClient) -> None:
        """Unchecking a scope narrows the scope reported in the redirect."""
        response = await consent(
            client, scope="read,activity:read_all,profile:read_all", uncheck=("activity:read_all",)
        )
        assert query_of(response.headers["location"])["scope"] == ["read,profile:read_all"]

    async def test_unknown_client_id_is_a_strava_error(self, client: httpx.AsyncClient) -> None:
        """An unknown client_id is rejected with Strava's Application/client_id error."""
        response = await client.get(
            "/oauth/authorize", params={"client_id": "nope", "redirect_uri": "http://x/cb", "response_type": "code"}
        )
        assert error_of(response) == (400, "Bad Request", "Application", "client_id", "invalid")

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"response_type": "code"}, "redirect_uri"),
            ({"redirect_uri": "http://x/cb", "response_type": "token"}, "response_type"),
            ({"redirect_uri": "http://x/cb", "response_type": "code", "scope": "read,everything"}, "scope"),
        ],
    )
    async def test_bad_request_parameters(self, client: httpx.AsyncClient, params: dict[str, str], field: str) -> None:
        """Missing redirect_uri, a non-code response_type or an unknown scope give a 400 naming the field."""
        response = await client.get("/oauth/authorize", params={"client_id": SANDBOX_CLIENT_ID, **params})
        status, _, _, bad_field, code = error_of(response)
        assert (status, bad_field, code) == (400, field, "invalid")

    async def test_existing_athlete_id_reconnects_that_athlete(self, client: httpx.AsyncClient) -> None:
        """Entering an existing athlete's id reconnects it: a new pair, the old refresh token dies."""
        first = await connect(client)
        athlete_id = first["athlete"]["id"]
        second = await connect(client, athlete_id=athlete_id)
        assert second["athlete"]["id"] == athlete_id
        assert second["refresh_token"] != first["refresh_token"]
        assert (await refresh(client, first["refresh_token"])).status_code == 400
        assert (await refresh(client, second["refresh_token"])).status_code == 200


class TestExchange:
    async def test_code_gives_a_fresh_pair_and_the_athlete(self, client: httpx.AsyncClient) -> None:
        """A code exchange returns Strava's exact token response shape with the athlete summary."""
        body = await connect(client, athlete_id=134815)
        assert set(body) == {"token_type", "expires_at", "expires_in", "refresh_token", "access_token", "athlete"}
        assert body["token_type"] == "Bearer"
        assert HEX40.fullmatch(body["access_token"])
        assert HEX40.fullmatch(body["refresh_token"])
        assert body["expires_in"] == 21600
        assert body["expires_at"] == START + 21600
        assert {"id", "username", "firstname", "lastname"} <= set(body["athlete"])
        assert body["athlete"]["id"] == 134815

    async def test_code_is_single_use(self, client: httpx.AsyncClient) -> None:
        """Presenting a code a second time gives AuthorizationCode/code/invalid."""
        code = query_of((await consent(client)).headers["location"])["code"][0]
        assert (await exchange(client, code)).status_code == 200
        assert error_of(await exchange(client, code)) == (400, "Bad Request", "AuthorizationCode", "code", "invalid")

    async def test_unknown_code_is_invalid(self, client: httpx.AsyncClient) -> None:
        """A code the sandbox never issued is invalid."""
        assert error_of(await exchange(client, "f" * 40))[2:] == ("AuthorizationCode", "code", "invalid")

    async def test_code_expires_after_ten_minutes(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """Codes live 600 s; later the exchange gives AuthorizationCode//expired."""
        code = query_of((await consent(client)).headers["location"])["code"][0]
        clock.advance(600)
        assert error_of(await exchange(client, code)) == (400, "Bad Request", "AuthorizationCode", "", "expired")

    async def test_unknown_client_id(self, client: httpx.AsyncClient) -> None:
        """An unknown client_id on the token endpoint is a 400 Application/client_id/invalid."""
        response = await client.post(
            "/oauth/token", data={"client_id": "x", "client_secret": "y", "grant_type": "authorization_code"}
        )
        assert error_of(response) == (400, "Bad Request", "Application", "client_id", "invalid")

    async def test_wrong_client_secret(self, client: httpx.AsyncClient) -> None:
        """A wrong secret is a 401 Authorization Error on Application with an empty field."""
        response = await client.post(
            "/oauth/token",
            data={"client_id": SANDBOX_CLIENT_ID, "client_secret": "wrong", "grant_type": "authorization_code"},
        )
        assert error_of(response) == (401, "Authorization Error", "Application", "", "invalid")

    async def test_api_v3_path_behaves_the_same(self, client: httpx.AsyncClient) -> None:
        """/api/v3/oauth/token exchanges codes too, and token calls carry no rate-limit headers."""
        code = query_of((await consent(client)).headers["location"])["code"][0]
        response = await exchange(client, code, path="/api/v3/oauth/token")
        assert response.status_code == 200
        assert "x-ratelimit-usage" not in response.headers

    async def test_missing_grant_type(self, client: httpx.AsyncClient) -> None:
        """A missing or unknown grant_type is a Strava-style 400."""
        response = await client.post("/oauth/token", data={**CREDENTIALS, "grant_type": "password"})
        assert error_of(response) == (400, "Bad Request", "Application", "grant_type", "invalid")


class TestRefresh:
    async def test_more_than_an_hour_left_returns_the_same_access_token(
        self, client: httpx.AsyncClient, clock: FakeClock
    ) -> None:
        """With > 3600 s left Strava returns the same access token and expires_at."""
        seeded = await seed(client)
        clock.advance(21600 - 3601)
        response = await refresh(client, seeded["refresh_token"])
        body = response.json()
        assert set(body) == {"token_type", "access_token", "expires_at", "expires_in", "refresh_token"}
        assert (body["access_token"], body["expires_at"]) == (seeded["access_token"], seeded["expires_at"])
        assert body["expires_in"] == 3601
        assert "x-ratelimit-usage" not in response.headers

    async def test_an_hour_or_less_left_mints_a_new_access_token(
        self, client: httpx.AsyncClient, clock: FakeClock
    ) -> None:
        """At ≤ 3600 s left a new access token is minted; the old one works until its own expiry."""
        seeded = await seed(client)
        clock.advance(21600 - 3600)
        body = (await refresh(client, seeded["refresh_token"])).json()
        assert body["access_token"] != seeded["access_token"]
        assert body["expires_at"] == clock.now + 21600
        assert body["expires_in"] == 21600
        old = {"Authorization": f"Bearer {seeded['access_token']}"}
        assert (await client.get("/api/v3/athlete", headers=old)).status_code == 200
        clock.advance(3600)
        assert (await client.get("/api/v3/athlete", headers=old)).status_code == 401
        new = {"Authorization": f"Bearer {body['access_token']}"}
        assert (await client.get("/api/v3/athlete", headers=new)).status_code == 200

    async def test_rotation_kills_the_old_refresh_token_at_once(self, client: httpx.AsyncClient) -> None:
        """Every refresh returns a new refresh token and the previous one is dead immediately."""
        seeded = await seed(client)
        body = (await refresh(client, seeded["refresh_token"])).json()
        assert HEX40.fullmatch(body["refresh_token"])
        assert body["refresh_token"] != seeded["refresh_token"]
        assert error_of(await refresh(client, seeded["refresh_token"])) == (
            400,
            "Bad Request",
            "RefreshToken",
            "refresh_token",
            "invalid",
        )
        assert (await refresh(client, body["refresh_token"])).status_code == 200

    async def test_without_rotation_the_same_refresh_token_comes_back(self, clock: FakeClock) -> None:
        """With rotate=False the refresh token never changes and stays usable."""
        async with asgi_client(create_sandbox_app(clock=clock, rotate=False)) as client:
            seeded = await seed(client)
            for _ in range(2):
                body = (await refresh(client, seeded["refresh_token"])).json()
                assert body["refresh_token"] == seeded["refresh_token"]

    async def test_unknown_refresh_token(self, client: httpx.AsyncClient) -> None:
        """A token the sandbox never issued is RefreshToken/refresh_token/invalid."""
        assert error_of(await refresh(client, "0" * 40))[2:] == ("RefreshToken", "refresh_token", "invalid")

    async def test_parameters_in_the_query_string_are_accepted(self, client: httpx.AsyncClient) -> None:
        """Strava accepts token parameters in the query string, as some clients send them."""
        seeded = await seed(client)
        params = {**CREDENTIALS, "grant_type": "refresh_token", "refresh_token": seeded["refresh_token"]}
        assert (await client.post("/oauth/token", params=params)).status_code == 200


class TestDeauthorize:
    @pytest.mark.parametrize("placement", ["form", "query", "bearer"])
    async def test_kills_every_token_of_the_athlete(self, client: httpx.AsyncClient, placement: str) -> None:
        """The access token works from form, query or Bearer; afterwards nothing of that athlete works."""
        seeded = await seed(client)
        token = seeded["access_token"]
        if placement == "form":
            response = await client.post("/oauth/deauthorize", data={"access_token": token})
        elif placement == "query":
            response = await client.post("/oauth/deauthorize", params={"access_token": token})
        else:
            response = await client.post("/oauth/deauthorize", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert response.json() == {"access_token": token}
        assert response.headers["x-ratelimit-usage"] == "1,1"
        assert error_of(await refresh(client, seeded["refresh_token"]))[2] == "RefreshToken"
        athlete = await client.get("/api/v3/athlete", headers={"Authorization": f"Bearer {token}"})
        assert athlete.status_code == 401
        assert (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()["revoked"] is True

    async def test_invalid_token_is_401(self, client: httpx.AsyncClient) -> None:
        """An unknown access token gets Athlete/access_token/invalid."""
        response = await client.post("/oauth/deauthorize", data={"access_token": "nope"})
        assert error_of(response) == (401, "Authorization Error", "Athlete", "access_token", "invalid")


class TestAthlete:
    async def test_valid_token_gets_the_athlete_and_rate_headers(self, client: httpx.AsyncClient) -> None:
        """A valid token reads the athlete; the answer carries both rate-limit header pairs."""
        seeded = await seed(client, athlete_id=42)
        response = await client.get("/api/v3/athlete", headers={"Authorization": f"Bearer {seeded['access_token']}"})
        assert response.status_code == 200
        assert response.json()["id"] == 42
        assert response.headers["X-RateLimit-Limit"] == "200,2000"
        assert response.headers["X-RateLimit-Usage"] == "1,1"
        assert response.headers["X-ReadRateLimit-Limit"] == "100,1000"
        assert response.headers["X-ReadRateLimit-Usage"] == "1,1"

    async def test_expired_or_unknown_token_is_401(self, client: httpx.AsyncClient) -> None:
        """An already-expired seeded token and a made-up one both get 401 Athlete/access_token/invalid."""
        seeded = await seed(client, expires_in=-5)
        for token in (seeded["access_token"], "x" * 40):
            response = await client.get("/api/v3/athlete", headers={"Authorization": f"Bearer {token}"})
            assert error_of(response) == (401, "Authorization Error", "Athlete", "access_token", "invalid")
            assert "x-ratelimit-usage" in response.headers


class TestFaults:
    async def add(self, client: httpx.AsyncClient, **spec: Any) -> None:
        assert (await client.post("/_control/faults", json=spec)).status_code == 200

    async def test_status_answers_without_processing(self, client: httpx.AsyncClient, sandbox: SandboxState) -> None:
        """A status fault returns its status, raw body and Retry-After, and the token stays usable."""
        seeded = await seed(client)
        await self.add(client, endpoint="refresh", kind="status", status=503, retry_after=7, body="<html>down</html>")
        response = await refresh(client, seeded["refresh_token"])
        assert (response.status_code, response.text, response.headers["retry-after"]) == (503, "<html>down</html>", "7")
        assert (await refresh(client, seeded["refresh_token"])).status_code == 200
        assert sandbox.calls["refresh"] == 2

    async def test_status_defaults_to_strava_rate_limit(self, client: httpx.AsyncClient) -> None:
        """Without a status a fault answers 429 with Strava's rate-limit body."""
        await self.add(client, endpoint="athlete", kind="status")
        response = await client.get("/api/v3/athlete")
        assert error_of(response) == (429, "Rate Limit Exceeded", "Application", "rate limit", "exceeded")

    async def test_count_and_queue_order(self, client: httpx.AsyncClient) -> None:
        """A fault with count=2 hits two matching requests; the next queued fault comes after it."""
        seeded = await seed(client)
        await self.add(client, endpoint="token", kind="status", status=500, count=2)
        await self.add(client, endpoint="any", kind="status", status=502)
        statuses = [(await refresh(client, seeded["refresh_token"])).status_code for _ in range(4)]
        assert statuses == [500, 500, 502, 200]
        assert (await client.get("/_control/faults")).json() == {"pending": []}

    async def test_faults_match_only_their_endpoint(self, client: httpx.AsyncClient) -> None:
        """A refresh fault is not consumed by an exchange, and stays listed until used or cleared."""
        await self.add(client, endpoint="refresh", kind="status", status=500)
        code = query_of((await consent(client)).headers["location"])["code"][0]
        assert (await exchange(client, code)).status_code == 200
        (pending,) = (await client.get("/_control/faults")).json()["pending"]
        assert (pending["endpoint"], pending["remaining"]) == ("refresh", 1)
        assert (await client.delete("/_control/faults")).json() == {"pending": []}

    async def test_latency_delays_then_processes(self, client: httpx.AsyncClient) -> None:
        """A latency fault sleeps, then answers normally."""
        seeded = await seed(client)
        await self.add(client, endpoint="refresh", kind="latency", latency_ms=50)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await refresh(client, seeded["refresh_token"])
        assert response.status_code == 200
        assert loop.time() - started >= 0.05

    async def test_lost_answer_rotates_but_the_client_never_hears(self, client: httpx.AsyncClient) -> None:
        """A lost answer processes the refresh for real, then hangs past the client's timeout."""
        seeded = await seed(client)
        await self.add(client, endpoint="refresh", kind="lost_answer", hang_seconds=30)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(refresh(client, seeded["refresh_token"]), timeout=0.2)
        athlete = (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()
        assert athlete["refresh_token"] != seeded["refresh_token"]
        assert athlete["refresh_tokens_issued"] == 2
        assert (await refresh(client, seeded["refresh_token"])).status_code == 400
        assert (await refresh(client, athlete["refresh_token"])).status_code == 200

    async def test_lost_answer_eventually_answers(self, client: httpx.AsyncClient) -> None:
        """A patient client does get the new pair once the hang is over."""
        seeded = await seed(client)
        await self.add(client, endpoint="any", kind="lost_answer", hang_seconds=0.01)
        body = (await refresh(client, seeded["refresh_token"])).json()
        assert body["refresh_token"] != seeded["refresh_token"]

    @pytest.mark.parametrize(("body", "expected"), [(None, '{"unexpected": true}'), ("not json", "not json")])
    async def test_malformed_answers_200_without_tokens(
        self, client: httpx.AsyncClient, body: str | None, expected: str
    ) -> None:
        """A malformed fault answers 200 with a body that is not a token response, and does not process."""
        seeded = await seed(client)
        await self.add(client, endpoint="exchange", kind="malformed")
        await self.add(client, endpoint="refresh", kind="malformed", body=body)
        response = await refresh(client, seeded["refresh_token"])
        assert (response.status_code, response.text) == (200, expected)
        assert (await refresh(client, seeded["refresh_token"])).status_code == 200

    async def test_faulted_deauthorize_does_not_revoke(self, client: httpx.AsyncClient) -> None:
        """A status fault on deauthorize leaves the athlete connected, and the call is still counted."""
        seeded = await seed(client)
        await self.add(client, endpoint="deauthorize", kind="status", status=500)
        response = await client.post("/oauth/deauthorize", data={"access_token": seeded["access_token"]})
        assert response.status_code == 500
        stats = (await client.get("/_control/stats")).json()
        assert stats["calls"]["deauthorize"] == 1
        assert (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()["revoked"] is False

    async def test_in_process_api(self, client: httpx.AsyncClient, sandbox: SandboxState) -> None:
        """Faults can be queued directly on the state by in-process tests."""
        sandbox.add_fault(FaultSpec(endpoint="athlete", kind="status", status=502))
        assert (await client.get("/api/v3/athlete")).status_code == 502


class TestHold:
    async def test_held_requests_wait_for_release(self, client: httpx.AsyncClient) -> None:
        """Two refreshes with one token are parked together; on release one wins and the other sends a dead token."""
        seeded = await seed(client)
        assert (await client.post("/_control/hold", json={"endpoint": "refresh"})).json() == {"holding": ["refresh"]}
        racers = [asyncio.create_task(refresh(client, seeded["refresh_token"])) for _ in range(2)]
        held = await client.get("/_control/held", params={"count": 2, "timeout": 5})
        assert held.json() == {"held": 2}
        assert not any(racer.done() for racer in racers)
        assert (await client.post("/_control/release")).json() == {"released": 2}
        statuses = sorted(response.status_code for response in await asyncio.gather(*racers))
        assert statuses == [200, 400]
        stats = (await client.get("/_control/stats")).json()
        assert stats["refresh_by_athlete"] == {str(seeded["athlete_id"]): 2}
        (violation,) = stats["ledger_violations"]
        assert (violation["athlete_id"], violation["index"]) == (seeded["athlete_id"], 0)

    async def test_held_times_out_with_408(self, client: httpx.AsyncClient) -> None:
        """Waiting for more held requests than arrive answers 408 with the current count."""
        response = await client.get("/_control/held", params={"count": 1, "timeout": 0.05})
        assert (response.status_code, response.json()) == (408, {"held": 0})

    async def test_hold_only_matches_its_endpoint(self, client: httpx.AsyncClient) -> None:
        """Holding refreshes lets athlete reads through."""
        seeded = await seed(client)
        await client.post("/_control/hold", json={"endpoint": "refresh"})
        response = await client.get("/api/v3/athlete", headers={"Authorization": f"Bearer {seeded['access_token']}"})
        assert response.status_code == 200

    async def test_reset_releases_held_requests(self, client: httpx.AsyncClient) -> None:
        """A reset frees parked requests, which then find an empty world."""
        seeded = await seed(client)
        await client.post("/_control/hold", json={"endpoint": "token"})
        racer = asyncio.create_task(refresh(client, seeded["refresh_token"]))
        assert (await client.get("/_control/held", params={"count": 1})).status_code == 200
        await client.post("/_control/reset")
        assert (await racer).status_code == 400


class TestRateLimit:
    async def read(self, client: httpx.AsyncClient, token: str) -> httpx.Response:
        return await client.get("/api/v3/athlete", headers={"Authorization": f"Bearer {token}"})

    async def test_quarter_hour_limit_and_reset(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """Over the 15-minute limit answers 429 until the next quarter hour; rejected calls still count."""
        token = (await seed(client, expires_in=86400))["access_token"]
        await client.post("/_control/rate-limit", json={"limit_15min": 2, "limit_daily": 100})
        assert [(await self.read(client, token)).status_code for _ in range(2)] == [200, 200]
        limited = await self.read(client, token)
        assert error_of(limited) == (429, "Rate Limit Exceeded", "Application", "rate limit", "exceeded")
        assert limited.headers["X-RateLimit-Limit"] == "2,100"
        assert limited.headers["X-RateLimit-Usage"] == "3,3"
        clock.advance(899)
        assert (await self.read(client, token)).status_code == 429
        clock.advance(1)
        response = await self.read(client, token)
        assert (response.status_code, response.headers["X-RateLimit-Usage"]) == (200, "1,5")

    async def test_daily_limit_resets_at_midnight_utc(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """The daily window ends at midnight UTC, not 24 h after the first call."""
        token = (await seed(client, expires_in=86400))["access_token"]
        await client.post("/_control/rate-limit", json={"limit_15min": None, "limit_daily": 1})
        assert (await self.read(client, token)).status_code == 200
        clock.advance(1800)
        assert (await self.read(client, token)).status_code == 429
        clock.advance(86400 - START % 86400 - 1800)  # exactly midnight
        assert (await self.read(client, token)).status_code == 200

    async def test_limits_change_and_reset_restores_stravas(self, client: httpx.AsyncClient) -> None:
        """Limits set through the control change only what is given; token calls are never counted; a reset
        restores Strava's defaults."""
        seeded = await seed(client)
        changed = await client.post("/_control/rate-limit", json={"limit_15min": 0})
        assert changed.json() == {
            "limit_15min": 0,
            "limit_daily": 2000,
            "read_limit_15min": 100,
            "read_limit_daily": 1000,
        }
        assert (await self.read(client, seeded["access_token"])).status_code == 429
        assert (await refresh(client, seeded["refresh_token"])).status_code == 200
        await client.post("/_control/rate-limit", json={"limit_15min": 10})
        response = await self.read(
            client, (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).json()["access_token"]
        )
        assert (response.status_code, response.headers["X-RateLimit-Usage"]) == (200, "2,2")
        await client.post("/_control/reset")
        assert (await client.get("/_control/rate-limit")).json() == {
            "limit_15min": 200,
            "limit_daily": 2000,
            "read_limit_15min": 100,
            "read_limit_daily": 1000,
        }


class TestLedger:
    async def test_ledger_reports_every_issued_refresh_token(self, client: httpx.AsyncClient) -> None:
        """Each issued token appears in order with its hash, how often it was sent, and whether it lives."""
        seeded = await seed(client)
        first = seeded["refresh_token"]
        second = (await refresh(client, first)).json()["refresh_token"]
        assert (await refresh(client, first)).status_code == 400
        ledger = (await client.get("/_control/ledger")).json()
        assert ledger == {
            str(seeded["athlete_id"]): [
                {
                    "index": 0,
                    "sha256": hashlib.sha256(first.encode()).hexdigest(),
                    "sent": 2,
                    "accepted": True,
                    "alive": False,
                },
                {
                    "index": 1,
                    "sha256": hashlib.sha256(second.encode()).hexdigest(),
                    "sent": 0,
                    "accepted": False,
                    "alive": True,
                },
            ]
        }
        stats = (await client.get("/_control/stats")).json()
        assert stats["calls"] == {**dict.fromkeys(stats["calls"], 0), "refresh": 2}
        assert stats["calls_by_athlete"] == {str(seeded["athlete_id"]): {"refresh": 2}}
        assert stats["ledger_violations"][0]["kind"] == "stale_refresh_token"

    async def test_revoked_tokens_are_not_violations(self, client: httpx.AsyncClient, sandbox: SandboxState) -> None:
        """Presenting a token the athlete revoked is how a client learns of it, not a client bug."""
        seeded = await seed(client)
        await client.post(f"/_control/athletes/{seeded['athlete_id']}/revoke")
        assert (await refresh(client, seeded["refresh_token"])).status_code == 400
        assert sandbox.violations == []
        (entry,) = sandbox.ledger[seeded["athlete_id"]]
        assert (entry.sent, entry.accepted, entry.alive) == (1, False, False)


class TestControl:
    async def test_seed_inspect_expire_rotate_revoke(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """The control API seeds an athlete and changes it the way the real world would."""
        seeded = await seed(client, athlete_id=7, expires_in=-10, scope="read")
        assert seeded["athlete_id"] == 7
        assert (seeded["expires_at"], seeded["scope"]) == (START - 10, "read")
        snapshot = (await client.get("/_control/athletes/7")).json()
        assert snapshot == {
            "athlete_id": 7,
            "access_token": seeded["access_token"],
            "refresh_token": seeded["refresh_token"],
            "expires_at": START - 10,
            "scope": "read",
            "revoked": False,
            "refresh_tokens_issued": 1,
        }
        expired = await client.post("/_control/athletes/7/expire", json={"expires_at": int(START) + 100})
        assert expired.json()["expires_at"] == START + 100
        rotated = (await client.post("/_control/athletes/7/rotate")).json()
        assert rotated["refresh_token"] != seeded["refresh_token"]
        assert rotated["access_token"] != seeded["access_token"]
        assert rotated["refresh_tokens_issued"] == 2
        assert (await refresh(client, seeded["refresh_token"])).status_code == 400
        revoked = (await client.post("/_control/athletes/7/revoke")).json()
        assert revoked["revoked"] is True
        assert (await refresh(client, rotated["refresh_token"])).status_code == 400
        assert (await client.post("/_control/athletes/7/rotate")).status_code == 409

    async def test_seed_without_body_picks_a_fresh_id(self, client: httpx.AsyncClient) -> None:
        """An empty seed request creates a new athlete with default lifetime and scope."""
        first = (await client.post("/_control/athletes")).json()
        second = (await client.post("/_control/athletes")).json()
        assert first["athlete_id"] != second["athlete_id"]
        assert (first["expires_at"], first["scope"]) == (START + 21600, "read,activity:read_all")

    async def test_unknown_athlete_is_404(self, client: httpx.AsyncClient) -> None:
        """Control calls naming an unknown athlete answer 404."""
        assert (await client.get("/_control/athletes/999")).status_code == 404
        assert (await client.post("/_control/athletes/999/revoke")).status_code == 404

    async def test_reset_forgets_everything(self, client: httpx.AsyncClient) -> None:
        """After a reset no athlete, counter or fault remains."""
        seeded = await seed(client)
        await refresh(client, seeded["refresh_token"])
        await client.post("/_control/faults", json={"endpoint": "any", "kind": "status"})
        assert (await client.post("/_control/reset")).json() == {"reset": True}
        assert (await client.get(f"/_control/athletes/{seeded['athlete_id']}")).status_code == 404
        stats = (await client.get("/_control/stats")).json()
        assert stats == {
            "calls": dict.fromkeys(stats["calls"], 0),
            "refresh_by_athlete": {},
            "calls_by_athlete": {},
            "ledger_violations": [],
        }
        assert {"exchange", "refresh", "revoke", "athlete", "activities", "streams"} <= set(stats["calls"])
        assert (await client.get("/_control/faults")).json() == {"pending": []}


class TestMounted:
    async def test_consent_form_posts_to_the_mounted_path(self, app: FastAPI) -> None:
        """Mounted under /sandbox/strava the form posts there and the whole flow works."""
        parent = FastAPI()
        parent.mount("/sandbox/strava", app)
        async with asgi_client(parent) as client:
            page = await client.get(
                "/sandbox/strava/oauth/authorize",
                params={"client_id": SANDBOX_CLIENT_ID, "redirect_uri": "http://localhost/cb", "response_type": "code"},
            )
            assert ConsentForm(page.text).action == "/sandbox/strava/oauth/authorize"
            response = await consent(client, prefix="/sandbox/strava")
            assert response.status_code == 303
            code = query_of(response.headers["location"])["code"][0]
            body = (await exchange(client, code, path="/sandbox/strava/oauth/token")).json()
            assert HEX40.fullmatch(body["access_token"])
            stats = (await client.get("/sandbox/strava/_control/stats")).json()
            assert stats["calls"]["exchange"] == 1


class TestStandalone:
    async def test_runs_as_a_process_and_announces_its_port(self) -> None:
        """`python -m tokensvc.sandbox --port 0` prints SANDBOX_READY with a live URL and serves real HTTP."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokensvc.sandbox",
            "--port",
            "0",
            "--no-rotate",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
            match = re.fullmatch(r"SANDBOX_READY (http://127\.0\.0\.1:(\d+))\n", line)
            assert match is not None, line
            assert int(match[2]) > 0
            async with httpx.AsyncClient(base_url=match[1], timeout=10) as client:
                seeded = await seed(client)
                body = (await refresh(client, seeded["refresh_token"])).json()
                assert body["refresh_token"] == seeded["refresh_token"]
        finally:
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), timeout=30)


class TestAccessLifetime:
    async def test_every_later_refresh_mints_a_short_lived_token(self, client: httpx.AsyncClient) -> None:
        """`/_control/access-lifetime` shortens every refresh's access token, so each refresh mints a new one."""
        pair = await connect(client)
        await client.post(f"/_control/athletes/{pair['athlete']['id']}/expire", json={"expires_at": START + 60})
        response = await client.post("/_control/access-lifetime", json={"expires_in": 180})
        assert response.status_code == 200
        assert response.json() == {"expires_in": 180}
        first = (await refresh(client, pair["refresh_token"])).json()
        assert (first["expires_in"], first["expires_at"]) == (180, START + 180)
        assert first["access_token"] != pair["access_token"]
        second = (await refresh(client, first["refresh_token"])).json()
        assert second["expires_in"] == 180
        assert second["access_token"] != first["access_token"]

    async def test_reset_restores_stravas_six_hours(self, client: httpx.AsyncClient) -> None:
        """A reset forgets the knob; a non-positive lifetime is refused."""
        await client.post("/_control/access-lifetime", json={"expires_in": 180})
        await client.post("/_control/reset")
        pair = await connect(client)
        await client.post(f"/_control/athletes/{pair['athlete']['id']}/expire", json={"expires_at": START + 60})
        assert (await refresh(client, pair["refresh_token"])).json()["expires_in"] == 21600
        assert (await client.post("/_control/access-lifetime", json={"expires_in": 0})).status_code == 422


class TestNextGrant:
    async def test_only_the_next_code_exchange_gets_the_short_lifetime(self, client: httpx.AsyncClient) -> None:
        """`/_control/next-grant` shortens the next exchange's token once; later grants and refreshes are normal."""
        response = await client.post("/_control/next-grant", json={"expires_in": 600})
        assert response.status_code == 200
        assert response.json() == {"expires_in": 600}
        short = await connect(client)
        assert (short["expires_in"], short["expires_at"]) == (600, START + 600)
        refreshed = (await refresh(client, short["refresh_token"])).json()
        assert refreshed["expires_in"] == 21600
        assert refreshed["access_token"] != short["access_token"]
        later = await connect(client)
        assert later["expires_in"] == 21600

    async def test_a_failed_exchange_does_not_use_it_up_and_reset_forgets_it(self, client: httpx.AsyncClient) -> None:
        """A rejected code leaves the knob armed for the next good exchange; a reset disarms it."""
        await client.post("/_control/next-grant", json={"expires_in": 60})
        assert (await exchange(client, "0" * 40)).status_code == 400
        assert (await connect(client))["expires_in"] == 60
        await client.post("/_control/next-grant", json={"expires_in": 60})
        await client.post("/_control/reset")
        assert (await connect(client))["expires_in"] == 21600
        assert (await client.post("/_control/next-grant", json={})).status_code == 422
