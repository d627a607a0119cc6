"""examples/sync_worker.py's own rules, in process: events applied in `event_time` order (a create arriving after
its delete is stale), and the gateway's `Retry-After` honoured a bounded number of times. The whole path over real
processes is tests/e2e/test_sync_worker_processes.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import respx

GATEWAY = "http://tokensvc.test"
ACTIVITY_URL = f"{GATEWAY}/v1/users/u%2F1/strava/activities/7"


def load_worker() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "examples" / "sync_worker.py"
    spec = importlib.util.spec_from_file_location("sync_worker", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sync_worker"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


worker = load_worker()


def event(kind: str, event_time: int, object_id: int = 7, user_id: str = "u1") -> object:
    return worker.Event(f"msg_{kind}_{event_time}", f"strava.activity.{kind}", user_id, object_id, event_time)


class TestEventOrder:
    def test_a_create_arriving_after_its_delete_is_stale(self) -> None:
        order = worker.EventOrder()
        assert order.admit(event("deleted", 200))
        assert not order.admit(event("created", 100))
        assert not order.admit(event("created", 200))  # same second as the delete: the delete wins
        assert not order.admit(event("updated", 150))

    def test_newer_events_pass_and_objects_and_users_are_separate(self) -> None:
        order = worker.EventOrder()
        assert order.admit(event("created", 100))
        assert order.admit(event("updated", 100))  # same second, no delete: fetch again, harmless
        assert order.admit(event("updated", 101))
        assert not order.admit(event("updated", 99))
        assert order.admit(event("created", 50, object_id=8))
        assert order.admit(event("created", 50, user_id="u2"))


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


class TestFetchActivity:
    @respx.mock
    async def test_waits_retry_after_on_429_and_503_then_returns_the_activity(self, sleeps: Sleeps) -> None:
        route = respx.get(ACTIVITY_URL).mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "3"}, json={"code": "strava_rate_limited"}),
                httpx.Response(503, headers={"Retry-After": "2"}, json={"code": "provider_unavailable"}),
                httpx.Response(200, json={"id": 7, "name": "Run"}),
            ]
        )
        async with httpx.AsyncClient(base_url=GATEWAY) as http:
            response = await worker.fetch_activity(http, "u/1", 7, sleep=sleeps)
        assert response is not None
        assert response.json() == {"id": 7, "name": "Run"}
        assert sleeps.waits == [3.0, 2.0]
        assert [call.request.headers["tokensvc-priority"] for call in route.calls] == ["sync"] * 3

    @respx.mock
    async def test_gives_up_after_the_bounded_attempts(self, sleeps: Sleeps) -> None:
        route = respx.get(ACTIVITY_URL).mock(return_value=httpx.Response(429, headers={"Retry-After": "1"}))
        async with httpx.AsyncClient(base_url=GATEWAY) as http:
            assert await worker.fetch_activity(http, "u/1", 7, sleep=sleeps) is None
        assert route.call_count == worker.MAX_ATTEMPTS
        assert sleeps.waits == [1.0] * (worker.MAX_ATTEMPTS - 1)

    @respx.mock
    async def test_a_wait_beyond_the_bound_is_left_for_later_and_other_answers_are_returned(
        self, sleeps: Sleeps
    ) -> None:
        respx.get(ACTIVITY_URL).mock(return_value=httpx.Response(429, headers={"Retry-After": "40000"}))
        async with httpx.AsyncClient(base_url=GATEWAY) as http:
            assert await worker.fetch_activity(http, "u/1", 7, sleep=sleeps) is None
            respx.get(ACTIVITY_URL).mock(return_value=httpx.Response(409, json={"code": "reauth_required"}))
            refused = await worker.fetch_activity(http, "u/1", 7, sleep=sleeps)
        assert refused is not None
        assert refused.status_code == 409
        assert sleeps.waits == []

    @respx.mock
    async def test_tokensvc_unreachable_backs_off_exponentially(self, sleeps: Sleeps) -> None:
        respx.get(ACTIVITY_URL).mock(side_effect=[httpx.ConnectError("down"), httpx.Response(200, json={"id": 7})])
        async with httpx.AsyncClient(base_url=GATEWAY) as http:
            response = await worker.fetch_activity(http, "u/1", 7, sleep=sleeps)
        assert response is not None
        assert response.status_code == 200
        assert sleeps.waits == [1.0]
