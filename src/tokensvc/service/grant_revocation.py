"""Ending a deleted user's grant at Strava, retried until Strava confirms, so that an outage never leaves a grant
alive after the user's row is gone.

A DELETE buries the row's tokens (their ciphertexts, unchanged) in a tombstone in the same transaction that deletes
the row, then makes one attempt at once; a periodic job in every replica retries the due tombstones with backoff.
Each attempt: claim the tombstone (one short transaction), call Strava holding no connection, then delete the
tombstone or reschedule it (one short transaction, fenced by the claim).

Which endpoint (`TOKENSVC_STRAVA_REVOKE_ENDPOINT`): `auto` sends `POST /oauth/revoke` with the refresh token and,
on a 404, falls back to the legacy `/oauth/deauthorize` (and goes straight there for an hour); `revoke` and
`deauthorize` pin one. Deauthorize needs a live access token: an expired (or refused) one is first replaced by a
refresh, whose pair is stored in the tombstone before it is used. Confirmed means: Strava answered 200, or Strava
called the token invalid (nothing is left alive). A tombstone whose athlete a user holds again (reconnected since
the delete) is dropped unsent: revoking the old grant would end the new connection.

Both calls are rate-counted: each takes a unit from the service's background share of the overall window (as the
deauthorization checks do); a 429 pauses rate-counted calls on every replica.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Literal, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc import metrics
from tokensvc.background import every
from tokensvc.backoff import backoff_seconds
from tokensvc.clock import Clock
from tokensvc.crypto import DecryptionError, Field, TokenCipher
from tokensvc.errors import ProviderRateLimited
from tokensvc.providers.strava import (
    ProviderConfigError,
    ProviderEndpointMissing,
    ProviderRejectedError,
    ProviderTransientError,
    StravaClient,
)
from tokensvc.service.rate_budget import Priority, RateBudget
from tokensvc.store import tombstones as store
from tokensvc.store.tombstones import Tombstone

log = structlog.get_logger(__name__)

RevokeEndpoint = Literal["auto", "revoke", "deauthorize"]
# What an attempt came to: the first three confirm (the tombstone goes), `superseded` drops it unsent.
Result = Literal["revoked", "deauthorized", "token_dead", "superseded", "retried"]

PRIORITY: Priority = "sweep"  # the service's own background share, like the deauthorization checks
LEASE_SECONDS = 300  # longer than an attempt's calls (a refresh's deadline, a deauthorize, a revoke)
BACKOFF_FIRST_SECONDS = 60.0
BACKOFF_CAP_SECONDS = 6 * 3600.0
FALLBACK_SECONDS = 3600  # `auto`: after a 404 from /oauth/revoke, this replica deauthorizes directly for this long
MIN_ACCESS_TTL = 60  # a stored access token with less left is refreshed before a deauthorize
REFRESH_DEADLINE_SECONDS = 30.0

T = TypeVar("T")


class _RetryLater(Exception):
    """Strava did not confirm this time; `reason` is a short word for the row and the log (never a token)."""

    def __init__(self, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class GrantRevoker:
    """Attempts and retries the revocations of deleted users' grants. Each method says where its transactions are."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        cipher: TokenCipher,
        strava: StravaClient,
        budget: RateBudget,
        clock: Clock,
        endpoint: RevokeEndpoint = "auto",
        interval_seconds: int = 60,
        batch_size: int = 20,
        lease_seconds: int = LEASE_SECONDS,
    ) -> None:
        self._engine = engine
        self._cipher = cipher
        self._strava = strava
        self._budget = budget
        self._clock = clock
        self.endpoint: RevokeEndpoint = endpoint
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self._revoke_missing_until = 0.0
        self.job = every("revocations", self.run_due, interval_seconds=interval_seconds)

    def start(self) -> None:
        self.job.start()

    async def stop(self, *, deadline_seconds: float) -> None:
        await self.job.stop(deadline_seconds=deadline_seconds)

    async def attempt(self, tombstone_id: int) -> Result | None:
        """One attempt at a tombstone now (a DELETE's, right after its commit); None when it is not due (another
        replica holds it). Transactions: the claim, then the outcome; none across the Strava calls."""
        now = int(self._clock())
        async with self._engine.begin() as conn:
            tombstone = await store.claim(conn, tombstone_id, now=now, lease_until=now + self.lease_seconds)
        return None if tombstone is None else await self._work(tombstone)

    async def run_due(self) -> int:
        """Attempt every due tombstone, claimed in batches (one short transaction per batch). Returns how many were
        attempted. Raises database errors (a claimed tombstone then waits for its lease to lapse)."""
        attempted = 0
        while True:
            now = int(self._clock())
            async with self._engine.begin() as conn:
                batch = await store.claim_due(
                    conn, now=now, limit=self.batch_size, lease_until=now + self.lease_seconds
                )
            for tombstone in batch:
                await self._work(tombstone)
            attempted += len(batch)
            if len(batch) < self.batch_size:
                return attempted

    async def pending(self) -> int:
        """Tombstones waiting for Strava (the gauge)."""
        async with self._engine.connect() as conn:
            return await store.count(conn)

    async def _work(self, tombstone: Tombstone) -> Result:
        try:
            result = await self._end_grant(tombstone)
        except _RetryLater as exc:
            delay = exc.retry_after or int(
                backoff_seconds(tombstone.attempts + 1, first=BACKOFF_FIRST_SECONDS, cap=BACKOFF_CAP_SECONDS)
            )
            async with self._engine.begin() as conn:
                await store.retry_later(conn, tombstone, due_at=int(self._clock()) + delay, error=exc.reason)
            metrics.REVOCATIONS_TOTAL.labels(outcome="retried").inc()
            log.warning(
                "token.revoke.retry_later",
                user_id=tombstone.user_id,
                tombstone_id=tombstone.id,
                attempts=tombstone.attempts + 1,
                reason=exc.reason,
                in_seconds=delay,
            )
            return "retried"
        async with self._engine.begin() as conn:
            await store.finish(conn, tombstone)
        metrics.REVOCATIONS_TOTAL.labels(outcome=result).inc()
        log.info(
            "token.revoke.confirmed",
            user_id=tombstone.user_id,
            tombstone_id=tombstone.id,
            outcome=result,
            attempts=tombstone.attempts + 1,
        )
        return result

    async def _end_grant(self, tombstone: Tombstone) -> Result:
        """Raises _RetryLater when Strava did not confirm."""
        if tombstone.athlete_id is not None:
            async with self._engine.connect() as conn:
                if await store.athlete_connected(conn, tombstone.athlete_id):
                    return "superseded"
        if self.endpoint == "deauthorize" or (self.endpoint == "auto" and self._clock() < self._revoke_missing_until):
            return await self._deauthorize(tombstone)
        try:
            answer = await self._counted(lambda: self._strava.revoke(self._decrypt(tombstone, "refresh")))
        except ProviderEndpointMissing as exc:
            if self.endpoint == "revoke":
                raise _RetryLater("revoke_missing") from exc
            self._revoke_missing_until = self._clock() + FALLBACK_SECONDS
            log.warning("token.revoke.endpoint_missing", falling_back_to="deauthorize", for_seconds=FALLBACK_SECONDS)
            return await self._deauthorize(tombstone)
        return "revoked" if answer == "revoked" else "token_dead"

    async def _deauthorize(self, tombstone: Tombstone) -> Result:
        """The legacy endpoint, which takes an access token: the stored one while it lives, else a refreshed one."""
        access: str | None = None
        if tombstone.access_token_enc is not None and tombstone.access_expires_at - self._clock() > MIN_ACCESS_TTL:
            access = self._decrypt(tombstone, "access")
        for _round in range(2):
            fresh = access is None
            if access is None:
                access = await self._refreshed_access(tombstone)
                if access is None:
                    return "token_dead"  # Strava rejected the refresh token: the grant is over
            try:
                await self._counted(partial(self._strava.deauthorize, access))
            except ProviderRejectedError:
                if fresh:
                    return "token_dead"  # even a just-minted access token is refused
                access = None  # the stored one died early: refresh and try once more
                continue
            except ProviderEndpointMissing as exc:
                raise _RetryLater("deauthorize_missing") from exc
            return "deauthorized"
        raise _RetryLater("deauthorize_refused")

    async def _refreshed_access(self, tombstone: Tombstone) -> str | None:
        """A new access token for the grant (its pair kept in the tombstone before it is used); None when Strava
        rejects the refresh token. `/oauth/token` takes no unit, but a 429 pause on token calls holds it back."""
        try:
            await self._budget.token_calls_allowed()
            grant = await self._strava.refresh(
                self._decrypt(tombstone, "refresh"), deadline_seconds=REFRESH_DEADLINE_SECONDS
            )
        except ProviderRateLimited as exc:
            raise _RetryLater("rate_limited", retry_after=exc.retry_after) from exc
        except ProviderRejectedError:
            return None
        except ProviderTransientError as exc:
            if exc.rate_limited:
                await self._budget.pause(exc.retry_after, kind="token")
            raise _RetryLater("refresh_unavailable", retry_after=exc.retry_after) from exc
        except (ProviderConfigError, TimeoutError) as exc:
            raise _RetryLater(type(exc).__name__) from exc
        enc = self._cipher.encrypt
        async with self._engine.begin() as conn:
            kept = await store.reseal(
                conn,
                tombstone,
                refresh_token_enc=enc(
                    grant.refresh_token or self._decrypt(tombstone, "refresh"),
                    user_id=tombstone.user_id,
                    field="refresh",
                ),
                access_token_enc=enc(grant.access_token, user_id=tombstone.user_id, field="access"),
                access_expires_at=grant.expires_at,
                key_id=self._cipher.current_key_id,
            )
        if not kept:
            raise _RetryLater("claim_lost")
        return grant.access_token

    async def _counted(self, call: Callable[[], Awaitable[T]]) -> T:
        """A rate-counted call: a unit first (given back when nothing was sent); a 429 pauses such calls."""
        try:
            await self._budget.acquire(PRIORITY)
        except ProviderRateLimited as exc:
            raise _RetryLater("rate_limited", retry_after=exc.retry_after) from exc
        try:
            return await call()
        except _RetryLater:
            await self._budget.refund(PRIORITY)
            raise
        except ProviderTransientError as exc:
            if exc.rate_limited:
                await self._budget.pause(exc.retry_after)
            raise _RetryLater(
                "rate_limited" if exc.rate_limited else "unavailable", retry_after=exc.retry_after
            ) from exc
        except ProviderConfigError as exc:
            raise _RetryLater("misconfigured") from exc

    def _decrypt(self, tombstone: Tombstone, field: Field) -> str:
        try:
            return self._cipher.open(tombstone, field)
        except DecryptionError as exc:
            raise _RetryLater("unreadable") from exc
