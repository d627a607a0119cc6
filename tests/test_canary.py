"""Canary scan (RELIABILITY.md I5): drive every token path, then look for every token anywhere but the one
response meant to carry it. On SQLite and Postgres.

Tokens looked for: everything the sandbox minted (40 hex characters, which the log redactor would also catch) and
canaries the test imports itself, shaped so the redactor does not recognise them: those prove the plan, not the
safety net. To scan another source (the dashboard page, delivered notifications), add one entry to `SOURCES`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from tests.conftest import FakeClock, make_settings, seed_athlete
from tests.logcapture import CapturedLogs, captured_logs
from tokensvc.app import notification_deliverer
from tokensvc.config import Settings
from tokensvc.models import gateway_counts, notifications, revocation_tombstones, strava_webhook_events, token_events
from tokensvc.sandbox import FaultSpec, SandboxState
from tokensvc.sandbox.activities import NewActivity

pytestmark = pytest.mark.dialects("sqlite", "postgres")


@pytest.fixture
def settings(database_url: str) -> Settings:
    """With a notification URL, so the outbox is written too."""
    return make_settings(database_url, notify_url="http://app.test/hooks", notify_secret=SecretStr("whsec_" + "c" * 32))


@dataclass
class Run:
    client: httpx.AsyncClient
    logs: CapturedLogs
    users: list[str]
    clock: FakeClock
    bodies: list[str] = field(default_factory=list)  # every response body except access tokens handed out
    handed_out: list[str] = field(default_factory=list)  # access tokens the service returned, as it should
    imported: list[str] = field(default_factory=list)  # canaries the test sent in

    def canary(self, kind: str) -> str:
        token = f"canary-{kind}-{uuid.uuid4()}"  # not hex: the log redactor's pattern does not match it
        self.imported.append(token)
        return token


Source = Callable[[Run], Awaitable[str]]


async def _logs(run: Run) -> str:
    return run.logs.text


async def _metrics(run: Run) -> str:
    return (await run.client.get("/metrics")).text


def _table(table: sa.Table) -> Source:
    async def dump(run: Run) -> str:
        engine = run.client.app.state.engine  # type: ignore[attr-defined]
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(table))).all()
        assert rows, f"{table.name} is empty: the scenario did not exercise it"
        return "\n".join(repr(tuple(row)) for row in rows)

    return dump


async def _api_reads(run: Run) -> str:
    paths = ["/v1/stats", "/v1/tokens"] + [
        path for user in run.users for path in (f"/v1/users/{user}/events", f"/v1/users/{user}/token-status")
    ]
    return "\n".join([(await run.client.get(path)).text for path in paths])


async def _bodies(run: Run) -> str:
    return "\n".join(run.bodies)


async def _dashboard(run: Run) -> str:
    response = await run.client.get("/dashboard")  # the client's API key signs in, as a script would
    assert response.status_code == 200, response.text
    return response.text


async def _delivered(run: Run) -> str:
    """Every notification as the app's receiver gets it: headers and body."""
    received: list[str] = []

    def receive(request: httpx.Request) -> httpx.Response:
        received.append(f"{dict(request.headers)!r} {request.content.decode()}")
        return httpx.Response(204)

    app = run.client.app  # type: ignore[attr-defined]
    deliverer = notification_deliverer(
        app.state.settings, app.state.engine, clock=run.clock, transport=httpx.MockTransport(receive)
    )
    assert deliverer is not None
    run.clock.advance(2 * 3600)  # past any backoff the app's own deliverer (receiver unreachable) may have set
    while (await deliverer.deliver_due()).delivered:
        pass
    assert received, "no notification was delivered"
    return "\n".join(received)


SOURCES: dict[str, Source] = {
    "logs": _logs,
    "metrics": _metrics,
    "token_events": _table(token_events),
    "notifications": _table(notifications),  # forwarded Strava events included
    "revocation_tombstones": _table(revocation_tombstones),
    "webhook_events": _table(strava_webhook_events),
    "gateway_counts": _table(gateway_counts),
    "api responses": _api_reads,
    "error and other bodies": _bodies,
    "dashboard": _dashboard,
    "delivered notifications": _delivered,
}


Call = Callable[..., Awaitable[httpx.Response]]


async def drive(client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, run: Run) -> None:
    async def call(method: str, path: str, **kwargs: object) -> httpx.Response:
        response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
        if path.endswith("/access-token") and response.status_code == 200:
            run.handed_out.append(response.json()["access_token"])
        elif "/strava/" in path:  # a gateway answer: what the service adds may be in any header too
            run.bodies.append(f"{response.headers.multi_items()!r} {response.text}")
        else:
            run.bodies.append(response.text)
        return response

    def body(access: str, refresh: str, expires_at: int, athlete_id: int) -> dict[str, object]:
        return {"access_token": access, "refresh_token": refresh, "expires_at": expires_at, "athlete_id": athlete_id}

    # 1. import sandbox-issued tokens, refresh them (rotation), hand out the new access token, delete (deauthorize)
    good = seed_athlete(sandbox, clock, expires_in=600)
    assert (
        await call(
            "PUT",
            f"/v1/users/{good.user_id}/tokens",
            json=body(good.access_token, good.refresh_token, good.expires_at, good.athlete_id),
        )
    ).status_code == 200
    assert (await call("POST", f"/v1/users/{good.user_id}/refresh")).status_code == 200
    assert (await call("GET", f"/v1/users/{good.user_id}/access-token")).status_code == 200
    assert (await call("GET", f"/v1/users/{good.user_id}/access-token", params={"min_ttl": "+60"})).status_code == 200

    # 2. a transient failure (Strava 500), then a lost answer
    flaky = seed_athlete(sandbox, clock, expires_in=600)
    await call(
        "PUT",
        f"/v1/users/{flaky.user_id}/tokens",
        json=body(flaky.access_token, flaky.refresh_token, flaky.expires_at, flaky.athlete_id),
    )
    sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=500))
    assert (await call("POST", f"/v1/users/{flaky.user_id}/refresh")).status_code == 503
    sandbox.add_fault(FaultSpec(endpoint="refresh", kind="malformed"))
    assert (await call("POST", f"/v1/users/{flaky.user_id}/refresh?force=true")).status_code == 503

    # 3. canary tokens Strava never issued: the refresh is rejected → needs_reauth (audit row and notification)
    dead = f"canary-user-{uuid.uuid4().hex[:8]}"
    canaries = (run.canary("access"), run.canary("refresh"))
    await call("PUT", f"/v1/users/{dead}/tokens", json=body(*canaries, int(clock()) + 120, 4242))
    assert (await call("POST", f"/v1/users/{dead}/refresh")).status_code == 409
    assert (await call("GET", f"/v1/users/{dead}/access-token")).status_code == 409
    # and recovery through a new import (a `token.recovered` notification)
    await call(
        "PUT",
        f"/v1/users/{dead}/tokens",
        json=body(run.canary("access"), run.canary("refresh"), int(clock()) + 7200, 4242),
    )

    # 4. bad input carrying a token: the 422 must not echo it
    bad = run.canary("access")
    await call("PUT", f"/v1/users/{dead}/tokens", json={"access_token": bad, "refresh_token": bad, "expires_at": "x"})
    await call("PUT", "/v1/users/bad%20id/tokens", json=body(bad, bad, 1, 1))

    # 5. the gateway and forwarded events, the canary user's tokens included
    synced = await drive_gateway(call, sandbox, clock, dead=dead)

    # 6. delete: revoke at Strava and a `token.revoked` notification
    assert (await call("DELETE", f"/v1/users/{good.user_id}/tokens")).status_code == 204

    # 7. delete while Strava's revoke is down: the grant waits in a revocation tombstone (still encrypted)
    buried = f"canary-gone-{uuid.uuid4().hex[:8]}"
    await call("PUT", f"/v1/users/{buried}/tokens", json=body(*canaries_pair(run), int(clock()) + 7200, 4343))
    sandbox.add_fault(FaultSpec(endpoint="revoke", kind="status", status=503))
    assert (await call("DELETE", f"/v1/users/{buried}/tokens")).status_code == 204
    run.users += [good.user_id, flaky.user_id, dead, buried, *synced]


def canaries_pair(run: Run) -> tuple[str, str]:
    return run.canary("access"), run.canary("refresh")


async def drive_gateway(call: Call, sandbox: SandboxState, clock: FakeClock, *, dead: str) -> list[str]:
    """Gateway calls of every kind (served, after a rejected access token and its refresh, a missing scope, the
    canary user's rejected tokens, a refused path), then Strava events forwarded to the app and a deauthorization
    check armed. Returns the users it connected."""
    users = []
    for scope in ("read,activity:read_all,activity:write", "read"):
        seeded = seed_athlete(sandbox, clock, expires_in=21_600)
        pair = sandbox.create_athlete(seeded.athlete_id, expires_in=21_600, scope=scope)
        body: dict[str, object] = {"access_token": pair["access_token"], "refresh_token": pair["refresh_token"]}
        body |= {"expires_at": pair["expires_at"], "athlete_id": seeded.athlete_id, "scopes": scope.split(",")}
        assert (await call("PUT", f"/v1/users/{seeded.user_id}/tokens", json=body)).status_code == 200
        users.append((seeded.user_id, seeded.athlete_id))
    (synced, athlete), (narrow, narrow_athlete) = users
    activity = sandbox.upload_activity(athlete, NewActivity(name="canary ride"))
    assert (await call("GET", f"/v1/users/{synced}/strava/athlete")).status_code == 200
    sandbox.invalidate_access(athlete)  # the next call is refused once, refreshed, and retried
    assert (await call("GET", f"/v1/users/{synced}/strava/activities/{activity['id']}")).status_code == 200
    put = await call("PUT", f"/v1/users/{synced}/strava/activities/{activity['id']}", json={"name": "renamed"})
    assert put.status_code == 200
    assert (await call("GET", f"/v1/users/{narrow}/strava/athlete/activities")).status_code == 403
    assert (await call("GET", f"/v1/users/{dead}/strava/athlete")).status_code == 409
    assert (await call("GET", f"/v1/users/{synced}/strava/oauth/token")).status_code == 404
    event = {"object_type": "activity", "object_id": activity["id"], "aspect_type": "update", "owner_id": athlete}
    event |= {"subscription_id": 1, "event_time": int(clock()), "updates": {"title": "renamed"}}
    for sent in (event, event | {"aspect_type": "create", "updates": {}}):
        assert (await call("POST", "/v1/webhooks/strava", json=sent)).status_code == 200
    deauthorization = event | {"object_type": "athlete", "object_id": narrow_athlete, "owner_id": narrow_athlete}
    deauthorization |= {"updates": {"authorized": "false"}}
    assert (await call("POST", "/v1/webhooks/strava", json=deauthorization)).status_code == 200
    assert (await call("GET", "/v1/stats")).status_code == 200  # writes this replica's gateway counts
    return [synced, narrow]


@pytest.mark.parametrize("source", list(SOURCES))
async def test_no_token_appears_anywhere_but_the_access_token_response(
    client: httpx.AsyncClient, sandbox: SandboxState, clock: FakeClock, source: str
) -> None:
    """Zero hits for any token, issued or imported, in every scanned source."""
    with captured_logs() as logs:
        run = Run(client=client, logs=logs, users=[], clock=clock)
        await drive(client, sandbox, clock, run)
        scanned = await SOURCES[source](run)

    issued = sandbox.issued_tokens()
    tokens = set(issued) | set(run.handed_out) | set(run.imported)
    assert len(issued) >= 6
    assert len(run.imported) == 7
    # Positive control: the scan finds a token where one belongs (the access-token response).
    assert any(token in run.handed_out for token in issued)
    assert scanned.strip(), f"{source}: nothing to scan"
    assert logs.events("request.completed"), "the log capture saw nothing"
    hits = sorted(hashlib.sha256(token.encode()).hexdigest()[:12] for token in tokens if token in scanned)
    assert not hits, f"{source}: tokens found (sha256 prefixes) {hits}"
