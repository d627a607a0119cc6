"""Where refreshes are decided: status, import, refresh exactly once, access tokens, deletion.

Exactly once, however many callers and processes ask:
1. single flight inside the process: concurrent callers for one user await one shared task;
2. a cross-process guard in the database (`store.lock_for_refresh`) held from the decision to the commit;
3. a re-read under the guard (another process may have refreshed while we waited);
4. a write that checks the version it read; the rotated refresh token is committed before anyone hears of success.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import stamina
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc import failpoints, metrics
from tokensvc.clock import Clock
from tokensvc.crypto import DecryptionError, Field, TokenCipher
from tokensvc.db import Autocommit
from tokensvc.errors import (
    ProviderMisconfigured,
    ProviderRateLimited,
    ProviderUnavailable,
    ReauthRequired,
    StaleImport,
    TokenServiceError,
    TokensMissing,
    TokenUnreadable,
    ValidationFailed,
)
from tokensvc.logging import detached_context
from tokensvc.providers.strava import (
    ProviderConfigError,
    ProviderError,
    ProviderRejectedError,
    ProviderTransientError,
    StravaClient,
    TokenGrant,
)
from tokensvc.schemas import AccessToken, RefreshResult, TokenImport, TokenPage, TokenStatus
from tokensvc.service.journal import Journal
from tokensvc.service.rate_budget import Priority, RateBudget
from tokensvc.service.status import Status, classify
from tokensvc.service.usage import UsageRecorder
from tokensvc.store import tokens as store
from tokensvc.store.reader import EngineReader, RowReader
from tokensvc.store.tokens import NewTokens, TokenRow

log = structlog.get_logger(__name__)

MAX_IMPORT_AHEAD_SECONDS = 366 * 86_400  # an imported expires_at further ahead is not epoch seconds

# What a deauthorize came to: a 429 is kept so the caller pauses after releasing the guard.
DeauthorizeOutcome = Literal["not_called", "called"] | ProviderTransientError

AuthorizeUrlFactory = Callable[[str], str | None]

MSG_REFRESHED = "Tokens refreshed successfully"
MSG_STILL_VALID = "Tokens are still valid - no refresh needed"
MSG_SIBLING = "Tokens were refreshed by another request"
MSG_REAUTH = "Strava rejected the stored refresh token; the user must reconnect with Strava."
MSG_MISSING = "No Strava tokens are stored for this user; the user must connect with Strava."


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a refresh flight ended with; `access_token` is set when the flight already holds it in the clear."""

    row: TokenRow
    refreshed: bool
    message: str
    access_token: str | None = None


class TokenService:
    """The token lifecycle. Each public method says where its transaction begins and ends."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        cipher: TokenCipher,
        strava: StravaClient,
        budget: RateBudget,
        rows: RowReader | None = None,
        clock: Clock = time.time,
        buffer_seconds: int = 1800,
        write_budget_seconds: float = 30.0,
        authorize_url: AuthorizeUrlFactory | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._engine = engine
        self.journal = journal or Journal(clock=clock)
        # Reads need no transaction: autocommit saves the BEGIN/ROLLBACK round trips.
        self._autocommit = Autocommit(engine)
        self._rows = rows if rows is not None else EngineReader(engine)
        self._cipher = cipher
        self._strava = strava
        self._budget = budget
        self._clock = clock
        self.buffer_seconds = buffer_seconds
        self._write_budget = write_budget_seconds
        self._authorize_url = authorize_url or (lambda _user_id: None)
        self._flights: dict[str, asyncio.Task[Outcome]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Notes who asks for tokens (the sweeper refreshes only users used lately); set by app.py.
        self.usage: UsageRecorder | None = None

    def _used(self, user_id: str) -> None:
        if self.usage is not None:
            self.usage.note(user_id)

    # -- reads ------------------------------------------------------------------------------------------------

    async def status(self, user_id: str) -> TokenStatus:
        """A user's status from the database alone (one read, no transaction); never calls Strava."""
        return self._status(user_id, await self._get(user_id))

    async def list_tokens(self, statuses: Sequence[Status], *, limit: int, cursor: str | None) -> TokenPage:
        """Stored users in `statuses`, oldest expiry first. Raises ValidationFailed for a bad cursor or status."""
        if Status.MISSING in statuses:
            raise ValidationFailed("`missing` users have no stored row to list; ask token-status for one user")
        after = _decode_cursor(cursor) if cursor else None
        async with self._autocommit.connect() as conn:
            rows = await store.list_by_status(
                conn,
                statuses,
                now=int(self._clock()),
                buffer_seconds=self.buffer_seconds,
                limit=limit,
                after=after,
            )
        items = [self._status(r.user_id, r) for r in rows]
        next_cursor = _encode_cursor(rows[-1]) if len(rows) == limit else None
        return TokenPage(items=items, next_cursor=next_cursor)

    async def access_token(self, user_id: str, *, min_ttl: int) -> AccessToken:
        """A token with at least `min_ttl` seconds left (and never an expired one).

        Valid → the stored token, no Strava call. Due but still long enough → the stored token at once and one
        refresh in the background. Otherwise the caller waits for the (shared) refresh.
        Raises TokensMissing, ReauthRequired, ProviderUnavailable (and subclasses), TokenUnreadable.
        """
        needed = max(min_ttl, 1)
        row = await self._get(user_id)
        row = self._usable(user_id, row)
        self._used(user_id)
        remaining = row.expires_at - self._clock()
        if remaining >= needed:
            if remaining <= self.buffer_seconds and not self._backing_off(row):
                self._refresh_in_background(user_id)
            return self._access(row, self._decrypt(row, "access"))
        outcome = await self._ensure_fresh(user_id, force=False, min_ttl=needed, trigger="access_token")
        if outcome.row.expires_at - self._clock() < needed:
            raise ProviderUnavailable("Strava returned a token with less life than was asked for", retry_after=60)
        return self._access(outcome.row, outcome.access_token or self._decrypt(outcome.row, "access"))

    # -- writes -----------------------------------------------------------------------------------------------

    async def import_tokens(self, user_id: str, body: TokenImport, *, replace: bool = False) -> TokenStatus:
        """Insert or replace a user's tokens in one transaction (waits for an in-flight refresh's row lock).

        Raises ValidationFailed for an `expires_at` that is not plausible epoch seconds, and StaleImport for a pair
        older than the stored one (an earlier `expires_at` with another refresh token) unless `replace`.
        """
        self._check_plausible_expiry(body.expires_at)
        tokens = NewTokens(
            access_token_enc=self._cipher.encrypt(body.access_token, user_id=user_id, field="access"),
            refresh_token_enc=self._cipher.encrypt(body.refresh_token, user_id=user_id, field="refresh"),
            key_id=self._cipher.current_key_id,
            expires_at=body.expires_at,
            sweep_at=self.sweep_at(user_id, body.expires_at),
        )
        async with self._engine.begin() as conn:
            previous = await store.lock_for_refresh(conn, user_id)
            if not replace and previous is not None and self._is_older(previous, body):
                log.warning("token.import.stale", user_id=user_id, expires_at=body.expires_at)
                raise StaleImport(
                    f"this pair expires at {body.expires_at}, before the stored one ({previous.expires_at}), and "
                    "carries another refresh token: Strava has rotated since it was taken, so it is probably "
                    "dead. Import a current pair, or pass replace=true to store it anyway."
                )
            row = await store.upsert(
                conn, user_id, tokens, athlete_id=body.athlete_id, scopes=body.scopes, now=self._now_dt()
            )
            await self.journal.stored(conn, user_id, kind="imported", previous_reason=_reason(previous))
        self.row_changed(user_id)
        self._used(user_id)
        log.info("token.imported", user_id=user_id, expires_at=row.expires_at, version=row.version)
        return self._status(user_id, row)

    def _check_plausible_expiry(self, expires_at: int) -> None:
        """Strava's `expires_at` is epoch seconds at most 6 hours ahead: milliseconds, or years ahead, is a mistake."""
        now = int(self._clock())
        if expires_at <= now + MAX_IMPORT_AHEAD_SECONDS:
            return
        hint = " (it looks like milliseconds: divide by 1000)" if expires_at >= 10**11 else ""
        raise ValidationFailed(
            f"expires_at {expires_at} is not plausible epoch seconds{hint}: it lies more than a year ahead, and "
            "Strava's access tokens live 6 hours",
            errors=[{"loc": ["body", "expires_at"], "msg": "not plausible epoch seconds", "type": "value_error"}],
        )

    def _is_older(self, previous: TokenRow, body: TokenImport) -> bool:
        """Whether the import is a pair from before the stored one: earlier expiry, other refresh token."""
        if previous.refresh_token_enc is None or body.expires_at >= previous.expires_at:
            return False
        try:
            stored = self._decrypt(previous, "refresh")
        except TokenUnreadable:
            return True  # cannot tell it is the same pair; an earlier expiry is reason enough to ask for replace
        return not hmac.compare_digest(stored.encode(), body.refresh_token.encode())

    async def store_grant(self, user_id: str, grant: TokenGrant, *, scopes: Sequence[str]) -> TokenStatus:
        """Store a connect's first pair (one transaction; clears `needs_reauth`, waits for an in-flight refresh)."""
        if grant.refresh_token is None:
            raise ProviderUnavailable("Strava's code exchange returned no refresh token", retry_after=5)
        tokens = self._encrypt_grant(user_id, grant)
        async with self._engine.begin() as conn:
            previous = await store.lock_for_refresh(conn, user_id)
            row = await store.upsert(
                conn, user_id, tokens, athlete_id=grant.athlete_id, scopes=list(scopes), now=self._now_dt()
            )
            await self.journal.stored(conn, user_id, kind="connected", previous_reason=_reason(previous))
        self.row_changed(user_id)
        self._used(user_id)
        log.info("token.connected", user_id=user_id, athlete_id=row.athlete_id, was=_reason(previous))
        return self._status(user_id, row)

    async def refresh(self, user_id: str, *, force: bool = False, trigger: str = "api") -> RefreshResult:
        """Refresh if due (or `force`), sharing any refresh already in flight for this user.

        Raises TokensMissing, ReauthRequired, ProviderUnavailable (and subclasses), TokenUnreadable.
        """
        outcome = await self._ensure_fresh(user_id, force=force, min_ttl=0, trigger=trigger)
        if trigger in ("api", "browser"):
            self._used(user_id)
        return RefreshResult(
            refreshed=outcome.refreshed,
            message=outcome.message,
            token_status=self._status(user_id, outcome.row),
        )

    async def delete(self, user_id: str) -> None:
        """Deauthorize at Strava (best effort), then delete; one transaction holding the refresh guard. Idempotent.

        Deauthorize is rate-counted: its unit is taken before the guard (the budget row is never written while the
        guard is held, which on SQLite is the write lock) and given back when no call was made; without a unit the
        call is skipped and the row deleted all the same. A 429 pauses rate-counted calls after the commit."""
        allowed = await self._deauthorize_unit(user_id)
        outcome: DeauthorizeOutcome = "not_called"
        async with self._engine.begin() as conn:
            row = await store.lock_for_refresh(conn, user_id)
            if row is not None:
                if allowed and row.access_token_enc is not None and row.reauth_reason is None:
                    outcome = await self._deauthorize_best_effort(row)
                await store.delete(conn, user_id)
                await self.journal.revoked(conn, user_id, athlete_id=row.athlete_id, reason="deleted")
        if allowed and outcome == "not_called":
            await self._budget.refund()
        elif isinstance(outcome, ProviderTransientError):
            await self._budget.pause(outcome.retry_after)
        if row is None:
            return
        self.row_changed(user_id)
        log.info("token.deleted", user_id=user_id)

    async def _deauthorize_unit(self, user_id: str) -> bool:
        try:
            await self._budget.acquire("on_demand")
        except ProviderRateLimited as exc:
            log.warning("token.deauthorize.skipped_rate_limited", user_id=user_id, retry_after=exc.retry_after)
            return False
        return True

    def row_changed(self, user_id: str) -> None:
        """A transaction of this process that changed the user's row has committed: this replica's reader forgets
        what it held for the user at once (other replicas hear of it through the database)."""
        self._rows.forget(user_id)

    async def drain(self) -> None:
        """Wait until no background refresh is running (tests, and shutdown)."""
        while self._background:
            await asyncio.wait(set(self._background))

    async def aclose(self, grace_seconds: float = 5.0) -> None:
        """Let background refreshes finish (a refresh cut between Strava and the commit strands its user)."""
        if self._background:
            _done, pending = await asyncio.wait(set(self._background), timeout=grace_seconds)
            for task in pending:
                task.cancel()

    # -- the refresh itself -----------------------------------------------------------------------------------

    async def _ensure_fresh(
        self, user_id: str, *, force: bool, min_ttl: int, trigger: str, strava_slots: asyncio.Semaphore | None = None
    ) -> Outcome:
        """Join the user's in-flight refresh (sharing its result or its error), or start one.

        A caller the joined flight did not satisfy (it wanted `force`, or more life) starts its own afterwards.
        """
        flight = self._flights.get(user_id)
        if flight is not None:
            outcome = await asyncio.shield(flight)
            if (outcome.refreshed or not force) and outcome.row.expires_at - self._clock() >= min_ttl:
                return outcome
        flight = self._flights.get(user_id)
        if flight is None or flight.done():
            flight = asyncio.create_task(
                self._refresh_guarded(user_id, force=force, min_ttl=min_ttl, trigger=trigger, strava_slots=strava_slots)
            )
            self._flights[user_id] = flight
            flight.add_done_callback(lambda done: self._forget_flight(user_id, done))
        # shield: a caller that goes away (client disconnect) must not cancel the refresh others are waiting for
        return await asyncio.shield(flight)

    def _forget_flight(self, user_id: str, flight: asyncio.Task[Outcome]) -> None:
        if self._flights.get(user_id) is flight:
            del self._flights[user_id]

    def _refresh_in_background(self, user_id: str) -> None:
        if user_id in self._flights:
            return
        self._spawn(self._background_refresh(user_id))

    async def _background_refresh(self, user_id: str) -> None:
        try:
            await self._ensure_fresh(user_id, force=False, min_ttl=0, trigger="background")
        except TokenServiceError as exc:
            log.warning("token.refresh.background_failed", user_id=user_id, code=exc.code)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Outlives the request that started it: its log lines name that request as the parent, not as their own.
        task = asyncio.create_task(coro, context=detached_context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_guarded(
        self, user_id: str, *, force: bool, min_ttl: int, trigger: str, strava_slots: asyncio.Semaphore | None = None
    ) -> Outcome:
        outcome_label = "error"
        try:
            priority: Priority = "sweep" if trigger in AUTOMATIC_TRIGGERS else "on_demand"
            # The sweeper claimed the user because it is due: a lock-free look first would only repeat that.
            outcome = await self._refresh_locked(
                user_id,
                force=force,
                min_ttl=min_ttl,
                trigger=trigger,
                priority=priority,
                look_first=trigger != "sweep",
                strava_slots=strava_slots,
            )
        except TokenServiceError as exc:
            outcome_label = _OUTCOME_BY_CODE.get(exc.code, exc.code)
            # One line per failed decision saying why (the specific event, if any, was logged where it happened).
            log.warning("token.refresh.failed", user_id=user_id, trigger=trigger, outcome=outcome_label, code=exc.code)
            raise
        else:
            outcome_label = "refreshed" if outcome.refreshed else "not_needed"
            if not outcome.refreshed:
                reason = "refreshed_by_another_request" if outcome.message == MSG_SIBLING else "still_valid"
                log.info(
                    "token.refresh.skipped",
                    user_id=user_id,
                    trigger=trigger,
                    reason=reason,
                    expires_in=int(outcome.row.expires_at - self._clock()),
                )
            return outcome
        finally:
            metrics.REFRESH_TOTAL.labels(outcome=outcome_label, trigger=trigger).inc()

    async def _refresh_locked(
        self,
        user_id: str,
        *,
        force: bool,
        min_ttl: int,
        priority: Priority,
        trigger: str = "api",
        look_first: bool = True,
        strava_slots: asyncio.Semaphore | None = None,
    ) -> Outcome:
        """A lock-free look first; then one transaction per round: take the guard, re-read, decide, call Strava,
        write, commit.

        A further round happens only after Strava rejected the refresh token: the guard is released, the row is
        re-read under it, and a newer token stored by someone else meanwhile is used instead of flagging the user.
        `/oauth/token` takes no unit of the rate budget (Strava does not count it); a round only checks that no
        replica was told to pause token calls (a 429), and the provider bounds such calls per process.
        """
        if look_first:
            row = self._usable(user_id, await self._get(user_id))
            if not self._due(row, force=force, min_ttl=min_ttl):
                return Outcome(row, refreshed=False, message=MSG_STILL_VALID)  # the common case: no lock, no budget
        rejected_version: int | None = None
        for _round in range(3):
            await self._budget.token_calls_allowed()
            called = False
            started = time.perf_counter()
            grant: TokenGrant | None = None
            written: TokenRow | None = None
            dead = False
            try:
                async with self._engine.begin() as conn:
                    waiting = time.perf_counter()
                    locked = await store.lock_for_refresh(conn, user_id)
                    metrics.LOCK_WAIT_SECONDS.observe(time.perf_counter() - waiting)
                    row = self._usable(user_id, locked)
                    if rejected_version == row.version:
                        # Nobody stored anything newer since Strava said no: the token really is dead.
                        flagged = await store.mark_needs_reauth(
                            conn,
                            user_id,
                            reason="refresh_token_invalid",
                            now=self._now_dt(),
                            expected_version=row.version,
                        )
                        if flagged is not None:
                            await self.journal.needs_reauth(
                                conn,
                                user_id,
                                athlete_id=row.athlete_id,
                                reason="refresh_token_invalid",
                                trigger=trigger,
                            )
                        dead = True
                    else:
                        if rejected_version is not None:
                            log.info("token.refresh.sibling_rotated", user_id=user_id, version=row.version)
                            force = False  # the newer token is what a forced refresh would have produced
                        if not self._due(row, force=force, min_ttl=min_ttl):
                            message = MSG_STILL_VALID if rejected_version is None else MSG_SIBLING
                            return Outcome(row, refreshed=False, message=message)
                        called = True
                        started = time.perf_counter()
                        try:
                            grant = await self._call_strava(user_id, row, strava_slots)
                        except ProviderRejectedError as exc:
                            rejected_version = row.version
                            await self.journal.refresh_attempt(
                                conn,
                                user_id,
                                trigger=trigger,
                                outcome="rejected",
                                strava_status=exc.status_code,
                                duration_ms=_ms_since(started),
                            )
                            continue  # ends this transaction, releasing the guard, and re-reads in a new one
                        duration_ms = _ms_since(started)
                        written = await store.write_refresh(
                            conn,
                            user_id,
                            self._encrypt_grant(user_id, grant),
                            expected_version=row.version,
                            now=self._now_dt(),
                        )
                        if written is not None:
                            await self.journal.refresh_attempt(
                                conn,
                                user_id,
                                trigger=trigger,
                                outcome="succeeded",
                                strava_status=200,
                                duration_ms=duration_ms,
                                after_failures=row.failure_count,
                            )
                            failpoints.hit("refresh.before_commit")  # tests only: a kill between Strava and commit
            except (DBAPIError, OSError) as exc:
                if grant is None:
                    raise
                # Strava already rotated: the new pair exists only in memory now. Keep trying to store it.
                log.error("token.refresh.write_failed_retrying", user_id=user_id, error=type(exc).__name__)
                written = await self._persist_after_outage(user_id, row.version, self._encrypt_grant(user_id, grant))
            except (ProviderUnavailable, TokenUnreadable) as exc:
                await self._after_failure(row, exc, trigger=trigger, duration_ms=_ms_since(started) if called else None)
                raise
            if written is not None or dead:
                self.row_changed(user_id)
            if dead:
                log.warning("token.refresh.reauth_required", user_id=user_id, reason="refresh_token_invalid")
                raise ReauthRequired(
                    MSG_REAUTH,
                    authorize_url=self._authorize_url(user_id),
                    reauth_reason="refresh_token_invalid",
                )
            if grant is None or written is None:
                # Only when the guard was lost with its connection and someone else wrote meanwhile.
                log.error("token.refresh.version_conflict", user_id=user_id)
                raise ProviderUnavailable("the token row changed during the refresh; try again", retry_after=5)
            log.info(
                "token.refresh.succeeded",
                user_id=user_id,
                expires_at=grant.expires_at,
                rotated=grant.refresh_token is not None,
                version=written.version,
            )
            return Outcome(written, refreshed=True, message=MSG_REFRESHED, access_token=grant.access_token)
        raise ProviderUnavailable("the refresh token kept changing during the refresh; try again", retry_after=5)

    async def _after_failure(
        self, row: TokenRow, exc: ProviderUnavailable | TokenUnreadable, *, trigger: str, duration_ms: int | None
    ) -> None:
        """Back off automatic attempts for this user (and pause everyone on a 429), and record the failed attempt.
        Never masks `exc`."""
        now = int(self._clock())
        try:
            if isinstance(exc, ProviderRateLimited) and exc.from_strava:
                delay = await self._budget.pause(exc.retry_after, kind="token")
            else:
                delay = backoff_seconds(row.failure_count + 1)
            async with self._engine.begin() as conn:
                await store.record_failure(conn, row.user_id, error=exc.code, retry_at=now + delay)
                cause = exc.__cause__
                await self.journal.refresh_attempt(
                    conn,
                    row.user_id,
                    trigger=trigger,
                    outcome=_failure_outcome(exc),
                    strava_status=cause.status_code if isinstance(cause, ProviderError) else None,
                    duration_ms=duration_ms,
                    detail=str(exc)[:200],
                )
        except (DBAPIError, OSError) as bookkeeping:
            log.error("token.refresh.backoff_not_recorded", user_id=row.user_id, error=type(bookkeeping).__name__)

    async def _call_strava(self, user_id: str, row: TokenRow, slots: asyncio.Semaphore | None = None) -> TokenGrant:
        """Raises ProviderRejectedError (handled by the caller) or the service's 503 errors."""
        refresh_token = self._decrypt(row, "refresh")
        started = time.perf_counter()
        try:
            async with slots or contextlib.nullcontext():
                grant = await self._strava.refresh(refresh_token)
        except ProviderRejectedError:
            log.info("token.refresh.rejected_by_strava", user_id=user_id)
            raise
        except ProviderTransientError as exc:
            if exc.answer_lost:
                log.warning(
                    "token.refresh.answer_lost",
                    user_id=user_id,
                    error=str(exc),
                    note="Strava may have rotated; stored tokens kept, the next attempt will tell",
                )
            else:
                log.warning(
                    "token.refresh.transient_failure",
                    user_id=user_id,
                    error=str(exc),
                    strava_status=exc.status_code,
                )
            if exc.rate_limited:
                raise ProviderRateLimited(str(exc), retry_after=exc.retry_after, from_strava=True) from exc
            raise ProviderUnavailable(str(exc), retry_after=exc.retry_after) from exc
        except ProviderConfigError as exc:
            log.error("token.refresh.misconfigured", user_id=user_id, strava_status=exc.status_code)
            raise ProviderMisconfigured(str(exc)) from exc
        metrics.REFRESH_SECONDS.observe(time.perf_counter() - started)
        return grant

    async def sweep_user(self, user_id: str, *, strava_slots: asyncio.Semaphore | None = None) -> Outcome:
        """The sweeper's refresh of one claimed user: the same exactly-once path as any refresh, at sweep priority.
        A user found not due (refreshed meanwhile, or the buffer changed) is put back on schedule. `strava_slots`
        bounds the sweep's Strava calls in flight (the database work around them overlaps).

        Raises what `refresh` raises.
        """
        outcome = await self._ensure_fresh(user_id, force=False, min_ttl=0, trigger="sweep", strava_slots=strava_slots)
        if not outcome.refreshed:
            async with self._engine.begin() as conn:
                await store.reschedule(conn, user_id, sweep_at=self.sweep_at(user_id, outcome.row.expires_at))
        return outcome

    async def _persist_after_outage(self, user_id: str, version: int, tokens: NewTokens) -> TokenRow | None:
        async for attempt in stamina.retry_context(on=(DBAPIError, OSError), timeout=self._write_budget, attempts=None):
            with attempt:
                async with self._engine.begin() as conn:
                    return await store.write_refresh(
                        conn, user_id, tokens, expected_version=version, now=self._now_dt()
                    )
        return None

    # -- helpers ----------------------------------------------------------------------------------------------

    def _backing_off(self, row: TokenRow) -> bool:
        """After a transient failure, automatic attempts wait for the backoff (the sweeper's `sweep_at`)."""
        return row.failure_count > 0 and row.sweep_at > self._clock()

    def _due(self, row: TokenRow, *, force: bool, min_ttl: int) -> bool:
        remaining = row.expires_at - self._clock()
        return force or remaining <= self.buffer_seconds or remaining < min_ttl

    def _usable(self, user_id: str, row: TokenRow | None) -> TokenRow:
        if row is None:
            raise TokensMissing(MSG_MISSING, authorize_url=self._authorize_url(user_id))
        if row.reauth_reason is not None:
            raise ReauthRequired(
                MSG_REAUTH
                if row.reauth_reason == "refresh_token_invalid"
                else "The athlete revoked access on Strava; the user must reconnect with Strava.",
                authorize_url=self._authorize_url(user_id),
                reauth_reason=row.reauth_reason,
            )
        return row

    def live_access_token(self, row: TokenRow, *, min_ttl: int) -> str | None:
        """The row's stored access token in the clear if it has `min_ttl` seconds left, else None; no Strava call,
        no refresh (for asking Strava about a user who can no longer be refreshed). Raises TokenUnreadable."""
        if row.access_token_enc is None or row.expires_at - self._clock() < min_ttl:
            return None
        return self._decrypt(row, "access")

    async def _get(self, user_id: str) -> TokenRow | None:
        return await self._rows.get(user_id)

    async def _deauthorize_best_effort(self, row: TokenRow) -> DeauthorizeOutcome:
        """The call itself; a 429 is handed back for the caller to pause on once the guard is released."""
        try:
            await self._strava.deauthorize(self._decrypt(row, "access"))
        except TokenUnreadable as exc:
            log.warning("token.deauthorize.failed", user_id=row.user_id, error=type(exc).__name__)
            return "not_called"
        except (ProviderTransientError, ProviderRejectedError, ProviderConfigError) as exc:
            log.warning("token.deauthorize.failed", user_id=row.user_id, error=type(exc).__name__)
            if isinstance(exc, ProviderTransientError) and exc.rate_limited:
                return exc
            return "called"
        log.info("token.deauthorize.succeeded", user_id=row.user_id)
        return "called"

    def _decrypt(self, row: TokenRow, field: Field) -> str:
        ciphertext = row.access_token_enc if field == "access" else row.refresh_token_enc
        try:
            return self._cipher.decrypt(ciphertext or "", user_id=row.user_id, field=field)
        except DecryptionError as exc:
            log.error("token.decrypt_failed", user_id=row.user_id, field=field, error=str(exc))
            raise TokenUnreadable(
                "the stored token cannot be decrypted with the configured keys (TOKENSVC_ENCRYPTION_KEYS)"
            ) from exc

    def _encrypt_grant(self, user_id: str, grant: TokenGrant) -> NewTokens:
        enc = self._cipher.encrypt
        return NewTokens(
            access_token_enc=enc(grant.access_token, user_id=user_id, field="access"),
            refresh_token_enc=(
                enc(grant.refresh_token, user_id=user_id, field="refresh") if grant.refresh_token else None
            ),
            key_id=self._cipher.current_key_id,
            expires_at=grant.expires_at,
            sweep_at=self.sweep_at(user_id, grant.expires_at),
        )

    def sweep_at(self, user_id: str, expires_at: int) -> int:
        """When the sweeper should take this user: inside the buffer, later by a per-user jitter of up to half of
        it, so users who connected at the same moment are not all refreshed at the same moment."""
        spread = max(1, self.buffer_seconds // 2)
        jitter = int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:4], "big") % spread
        return expires_at - self.buffer_seconds + jitter

    def _status(self, user_id: str, row: TokenRow | None) -> TokenStatus:
        now = self._clock()
        if row is None:
            return TokenStatus(
                user_id=user_id,
                status=Status.MISSING,
                expires_at=None,
                expires_in=None,
                athlete_id=None,
                scopes=[],
                last_refreshed_at=None,
                needs_reauth=False,
                reauth_reason=None,
            )
        status = classify(
            expires_at=row.expires_at,
            reauth_reason=row.reauth_reason,
            now=now,
            buffer_seconds=self.buffer_seconds,
        )
        return TokenStatus(
            user_id=user_id,
            status=status,
            expires_at=row.expires_at,
            expires_in=int(row.expires_at - now),
            athlete_id=row.athlete_id,
            scopes=row.scope_list,
            last_refreshed_at=row.last_refreshed_at,
            needs_reauth=status is Status.NEEDS_REAUTH,
            reauth_reason=row.reauth_reason,
        )

    def _access(self, row: TokenRow, token: str) -> AccessToken:
        return AccessToken(
            user_id=row.user_id,
            access_token=token,
            expires_at=row.expires_at,
            expires_in=int(row.expires_at - self._clock()),
            athlete_id=row.athlete_id,
            scopes=row.scope_list,
        )

    def _now_dt(self) -> datetime:
        return datetime.fromtimestamp(int(self._clock()), UTC)


AUTOMATIC_TRIGGERS = frozenset({"sweep", "background"})
BACKOFF_BASE_SECONDS = 30
BACKOFF_CAP_SECONDS = 3600


def backoff_seconds(failures: int) -> int:
    """Exponential backoff with jitter for automatic attempts: about 30 s, 60 s, 2 min … capped at an hour."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, failures - 1))
    return int(random.uniform(ceiling / 2, ceiling))


_OUTCOME_BY_CODE = {
    "reauth_required": "reauth_required",
    "tokens_missing": "tokens_missing",
    "provider_unavailable": "transient",
    "provider_rate_limited": "rate_limited",
}


def _encode_cursor(row: TokenRow) -> str:
    return base64.urlsafe_b64encode(f"{row.expires_at}:{row.user_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        expires_at, user_id = raw.split(":", 1)
        return int(expires_at), user_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValidationFailed("`cursor` is not a cursor this service issued") from exc


def _reason(row: TokenRow | None) -> str | None:
    return row.reauth_reason if row is not None else None


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _failure_outcome(exc: TokenServiceError) -> str:
    """The audit's name for a failed attempt (a lost answer is told apart: Strava may have rotated)."""
    cause = exc.__cause__
    if isinstance(cause, ProviderTransientError) and cause.answer_lost:
        return "answer_lost"
    if isinstance(exc, ProviderMisconfigured):
        return "misconfigured"
    if isinstance(exc, TokenUnreadable):
        return "unreadable"
    return _OUTCOME_BY_CODE.get(exc.code, exc.code)
