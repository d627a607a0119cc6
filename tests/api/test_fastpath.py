"""The lean access-token route answers exactly as the FastAPI route does, and only when it can check everything."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import Receive, Scope, Send

from tests.api.test_tokens_api import put_user
from tests.conftest import API_KEY, FakeClock
from tests.logcapture import captured_logs
from tokensvc.api.fastpath import AccessTokenFastPath, _min_ttl
from tokensvc.app import create_app
from tokensvc.config import Settings
from tokensvc.sandbox import FaultSpec, SandboxState

FELL_THROUGH = 599


async def fell_through(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": FELL_THROUGH, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def pair(
    settings: Settings, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient]]:
    """(with the fast path, FastAPI alone, the fast path over a stub that records fall-through), one database."""
    fast = create_app(settings, clock=clock, strava_transport=strava_transport)
    slow = create_app(settings, clock=clock, strava_transport=strava_transport, fast_path=False)
    async with LifespanManager(fast) as fast_manager, LifespanManager(slow) as slow_manager:
        bare = AccessTokenFastPath(fell_through, owner=fast)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=fast_manager.app), base_url="http://t", headers=headers
            ) as with_fast,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=slow_manager.app), base_url="http://t", headers=headers
            ) as without,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=bare), base_url="http://t", headers=headers) as probe,
        ):
            yield with_fast, without, probe


def comparable(response: httpx.Response) -> tuple[int, object]:
    """Status and body, with the authorize URL's state (random per call by design) left out."""
    body = response.json()
    if isinstance(body, dict) and body.get("authorize_url"):
        body["authorize_url"] = re.sub(r"state=[^&]+", "state=…", body["authorize_url"])
    return response.status_code, body


def same(a: httpx.Response, b: httpx.Response) -> None:
    assert comparable(a) == comparable(b)
    for header in ("content-type", "cache-control", "retry-after"):
        assert a.headers.get(header) == b.headers.get(header), header


@pytest.mark.dialects("sqlite", "postgres")
class TestSameAnswers:
    async def test_valid_missing_and_reauth_users_get_the_same_answers_both_ways(
        self,
        pair: tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient],
        sandbox: SandboxState,
        clock: FakeClock,
    ) -> None:
        """200 with no-store, 409 tokens_missing, 409 reauth_required: byte-for-byte the same JSON and headers."""
        fast, slow, probe = pair
        valid = await put_user(fast, sandbox, clock, expires_in=10_000)
        dead = await put_user(fast, sandbox, clock, expires_in=-10)
        sandbox.revoke(dead.athlete_id)
        for path in (
            f"/v1/users/{valid.user_id}/access-token",
            f"/v1/users/{valid.user_id}/access-token?min_ttl=3600",
            "/v1/users/nobody/access-token?min_ttl=0",
            f"/v1/users/{dead.user_id}/access-token",
        ):
            first = await fast.get(path)
            same(first, await slow.get(path))
            assert (await probe.get(path)).status_code != FELL_THROUGH  # the lean route answered it itself

    async def test_a_strava_failure_is_the_same_503_both_ways(
        self,
        pair: tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient],
        sandbox: SandboxState,
        clock: FakeClock,
    ) -> None:
        """A due token and Strava down: 503 provider_unavailable with Retry-After from both routes."""
        fast, slow, _probe = pair
        user = await put_user(fast, sandbox, clock, expires_in=10)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=500, count=2))
        same(
            await fast.get(f"/v1/users/{user.user_id}/access-token"),
            await slow.get(f"/v1/users/{user.user_id}/access-token"),
        )


class TestRequestId:
    async def test_the_callers_id_is_echoed_and_a_missing_or_bad_one_replaced_as_on_every_route(
        self,
        pair: tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient],
        sandbox: SandboxState,
        clock: FakeClock,
    ) -> None:
        """The lean route answers X-Request-ID as RequestId does on FastAPI's routes: the caller's when it is plain,
        else one of its own."""
        fast, slow, probe = pair
        user = await put_user(fast, sandbox, clock, expires_in=10_000)
        path = f"/v1/users/{user.user_id}/access-token"
        for client in (probe, slow):
            assert (await client.get(path, headers={"X-Request-ID": "sync-job-17"})).headers["x-request-id"] == (
                "sync-job-17"
            )
            for headers in ({}, {"X-Request-ID": "not plain!"}):
                assert re.fullmatch(r"[0-9a-f]{32}", (await client.get(path, headers=headers)).headers["x-request-id"])
        assert (await probe.get(path)).status_code == 200  # answered by the lean route itself, not a fall-through
        problem = await probe.get("/v1/users/nobody/access-token", headers={"X-Request-ID": "sync-job-18"})
        assert (problem.status_code, problem.headers["x-request-id"]) == (409, "sync-job-18")

    async def test_what_the_call_logs_carries_the_callers_id(
        self,
        pair: tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient],
        sandbox: SandboxState,
        clock: FakeClock,
    ) -> None:
        """A refresh the lean route waits for logs its outcome under the request's id."""
        fast, _slow, probe = pair
        user = await put_user(fast, sandbox, clock, expires_in=10)
        with captured_logs() as logs:
            response = await probe.get(f"/v1/users/{user.user_id}/access-token", headers={"X-Request-ID": "job-99"})
        assert response.status_code == 200
        (succeeded,) = logs.events("token.refresh.succeeded")
        assert succeeded["request_id"] == "job-99"


class TestFallThrough:
    @pytest.mark.parametrize(
        ("path", "headers"),
        [
            ("/v1/users/a%20b/access-token", {}),
            ("/v1/users/" + "x" * 65 + "/access-token", {}),
            ("/v1/users/u1/access-token?min_ttl=-1", {}),
            ("/v1/users/u1/access-token?min_ttl=3601", {}),
            ("/v1/users/u1/access-token?min_ttl=soon", {}),
            ("/v1/users/u1/access-token?min_ttl=", {}),
            ("/v1/users/u1/access-token?min_ttl=0&min_ttl=0", {}),
            ("/v1/users/u1/access-token", {"Authorization": "Bearer wrong"}),
            ("/v1/users/u1/access-token", {"Authorization": ""}),
            ("/v1/users/u1/access-token", {"Authorization": f"Basic {API_KEY}"}),
        ],
    )
    async def test_what_it_cannot_check_by_hand_goes_to_fastapi_and_answers_alike(
        self,
        pair: tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient],
        path: str,
        headers: dict[str, str],
    ) -> None:
        """Bad ids, parameters and keys are not the lean route's to judge: FastAPI's 401/404/422 come back."""
        fast, slow, probe = pair
        assert (await probe.get(path, headers=headers)).status_code == FELL_THROUGH
        first = await fast.get(path, headers=headers)
        assert first.status_code in (401, 404, 422)
        same(first, await slow.get(path, headers=headers))

    async def test_other_methods_and_paths_are_not_touched(
        self, pair: tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient]
    ) -> None:
        """Only GET …/access-token is taken."""
        _fast, _slow, probe = pair
        assert (await probe.post("/v1/users/u1/access-token")).status_code == FELL_THROUGH
        assert (await probe.get("/v1/users/u1/token-status")).status_code == FELL_THROUGH
        assert (await probe.get("/v1/users/u1/access-token/extra")).status_code == FELL_THROUGH


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", 300),
        (b"min_ttl=0", 0),
        (b"min_ttl=3600", 3600),
        (b"other=1", 300),
        (b"min_ttl=1&min_ttl=2", None),
        (b"other=1&other=2", None),
        (b"min_ttl=3601", None),
        (b"min_ttl=-5", None),
        (b"min_ttl=%C2%B2", None),
        (b"min_ttl=", None),
    ],
)
def test_min_ttl_is_read_only_when_it_is_plain_digits_in_range(query: bytes, expected: int | None) -> None:
    """Anything else is left to FastAPI's validation."""
    assert _min_ttl(query) == expected
