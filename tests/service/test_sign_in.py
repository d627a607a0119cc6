"""Sign-in throttling: the growth of the wait, the key of a client, and counting on both databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import FakeClock
from tokensvc.db import make_engine
from tokensvc.errors import TooManyRequests
from tokensvc.service.sign_in import FREE_FAILURES, MAX_WAIT_SECONDS, SignInThrottle, client_key, wait_after

pytestmark = pytest.mark.dialects("sqlite", "postgres")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    yield engine
    await engine.dispose()


class TestWait:
    def test_the_wait_doubles_after_the_free_failures_up_to_the_cap(self) -> None:
        """0 for the first four failures, then 2, 4, 8 … seconds, never above 15 minutes."""
        assert [wait_after(n) for n in range(1, FREE_FAILURES)] == [0] * (FREE_FAILURES - 1)
        assert [wait_after(n) for n in range(FREE_FAILURES, FREE_FAILURES + 4)] == [2, 4, 8, 16]
        assert wait_after(1000) == MAX_WAIT_SECONDS == 900


class TestClientKey:
    @pytest.mark.parametrize(
        ("host", "key"),
        [
            ("203.0.113.7", "203.0.113.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
            ("::ffff:203.0.113.7", "203.0.113.7"),
            (None, "unknown"),
        ],
    )
    def test_an_ipv6_client_is_its_64(self, host: str | None, key: str) -> None:
        """One IPv6 host holds a whole /64: counting per address would give it 2**64 fresh starts."""
        assert client_key(host) == key


class TestCounting:
    async def test_concurrent_failures_are_all_counted(self, engine: AsyncEngine, clock: FakeClock) -> None:
        """Ten failures at once (replicas racing) make ten: the client then waits as after ten."""
        throttle = SignInThrottle(engine, clock=clock)
        await asyncio.gather(*(throttle.failed("198.51.100.1") for _ in range(10)))
        with pytest.raises(TooManyRequests) as raised:
            await throttle.check("198.51.100.1")
        assert raised.value.retry_after == wait_after(10)
        await throttle.check("198.51.100.2")  # another client: free

    async def test_a_success_forgets_and_old_rows_are_purged(self, engine: AsyncEngine, clock: FakeClock) -> None:
        """After a success the client starts afresh; a day after its last failure a client's row is gone."""
        throttle = SignInThrottle(engine, clock=clock)
        for _ in range(FREE_FAILURES):
            await throttle.failed("a")
        await throttle.succeeded("a")
        await throttle.check("a")
        for _ in range(FREE_FAILURES + 3):
            await throttle.failed("b")
        clock.advance(24 * 3600 + 1)
        await throttle.failed("c")  # any failure purges the stale rows
        await throttle.check("b")
        assert await throttle.failed("b") == 0
