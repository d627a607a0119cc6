"""The bound on requests in flight: 503 `overloaded` with Retry-After above it, the probes never refused."""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from tokensvc.api.inflight import InFlightLimit
from tokensvc.config import Settings


class _Held:
    """An app whose every request waits until released: requests stay in flight for as long as a test wants."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0
        self._arrival = asyncio.Condition()

    async def arrived(self, count: int) -> None:
        async with self._arrival:
            await self._arrival.wait_for(lambda: self.entered >= count)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._arrival:
            self.entered += 1
            self._arrival.notify_all()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class TestInFlightLimit:
    async def test_above_the_limit_is_503_overloaded_with_retry_after(self) -> None:
        """With 2 requests held, a third is refused at once; once they finish, requests are served again."""
        held = _Held()
        app = InFlightLimit(held, limit=2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            first = [asyncio.create_task(client.get("/v1/users/u/access-token")) for _ in range(2)]
            await held.arrived(2)
            refused = await client.get("/v1/users/u/access-token")
            probe = asyncio.create_task(client.get("/healthz"))
            await held.arrived(3)  # the probe went through to the app
            held.release.set()
            assert [r.status_code for r in await asyncio.gather(*first, probe)] == [200, 200, 200]
            again = await client.get("/v1/users/u/access-token")
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["code"] == "overloaded"
        assert again.status_code == 200
        assert app.in_flight == 0

    def test_the_default_admits_the_1000_caller_row(self) -> None:
        """The reliability matrix sends 1,000 concurrent calls, possibly all to one process."""
        assert Settings().max_requests_in_flight >= 1000
