"""The sandbox's application limits: Strava's rate windows (overall and read) and its athlete capacity."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from tests.sandbox.test_sandbox import FakeClock, asgi_client, connect, consent, error_of, exchange, query_of, seed
from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET
from tokensvc.sandbox import create_sandbox_app

RATE_LIMITED = (429, "Rate Limit Exceeded", "Application", "rate limit", "exceeded")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock) -> FastAPI:
    return create_sandbox_app(clock=clock)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class TestReadWindows:
    async def test_stravas_default_read_limit_refuses_the_101st_get(self, client: httpx.AsyncClient) -> None:
        """At defaults, 100 GETs fit a quarter hour; the 101st is 429 with Strava's body, and still counted."""
        token = (await seed(client, expires_in=86400))["access_token"]
        statuses = [(await client.get("/api/v3/athlete", headers=bearer(token))).status_code for _ in range(100)]
        assert set(statuses) == {200}
        refused = await client.get("/api/v3/athlete/activities", headers=bearer(token))
        assert error_of(refused) == RATE_LIMITED
        assert refused.headers["X-ReadRateLimit-Usage"] == "101,101"
        assert refused.headers["X-RateLimit-Usage"] == "101,101"
        assert (refused.headers["X-RateLimit-Limit"], refused.headers["X-ReadRateLimit-Limit"]) == (
            "200,2000",
            "100,1000",
        )

    async def test_writes_spend_only_the_overall_window(self, client: httpx.AsyncClient) -> None:
        """A PUT or a deauthorize takes an overall unit but no read unit; a spent read window does not stop it."""
        seeded = await seed(client, expires_in=86400, scope="activity:read_all,activity:write")
        await client.post("/_control/rate-limit", json={"read_limit_15min": 1})
        activity = (await client.post(f"/_control/athletes/{seeded['athlete_id']}/activities", json={})).json()
        token = seeded["access_token"]
        assert (await client.get(f"/api/v3/activities/{activity['id']}", headers=bearer(token))).status_code == 200
        assert (await client.get(f"/api/v3/activities/{activity['id']}", headers=bearer(token))).status_code == 429
        put = await client.put(f"/api/v3/activities/{activity['id']}", json={"name": "x"}, headers=bearer(token))
        assert put.status_code == 200
        assert (put.headers["X-RateLimit-Usage"], put.headers["X-ReadRateLimit-Usage"]) == ("3,3", "2,2")

    async def test_read_window_resets_at_the_quarter_hour(self, client: httpx.AsyncClient, clock: FakeClock) -> None:
        """A spent read window opens again at the next :00/:15/:30/:45 by the sandbox's clock."""
        token = (await seed(client, expires_in=86400))["access_token"]
        await client.post("/_control/rate-limit", json={"read_limit_15min": 1, "read_limit_daily": 10})
        assert (await client.get("/api/v3/athlete", headers=bearer(token))).status_code == 200
        clock.advance(899)
        assert (await client.get("/api/v3/athlete", headers=bearer(token))).status_code == 429
        clock.advance(1)
        response = await client.get("/api/v3/athlete", headers=bearer(token))
        assert (response.status_code, response.headers["X-ReadRateLimit-Usage"]) == (200, "1,3")

    async def test_every_api_answer_carries_the_headers_and_token_calls_none(self, client: httpx.AsyncClient) -> None:
        """401s, 404s, streams and revokes carry all four headers; /oauth/token answers carry none."""
        seeded = await seed(client, expires_in=86400)
        token = seeded["access_token"]
        answers = [
            await client.get("/api/v3/athlete", headers=bearer("0" * 40)),
            await client.get("/api/v3/activities/5", headers=bearer(token)),
            await client.get("/api/v3/athlete/activities", headers=bearer(token)),
            await client.post(
                "/oauth/revoke", data={"token": "nothing"}, auth=(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET)
            ),
        ]
        for answer in answers:
            for name in ("X-RateLimit-Limit", "X-RateLimit-Usage", "X-ReadRateLimit-Limit", "X-ReadRateLimit-Usage"):
                assert name in answer.headers, (answer.request.url, name)
        code = query_of((await consent(client)).headers["location"])["code"][0]
        token_answer = await exchange(client, code)
        assert token_answer.status_code == 200
        assert not [h for h in token_answer.headers if h.lower().startswith(("x-ratelimit", "x-readratelimit"))]

    async def test_command_line_flags_set_the_limits(self) -> None:
        """`--rate-limit` and `--read-rate-limit` set the windows of a standalone sandbox; a bad value exits 2."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokensvc.sandbox",
            "--port",
            "0",
            "--rate-limit",
            "3,30",
            "--read-rate-limit",
            "2,20",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
            match = re.fullmatch(r"SANDBOX_READY (\S+)\n", line)
            assert match is not None, line
            async with httpx.AsyncClient(base_url=match[1], timeout=10) as http:
                token = (await seed(http))["access_token"]
                statuses = [(await http.get("/api/v3/athlete", headers=bearer(token))).status_code for _ in range(3)]
                assert statuses == [200, 200, 429]
                assert (await http.get("/_control/rate-limit")).json() == {
                    "limit_15min": 3,
                    "limit_daily": 30,
                    "read_limit_15min": 2,
                    "read_limit_daily": 20,
                }
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), timeout=30)
        bad = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokensvc.sandbox", "--rate-limit", "lots", stderr=subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(bad.communicate(), timeout=30)
        assert bad.returncode == 2
        assert b"200,2000" in stderr


class TestCapacity:
    async def test_exchange_beyond_capacity_is_403_and_reconnects_still_work(self, client: httpx.AsyncClient) -> None:
        """With capacity 1, a second athlete's exchange is 403 "Limit of connected athletes exceeded"; the connected
        athlete may reconnect, and a revocation frees the slot."""
        assert (await client.post("/_control/capacity", json={"athlete_capacity": 1})).json() == {
            "athlete_capacity": 1,
            "connected": 0,
        }
        first = await connect(client, athlete_id=501)
        code = query_of((await consent(client, athlete_id=502)).headers["location"])["code"][0]
        refused = await exchange(client, code)
        assert error_of(refused) == (403, "Limit of connected athletes exceeded", "Athlete", "", "limit exceeded")
        assert (await client.get("/_control/athletes/502")).status_code == 404
        again = await connect(client, athlete_id=501)
        assert again["refresh_token"] != first["refresh_token"]
        await client.post("/_control/athletes/501/revoke")
        assert (await connect(client, athlete_id=502))["athlete"]["id"] == 502

    async def test_unlimited_by_default_and_settable_at_start(self, clock: FakeClock) -> None:
        """No capacity unless configured; `athlete_capacity=` (`--athlete-capacity`) sets one from the start."""
        async with asgi_client(create_sandbox_app(clock=clock)) as unlimited:
            for n in range(3):
                await connect(unlimited, athlete_id=600 + n)
            assert (await unlimited.get("/_control/capacity")).json() == {"athlete_capacity": None, "connected": 3}
        async with asgi_client(create_sandbox_app(clock=clock, athlete_capacity=0)) as closed:
            code = query_of((await consent(closed)).headers["location"])["code"][0]
            assert (await exchange(closed, code)).status_code == 403
            await closed.post("/_control/reset")
            assert (await closed.get("/_control/capacity")).json()["athlete_capacity"] == 0
