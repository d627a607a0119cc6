"""Throttled sign-ins to the dashboard: per client, growing, shared by replicas through the database.

The first `FREE_FAILURES` wrong secrets from a client cost nothing; each one after that makes the client wait twice
as long as the one before (2 s, 4 s, … up to `MAX_WAIT_SECONDS`). A waiting client is refused (429) without its
secret being checked, so guessing stays at a few tries a quarter-hour. A success forgets the client's failures.

The throttle is keyed by the client's address (the peer's, or X-Forwarded-For from TOKENSVC_TRUSTED_PROXIES), an
IPv6 client by its /64: only the guesser waits, and no one can lock the operator out from another address.
"""

from __future__ import annotations

import ipaddress
import math

from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.clock import Clock
from tokensvc.errors import TooManyRequests
from tokensvc.store import sign_in

FREE_FAILURES = 5
MAX_WAIT_SECONDS = 15 * 60
FORGET_AFTER_SECONDS = 24 * 3600


def client_key(host: str | None) -> str:
    """The throttle's key for a client address: the address itself, an IPv6 address's /64 network."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def wait_after(failures: int) -> int:
    """Seconds a client with `failures` consecutive failures must wait before its next try."""
    if failures < FREE_FAILURES:
        return 0
    doublings = min(failures - FREE_FAILURES + 1, 10)  # 2**10 s is past the cap already
    return min(1 << doublings, MAX_WAIT_SECONDS)


class SignInThrottle:
    def __init__(self, engine: AsyncEngine, *, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock

    async def check(self, client: str) -> None:
        """Raises TooManyRequests (with Retry-After) while `client` must wait. One short read."""
        now = self._clock()
        async with self._engine.connect() as conn:
            until = await sign_in.blocked_until(conn, client)
        if until > now:
            raise TooManyRequests(
                "too many failed sign-ins from this address; wait before trying again",
                retry_after=max(1, math.ceil(until - now)),
            )

    async def failed(self, client: str) -> int:
        """Record a failure; the seconds the client must now wait (0 for its first few). One transaction."""
        now = int(self._clock())
        async with self._engine.begin() as conn:
            failures = await sign_in.add_failure(conn, client, now=now)
            wait = wait_after(failures)
            if wait:
                await sign_in.block(conn, client, until=now + wait)
            await sign_in.purge(conn, failed_before=now - FORGET_AFTER_SECONDS)
        return wait

    async def succeeded(self, client: str) -> None:
        async with self._engine.begin() as conn:
            await sign_in.forget(conn, client)
