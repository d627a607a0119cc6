"""The Strava API gateway over ASGI, on both databases, with the sandbox as Strava: pass-through, one refresh for
a rejected token however many calls are in flight, reauth and scope refusals, the shared windows and priorities,
the caller's headers kept back, and the body bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from asgi_lifespan import LifespanManager

from tests.conftest import API_KEY, FakeClock, Seeded, import_body, make_settings, seed_athlete
from tokensvc.app import create_app
from tokensvc.config import Settings
from tokensvc.providers.strava import seconds_to_next_window
from tokensvc.sandbox import SandboxState
from tokensvc.sandbox.activities import NewActivity
from tokensvc.sandbox.faults import FaultSpec
from tokensvc.service.gateway import JITTER_MAX_SECONDS, JITTER_MIN_SECONDS, jittered_retry_after
from tokensvc.service.oauth import ConnectLinks

WRITE_SCOPES = "read,activity:read_all,activity:write"


class Recording(httpx.AsyncBaseTransport):
    """The sandbox's transport, remembering every request that reached it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    def api_calls(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.startswith("/api/v3/")]


@pytest.fixture
def recording(strava_transport: httpx.AsyncBaseTransport) -> Recording:
    return Recording(strava_transport)


@asynccontextmanager
async def service(
    settings: Settings, clock: FakeClock, transport: httpx.AsyncBaseTransport
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, clock=clock, strava_transport=transport)
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app),
            base_url="http://tokensvc.test",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as http:
            http.app = app  # type: ignore[attr-defined]
            yield http


async def connect(
    http: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, *, scope: str = WRITE_SCOPES
) -> Seeded:
    """An athlete in the sandbox with `scope`, whose tokens tokensvc stores (valid for six hours)."""
    seeded = seed_athlete(sandbox, clock, expires_in=21_600)
    athlete = sandbox.create_athlete(seeded.athlete_id, expires_in=21_600, scope=scope)
    seeded = seeded.with_pair(athlete)
    body = import_body(seeded).model_dump() | {"scopes": scope.split(",")}
    response = await http.put(f"/v1/users/{seeded.user_id}/tokens", json=body)
    assert response.status_code == 200, response.text
    return seeded


def gateway(seeded: Seeded, path: str) -> str:
    return f"/v1/users/{seeded.user_id}/strava/{path}"


def api_calls(sandbox: SandboxState) -> int:
    stats: dict[str, Any] = sandbox.stats()
    return sum(n for kind, n in stats["calls"].items() if kind in ("athlete", "activities", "activity", "streams"))


class TestPassThrough:
    async def test_a_get_list_comes_back_as_strava_sent_it(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Status, JSON body, content type and rate headers are Strava's; the query string is forwarded."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            for name in ("first", "second", "third"):
                sandbox.upload_activity(seeded.athlete_id, NewActivity(name=name))
            response = await http.get(gateway(seeded, "athlete/activities"), params={"per_page": "2"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert len(response.json()) == 2
        assert "x-ratelimit-limit" in response.headers
        assert "x-readratelimit-usage" in response.headers
        (sent,) = recording.api_calls()
        assert sent.url.path == "/api/v3/athlete/activities"
        assert sent.url.params["per_page"] == "2"
        assert sent.headers["authorization"] == f"Bearer {seeded.access_token}"

    async def test_a_put_changes_the_activity(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """A PUT's JSON body reaches Strava and Strava's answer comes back."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            activity = sandbox.upload_activity(seeded.athlete_id, NewActivity(name="before"))
            response = await http.put(gateway(seeded, f"activities/{activity['id']}"), json={"name": "after"})
            again = await http.get(gateway(seeded, f"activities/{activity['id']}"))
        assert response.status_code == 200, response.text
        assert response.json()["name"] == "after"
        assert again.json()["name"] == "after"

    async def test_strava_refusals_other_than_401_pass_through(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Strava's own 404 (no such activity) is the caller's answer, body and all."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            response = await http.get(gateway(seeded, "activities/999999"))
        assert response.status_code == 404
        assert response.json()["message"] == "Record Not Found"


@pytest.mark.dialects("sqlite", "postgres")
class TestRejectedToken:
    async def test_concurrent_calls_share_exactly_one_refresh(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Strava invalidates the token early: 20 calls in flight at once → one refresh, every call answered 200."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            sandbox.invalidate_access(seeded.athlete_id)
            answers = await asyncio.gather(*(http.get(gateway(seeded, "athlete")) for _ in range(20)))
            later = await http.get(gateway(seeded, "athlete"))
        assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers if a.status_code != 200]
        assert later.status_code == 200
        assert sandbox.stats()["refresh_by_athlete"][str(seeded.athlete_id)] == 1

    async def test_a_dead_refresh_token_is_reauth_required(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """The athlete revoked access: the refresh is refused → 409 reauth_required with an authorize_url."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            sandbox.revoke(seeded.athlete_id)
            response = await http.get(gateway(seeded, "athlete"))
            status = await http.get(f"/v1/users/{seeded.user_id}/token-status")
        assert response.status_code == 409, response.text
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["code"] == "reauth_required"
        assert body["needs_reauth"] is True
        assert body["authorize_url"]
        assert status.json()["status"] == "needs_reauth"


class TestMissingScope:
    async def test_a_missing_permission_is_403_naming_the_scope(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """A `read`-only grant lists activities → 403 insufficient_scope, no refresh, and an authorize_url asking
        for the stored scopes plus the missing one."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock, scope="read")
            response = await http.get(gateway(seeded, "athlete/activities"))
            links: ConnectLinks = http.app.state.connect_links  # type: ignore[attr-defined]
        assert response.status_code == 403, response.text
        body = response.json()
        assert body["code"] == "insufficient_scope"
        assert body["missing_scope"] == "activity:read_all"
        ticket = parse_qs(urlsplit(body["authorize_url"]).query)["ticket"][0]
        assert links.read_ticket(ticket) == (seeded.user_id, ["activity:read_all", "read"])
        assert len(recording.api_calls()) == 1
        assert sandbox.stats()["refresh_by_athlete"].get(str(seeded.athlete_id), 0) == 0


@pytest.mark.dialects("sqlite", "postgres")
class TestBudget:
    async def test_a_spent_read_window_is_429_and_reaches_no_strava(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Read window of 3 (interactive may spend all of it): the fourth GET is 429 with Retry-After, unsent."""
        settings = make_settings(database_url, strava_read_rate_limit="3,1000")
        async with service(settings, clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            priority = {"Tokensvc-Priority": "interactive"}
            passed = [await http.get(gateway(seeded, "athlete"), headers=priority) for _ in range(3)]
            refused = await http.get(gateway(seeded, "athlete"), headers=priority)
        assert [r.status_code for r in passed] == [200, 200, 200]
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "strava_rate_limited"
        # Until the window resets, plus a jitter (a tenth, 5 to 30 s) so callers spread out.
        reset = seconds_to_next_window(clock())
        assert reset <= int(refused.headers["retry-after"]) <= reset + min(30, max(5, reset // 10))
        assert refused.json()["retry_after"] == int(refused.headers["retry-after"])
        assert len(recording.api_calls()) == 3
        assert api_calls(sandbox) == 3

    async def test_refused_callers_are_told_different_moments_never_before_the_reset(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """30 callers refused in the same second, 10 s before the reset: every Retry-After is at or after the
        reset and within its spread (at least 5 s), and they do not all name the same second."""
        settings = make_settings(database_url, strava_read_rate_limit="1,1000")
        clock.now = clock.now - clock.now % 900 + 890
        async with service(settings, clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            priority = {"Tokensvc-Priority": "interactive"}
            assert (await http.get(gateway(seeded, "athlete"), headers=priority)).status_code == 200
            refused = [await http.get(gateway(seeded, "athlete"), headers=priority) for _ in range(30)]
        assert {r.status_code for r in refused} == {429}
        waits = [int(r.headers["retry-after"]) for r in refused]
        assert all(10 <= wait <= 10 + JITTER_MIN_SECONDS for wait in waits), waits
        assert len(set(waits)) > 1, waits
        assert len(recording.api_calls()) == 1

    async def test_backfill_stops_at_half_the_window_while_interactive_passes(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Read window of 4: backfill gets 2, the third backfill is refused, an interactive call still passes."""
        settings = make_settings(database_url, strava_read_rate_limit="4,1000")
        async with service(settings, clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            backfill = {"Tokensvc-Priority": "backfill"}
            first = [await http.get(gateway(seeded, "athlete"), headers=backfill) for _ in range(2)]
            refused = await http.get(gateway(seeded, "athlete"), headers=backfill)
            interactive = await http.get(gateway(seeded, "athlete"), headers={"Tokensvc-Priority": "interactive"})
        assert [r.status_code for r in first] == [200, 200]
        assert refused.status_code == 429
        assert interactive.status_code == 200
        assert len(recording.api_calls()) == 3

    async def test_stravas_429_holds_the_window(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Strava's own read window is spent (another client of the app): its 429 becomes ours, and the next
        call is refused without reaching Strava."""
        sandbox.rate.configure(read_limit_15min=1)
        sandbox.rate.hit(clock(), read=True)  # spent by another client of the app: our budget cannot know
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            limited = await http.get(gateway(seeded, "athlete"))
            held = await http.get(gateway(seeded, "athlete"), headers={"Tokensvc-Priority": "interactive"})
        assert limited.status_code == 429, limited.text
        assert limited.json()["code"] == "strava_rate_limited"
        assert held.status_code == 429
        assert int(held.headers["retry-after"]) >= 1
        assert len(recording.api_calls()) == 1

    async def test_an_unknown_priority_is_422(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            response = await http.get(gateway(seeded, "athlete"), headers={"Tokensvc-Priority": "urgent"})
        assert response.status_code == 422
        assert recording.api_calls() == []


class TestWhatIsForwarded:
    async def test_the_callers_headers_cookies_and_key_stay_behind(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Only Content-Type, Accept and If-None-Match go on; Authorization is the user's token."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            response = await http.get(
                gateway(seeded, "athlete"),
                headers={
                    "Accept": "application/json",
                    "If-None-Match": '"abc"',
                    "Cookie": "session=secret-cookie",
                    "X-Forwarded-For": "10.0.0.1",
                    "X-Custom": "app-internal",
                },
            )
        assert response.status_code == 200
        (sent,) = recording.api_calls()
        assert sent.headers["authorization"] == f"Bearer {seeded.access_token}"
        assert sent.headers["accept"] == "application/json"
        assert sent.headers["if-none-match"] == '"abc"'
        for name in ("cookie", "x-forwarded-for", "x-custom"):
            assert name not in sent.headers
        assert API_KEY not in str(sent.headers)

    @pytest.mark.parametrize("path", ["oauth/token", "OAuth/deauthorize", "activities/..%2F..%2Foauth%2Ftoken"])
    async def test_paths_that_climb_or_reach_oauth_are_404(
        self, path: str, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            response = await http.post(gateway(seeded, path))
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"
        assert recording.api_calls() == []


class TestBodyBound:
    @pytest.mark.parametrize("declared", [True, False])
    async def test_a_body_over_the_bound_is_413_and_unsent(
        self, declared: bool, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Over TOKENSVC_GATEWAY_MAX_BODY_BYTES, declared or streamed (chunked): 413, nothing reaches Strava."""
        settings = make_settings(database_url, gateway_max_body_bytes=2048)
        payload = b'{"name": "' + b"x" * 4096 + b'"}'

        async def chunked() -> AsyncIterator[bytes]:
            for start in range(0, len(payload), 1000):
                yield payload[start : start + 1000]

        async with service(settings, clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            activity = sandbox.upload_activity(seeded.athlete_id, NewActivity())
            response = await http.put(
                gateway(seeded, f"activities/{activity['id']}"),
                content=payload if declared else chunked(),
                headers={"Content-Type": "application/json"},
            )
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "payload_too_large"
        assert recording.api_calls() == []

    async def test_a_body_over_64_kib_within_the_bound_goes_through(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """The service's 64 KiB limit does not apply to the gateway (Strava gets the whole body)."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            activity = sandbox.upload_activity(seeded.athlete_id, NewActivity())
            description = "d" * 9000
            body = {"name": "big", "description": description, "padding": "p" * 100_000}
            response = await http.put(gateway(seeded, f"activities/{activity['id']}"), json=body)
        assert response.status_code in (200, 400), response.text
        (sent,) = recording.api_calls()
        assert int(sent.headers["content-length"]) > 100_000


class TestStravaFailing:
    async def test_a_5xx_from_strava_is_503_with_retry_after(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """Strava's own failure is not passed through as such: 503 provider_unavailable, Retry-After."""
        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            sandbox.add_fault(FaultSpec(endpoint="athlete", kind="status", status=502))
            response = await http.get(gateway(seeded, "athlete"))
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "provider_unavailable"
        assert int(response.headers["retry-after"]) >= 1


class TestRetryAfterJitter:
    @pytest.mark.parametrize("seconds", [0, 1, 10, 60, 300, 899, 86_399])
    def test_never_before_the_reset_and_spread_over_a_tenth_of_5_to_30_seconds(self, seconds: int) -> None:
        """Drawn 400 times: never below the wait (at least 1 s), never beyond its spread, and more than one value."""
        base = max(1, seconds)
        spread = min(JITTER_MAX_SECONDS, max(JITTER_MIN_SECONDS, base // 10))
        draws = [jittered_retry_after(seconds) for _ in range(400)]
        assert min(draws) >= base
        assert max(draws) <= base + spread
        assert len(set(draws)) > spread // 2


class TestMetrics:
    async def test_calls_are_counted_by_outcome(
        self, database_url: str, clock: FakeClock, sandbox: SandboxState, recording: Recording
    ) -> None:
        """`tokensvc_gateway_calls_total` grows by outcome: a served call `ok`, a scope refusal `scope`."""

        def count(text: str, outcome: str) -> float:
            prefix = f'tokensvc_gateway_calls_total{{outcome="{outcome}"}} '
            return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))

        async with service(make_settings(database_url), clock, recording) as http:
            seeded = await connect(http, sandbox, clock)
            narrow = await connect(http, sandbox, clock, scope="read")
            before = (await http.get("/metrics")).text
            assert (await http.get(gateway(seeded, "athlete"))).status_code == 200
            assert (await http.get(gateway(narrow, "athlete/activities"))).status_code == 403
            after = (await http.get("/metrics")).text
        assert count(after, "ok") == count(before, "ok") + 1
        assert count(after, "scope") == count(before, "scope") + 1
