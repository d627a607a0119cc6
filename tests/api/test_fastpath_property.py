"""Generated requests: the lean access-token route and the FastAPI route answer byte for byte alike (SQLite).

Each input (a method, a user id, a query, an Authorization and an X-Request-ID header, each drawn from valid and
invalid values) goes to the app with the fast path, to the app without it, and to the fast path over a stub that
records a fall-through. The two apps must give the same status, headers that matter and body bytes; and the lean
route must answer exactly the requests it is documented to check by hand (api/fastpath.py), so a fast path that
stopped answering, or that answered what it cannot judge, fails here too.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urlencode

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.api.test_fastpath import FELL_THROUGH, fell_through
from tests.api.test_tokens_api import put_user
from tests.conftest import API_KEY, FakeClock, make_settings
from tokensvc.api.fastpath import AccessTokenFastPath
from tokensvc.app import create_app
from tokensvc.sandbox import SandboxState

USER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
HEADERS_THAT_MATTER = ("content-type", "content-length", "cache-control", "retry-after", "www-authenticate", "allow")
T = TypeVar("T")
STATE = re.compile(rb"state=[^&\"]+")  # the authorize URL's OAuth state is random per call by design


@dataclass(frozen=True)
class Routes:
    fast: httpx.AsyncClient  # the app with the fast path
    slow: httpx.AsyncClient  # the app without it: FastAPI alone
    probe: httpx.AsyncClient  # the fast path over a stub that answers FELL_THROUGH
    seeded: dict[str, str]  # KNOWN_USERS' names to the seeded users' ids


@pytest.fixture
async def routes(
    sqlite_url: str, clock: FakeClock, sandbox: SandboxState, strava_transport: httpx.AsyncBaseTransport
) -> AsyncIterator[Routes]:
    """Both apps on one SQLite database (the routes' equality does not depend on the dialect), with a valid user,
    one due for a refresh, one whose grant Strava revoked, and no default headers on the clients."""
    settings = make_settings(sqlite_url)
    fast_app = create_app(settings, clock=clock, strava_transport=strava_transport)
    slow_app = create_app(settings, clock=clock, strava_transport=strava_transport, fast_path=False)
    async with LifespanManager(fast_app) as fast_manager, LifespanManager(slow_app) as slow_manager:
        apps = (fast_manager.app, slow_manager.app, AccessTokenFastPath(fell_through, owner=fast_app))
        async with AsyncExitStack() as stack:
            fast, slow, probe = [
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
                )
                for app in apps
            ]
            admin = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=slow_manager.app),
                    base_url="http://t",
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
            )
            valid = await put_user(admin, sandbox, clock, expires_in=10_000)  # never refreshed: min_ttl <= 3600
            due = await put_user(admin, sandbox, clock, expires_in=10)  # refreshed on its first call, then valid
            dead = await put_user(admin, sandbox, clock, expires_in=-10)  # Strava refuses it: reauth_required
            sandbox.revoke(dead.athlete_id)
            for user in (due, dead):  # settled first, so that the order of the calls below cannot matter
                await admin.get(f"/v1/users/{user.user_id}/access-token")
            seeded = {"valid": valid.user_id, "due": due.user_id, "dead": dead.user_id}
            yield Routes(fast, slow, probe, seeded)


@dataclass(frozen=True)
class Call:
    method: str
    user_id: str
    query: list[tuple[str, str]]
    authorization: str | None
    request_id: str | None

    @property
    def url(self) -> str:
        # A segment of only dots is encoded, or the client would resolve it (`/users/../` is no user id at all).
        segment = "%2E" * len(self.user_id) if self.user_id in (".", "..") else quote(self.user_id, safe="")
        path = f"/v1/users/{segment}/access-token"
        return f"{path}?{urlencode(self.query)}" if self.query else path

    @property
    def headers(self) -> dict[str, str]:
        named = {"Authorization": self.authorization, "X-Request-ID": self.request_id}
        return {name: value for name, value in named.items() if value is not None}

    def lean_route_takes_it(self) -> bool:
        """What api/fastpath.py documents it answers itself: GET, a well-formed id, no parameter given twice,
        a `min_ttl` (if any) of plain digits in 0..3600, and `Bearer <a valid key>` (the scheme in any case)."""
        names = [name for name, _ in self.query]
        min_ttl = [value for name, value in self.query if name == "min_ttl"]
        return (
            self.method == "GET"
            and USER_ID.fullmatch(self.user_id) is not None
            and len(names) == len(set(names))
            and all(value.isascii() and value.isdigit() and int(value) <= 3600 for value in min_ttl)
            and _bearer(self.authorization) == API_KEY
        )


def _bearer(authorization: str | None) -> str | None:
    scheme, _, credential = (authorization or "").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else None


def mostly(valid: st.SearchStrategy[T], invalid: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Three draws in four from `valid`, so that a fair share of the calls reaches the lean route."""
    return st.sampled_from([valid, valid, valid, invalid]).flatmap(lambda chosen: chosen)


KNOWN_USERS = ["valid", "due", "dead", "nobody"]  # replaced by the seeded users' ids in the test
user_ids = mostly(
    mostly(st.sampled_from(KNOWN_USERS), st.from_regex(USER_ID, fullmatch=True)),
    st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=70),
)
plain_min_ttls = st.integers(min_value=0, max_value=3600).map(str)
min_ttls = mostly(
    plain_min_ttls,
    st.one_of(
        st.integers(min_value=-5, max_value=3605).map(str),
        st.sampled_from(["", "0300", "+5", " 5", "5.0", "1e3", "\u0665", "soon", "99999999999999"]),
    ),
)
queries = mostly(
    st.lists(st.tuples(st.just("min_ttl"), plain_min_ttls), max_size=1),
    st.lists(st.tuples(st.sampled_from(["min_ttl", "min_ttl", "force", "other"]), min_ttls), max_size=3),
)
authorizations = mostly(
    st.sampled_from([f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER {API_KEY}", f"Bearer  {API_KEY}"]),
    st.one_of(
        st.sampled_from([None, f"Bearer {API_KEY}x", f"Basic {API_KEY}", API_KEY, "Bearer", "", "Bearer wrong"]),
        st.text(st.characters(codec="ascii", min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    ),
)
request_ids = st.one_of(st.none(), st.sampled_from(["sync-job-17", "not plain!", "", "x" * 65]))
calls = st.builds(
    Call,
    method=mostly(st.just("GET"), st.sampled_from(["HEAD", "POST", "PUT", "DELETE"])),
    user_id=user_ids,
    query=queries,
    authorization=authorizations,
    request_id=request_ids,
)


def comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str | None]], bytes]:
    headers = [(name, response.headers.get(name)) for name in HEADERS_THAT_MATTER]
    body = response.content
    if STATE.search(body):  # the body's length moves with the random state: compare it without
        headers = [(name, value) for name, value in headers if name != "content-length"]
        body = STATE.sub(b"state=...", body)
    return response.status_code, headers, body


def request_id_of(response: httpx.Response, sent: str | None) -> str:
    """The echoed X-Request-ID, or `new` for one the service made up (random, so not compared as such)."""
    echoed = response.headers["x-request-id"]
    if sent is not None and echoed == sent:
        return echoed
    assert re.fullmatch(r"[0-9a-f]{32}", echoed), echoed
    return "new"


class TestGeneratedRequests:
    @settings(
        max_examples=200,
        derandomize=True,  # the same examples every run: CI is not flaky, a failure reproduces
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(call=calls)
    async def test_the_fast_path_answers_byte_for_byte_as_the_fastapi_route(self, routes: Routes, call: Call) -> None:
        """Valid and invalid ids, `min_ttl` values, keys, methods and request ids: the same answer both ways, and
        the lean route answers exactly what it can check by hand."""
        user_id = routes.seeded.get(call.user_id, call.user_id)
        call = Call(call.method, user_id, call.query, call.authorization, call.request_id)
        with_fast = await routes.fast.request(call.method, call.url, headers=call.headers)
        without = await routes.slow.request(call.method, call.url, headers=call.headers)
        assert comparable(with_fast) == comparable(without), call
        assert request_id_of(with_fast, call.request_id) == request_id_of(without, call.request_id), call
        probed = await routes.probe.request(call.method, call.url, headers=call.headers)
        answered = probed.status_code != FELL_THROUGH
        event(f"{'answered by the lean route' if answered else 'fell through'}: {with_fast.status_code}")
        assert answered == call.lean_route_takes_it(), call
