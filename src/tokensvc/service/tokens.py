"""Where refreshes are decided: status, import, refresh exactly once, access tokens, deletion.

Exactly once, however many callers and processes ask:
1. single flight inside the process: concurrent callers for one user await one shared task;
2. decide from a read; claim the refresh in `refresh_claims` (one short committed transaction, `store.claims`);
   other processes wait on the claim (woken by the row's change notification on Postgres, polling with backoff
   for the rest) or use the stored token while it lasts;
3. call Strava holding no connection, within a deadline shorter than the claim;
4. store in a second short transaction a write fenced by the version read (a `needs_reauth` set meanwhile over the
   same refresh token is cleared: the newest pair wins); the claim goes with it.
A claim whose owner died lapses and is taken over; a rejection then flags nobody while the lapsed owner may still
be storing its pair.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import stamina
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokensvc import failpoints, metrics
from tokensvc.backoff import backoff_seconds
from tokensvc.clock import Clock
from tokensvc.crypto import DecryptionError, Field, TokenCipher
from tokensvc.db import Autocommit
from tokensvc.errors import (
    AthleteInUse,
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
from tokensvc.schemas import (
    MAX_BIGINT,
    USER_ID_RE,
    AccessToken,
    RefreshResult,
    TokenImport,
    TokenPage,
    TokenStatus,
)
from tokensvc.service.grant_revocation import GrantRevoker
from tokensvc.service.journal import Journal, connect_news
from tokensvc.service.rate_budget import Priority, RateBudget
from tokensvc.service.revocation import user_subject
from tokensvc.service.usage import UsageRecorder
from tokensvc.status import Status, classify
from tokensvc.store import claims, session_revocations, tombstones
from tokensvc.store import tokens as store
from tokensvc.store.claims import Claim
from tokensvc.store.reader import EngineReader, RowReader
from tokensvc.store.tokens import NewTokens, TokenRow

log = structlog.get_logger(__name__)

MAX_IMPORT_AHEAD_SECONDS = 366 * 86_400  # an imported expires_at further ahead is not epoch seconds

AuthorizeUrlFactory = Callable[[str], str | None]

CallResult = TypeVar("CallResult")
StoreResult = TypeVar("StoreResult")


@dataclass(frozen=True, slots=True)
class _Ask:
    """What a caller asked of a refresh, handed down the single flight to its steps unchanged. With
    `rejected_version`, `force` holds only while the row is still that version; `strava_slots` is the sweep's bound
    on its calls in flight."""

    force: bool
    min_ttl: int
    trigger: str
    strava_slots: asyncio.Semaphore | None = None
    rejected_version: int | None = None


MSG_REFRESHED = "Tokens refreshed successfully"
MSG_STILL_VALID = "Tokens are still valid - no refresh needed"
MSG_SIBLING = "Tokens were refreshed by another request"
MSG_ELSEWHERE = "A refresh is in progress elsewhere; the stored tokens are still usable"
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
        claim_seconds: float = 60.0,
        token_timeout_seconds: float = 45.0,
        wait_seconds: float | None = None,
        authorize_url: AuthorizeUrlFactory | None = None,
        journal: Journal | None = None,
        revoker: GrantRevoker | None = None,
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
        # A live owner never loses its claim mid-call: every token call's total deadline is shorter than the claim.
        if token_timeout_seconds >= claim_seconds:
            raise ValueError("the token call's deadline must be shorter than the refresh claim")
        self._claim_seconds = claim_seconds
        self._token_timeout = token_timeout_seconds
        self._wait_seconds = claim_seconds if wait_seconds is None else wait_seconds
        self._owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._closing = False
        self._authorize_url = authorize_url or (lambda _user_id: None)
        self._flights: dict[str, asyncio.Task[Outcome]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Notes who asks for tokens (the sweeper refreshes only users used lately); set by app.py.
        self.usage: UsageRecorder | None = None
        # Ends a deleted user's grant at Strava (without one, tombstones wait for a replica that has one).
        self.revoker = revoker

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
        row, token = await self.access_row(user_id, min_ttl=min_ttl)
        return self._access(row, token)

    async def access_row(self, user_id: str, *, min_ttl: int, trigger: str = "access_token") -> tuple[TokenRow, str]:
        """`access_token`'s row and token in the clear (the gateway needs the row's version and scopes)."""
        needed = max(min_ttl, 1)
        row = await self._get(user_id)
        row = self._usable(user_id, row)
        self._used(user_id)
        remaining = row.expires_at - self._clock()
        if remaining >= needed:
            if remaining <= self.buffer_seconds and not self._backing_off(row):
                self._refresh_in_background(user_id)
            return row, self._decrypt(row, "access")
        outcome = await self._ensure_fresh(user_id, force=False, min_ttl=needed, trigger=trigger)
        return self._fresh_enough(outcome, needed)

    async def replace_rejected(self, user_id: str, *, version: int, min_ttl: int) -> tuple[TokenRow, str]:
        """Strava refused the access token of row `version` although it should be alive: refresh once, however
        many callers (here or on other replicas) saw the same refusal. The refresh is forced only while the row is
        still that version; a caller who comes later gets the pair that replaced it. Raises what `access_token`
        raises."""
        outcome = await self._ensure_fresh(
            user_id, force=True, min_ttl=max(min_ttl, 1), trigger="gateway", rejected_version=version
        )
        return self._fresh_enough(outcome, max(min_ttl, 1))

    def _fresh_enough(self, outcome: Outcome, needed: int) -> tuple[TokenRow, str]:
        if outcome.row.expires_at - self._clock() < needed:
            raise ProviderUnavailable("Strava returned a token with less life than was asked for", retry_after=60)
        return outcome.row, outcome.access_token or self._decrypt(outcome.row, "access")

    # -- writes -----------------------------------------------------------------------------------------------

    async def import_tokens(self, user_id: str, body: TokenImport, *, replace: bool = False) -> TokenStatus:
        """Insert or replace a user's tokens in one transaction (waits for an in-flight refresh's row lock).

        Raises ValidationFailed for an `expires_at` that is not plausible epoch seconds; StaleImport for a pair older
        than the stored one (an earlier `expires_at` with another refresh token) and AthleteInUse when another user
        holds the athlete, each unless `replace` (which also moves the athlete here)."""
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
            moved = await self._claim_athlete(conn, user_id, body.athlete_id, replace=replace)
            row = await store.upsert(
                conn, user_id, tokens, athlete_id=body.athlete_id, scopes=body.scopes, now=self._now_dt()
            )
            await self.journal.stored(conn, user_id, kind="imported", previous_reason=_reason(previous))
        self._rows_changed(user_id, moved)
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

    async def store_grant(
        self, user_id: str, grant: TokenGrant, *, scopes: Sequence[str], replace: bool = False
    ) -> TokenStatus:
        """Store a connect's first pair (one transaction; clears `needs_reauth`, waits for an in-flight refresh).
        A first connect, or a reconnect that added scopes, notifies `token.connected` in the same transaction.

        Raises AthleteInUse when another user holds the athlete, unless `replace` moves it here."""
        if grant.refresh_token is None:
            raise ProviderUnavailable("Strava's code exchange returned no refresh token", retry_after=5)
        tokens = self._encrypt_grant(user_id, grant)
        async with self._engine.begin() as conn:
            previous = await store.lock_for_refresh(conn, user_id)
            moved = await self._claim_athlete(conn, user_id, grant.athlete_id, replace=replace)
            row = await store.upsert(
                conn, user_id, tokens, athlete_id=grant.athlete_id, scopes=list(scopes), now=self._now_dt()
            )
            await self.journal.stored(conn, user_id, kind="connected", previous_reason=_reason(previous))
            news, added = connect_news(
                (previous.athlete_id, previous.scope_list) if previous is not None else None,
                inserted=row.version == 1,  # a new row starts at version 1; every later write bumps it
                athlete_id=row.athlete_id,
                scopes=row.scope_list,
            )
            if news:
                await self.journal.connected(
                    conn, user_id, athlete_id=row.athlete_id, scopes=row.scope_list, scopes_added=added
                )
        self._rows_changed(user_id, moved)
        self._used(user_id)
        log.info(
            "token.connected", user_id=user_id, athlete_id=row.athlete_id, was=_reason(previous), first=previous is None
        )
        return self._status(user_id, row)

    async def _claim_athlete(
        self, conn: AsyncConnection, user_id: str, athlete_id: int | None, *, replace: bool
    ) -> list[str]:
        """One athlete, one user: refuse an athlete another user holds, or (`replace`) take it from them, who become
        `missing` (their row is deleted, not revoked at Strava: the grant is the athlete's, now this user's)."""
        if athlete_id is None:
            return []
        await store.lock_athlete(conn, athlete_id)
        holders = await store.holders_of_athlete(conn, athlete_id, other_than=user_id)
        if holders and not replace:
            raise AthleteInUse(
                "this Strava athlete is connected to another user; ask to move it (`replace`) or use that user",
                athlete_id=athlete_id,
            )
        for holder in holders:
            await store.delete(conn, holder.user_id)
            await self.journal.revoked(conn, holder.user_id, athlete_id=athlete_id, reason="moved")
            log.info("token.athlete_moved", user_id=holder.user_id, to_user_id=user_id, athlete_id=athlete_id)
        return [holder.user_id for holder in holders]

    def _rows_changed(self, user_id: str, others: Sequence[str]) -> None:
        for changed in (user_id, *others):
            self.row_changed(changed)

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
        """Delete the user in one short transaction, which also ends their browser sessions
        (`service/revocation.py`) and, when the row still holds a live grant, buries its tokens in a tombstone
        (`service/grant_revocation.py`); then, holding no connection, one attempt to end the grant at Strava. A
        grant Strava does not confirm (outage, 429, no budget) is retried in the background until it does; the
        row is gone either way. Idempotent."""
        now = self._clock()
        async with self._engine.begin() as conn:
            await session_revocations.revoke(conn, user_subject(user_id), now_ms=int(now * 1000))
            row = await store.lock_for_refresh(conn, user_id)
            if row is None:
                return
            tombstone_id = None
            if row.refresh_token_enc is not None and row.reauth_reason is None:
                tombstone_id = await self._bury(conn, row, refresh_token_enc=row.refresh_token_enc, sealed=row)
            await store.delete(conn, user_id)
            await self.journal.revoked(conn, user_id, athlete_id=row.athlete_id, reason="deleted")
        self.row_changed(user_id)
        log.info("token.deleted", user_id=user_id, revoke_pending=tombstone_id is not None)
        if tombstone_id is not None:
            await self._revoke_now(user_id, tombstone_id)

    async def _revoke_now(self, user_id: str, tombstone_id: int) -> None:
        """One attempt at a just-buried grant, holding no connection; a database failure leaves it to the job."""
        if self.revoker is None:
            return
        try:
            await self.revoker.attempt(tombstone_id)
        except (DBAPIError, OSError) as exc:  # the delete stands: the tombstone is due, the job takes it
            log.warning("token.revoke.deferred", user_id=user_id, error=type(exc).__name__)

    async def _bury_if_deleted(self, user_id: str, row: TokenRow, tokens: NewTokens) -> None:
        """A refresh whose fenced write found nothing: if a DELETE removed the row while Strava rotated, the pair
        Strava just issued is the grant's only live refresh token (the delete buried the one it replaced), so it
        is buried for revoking too. A row that is there (a newer import or connect) keeps its own pair."""
        if tokens.refresh_token_enc is None:
            return  # no rotation: the refresh token the delete buried is still the live one
        async with self._engine.begin() as conn:
            if await store.lock_for_refresh(conn, user_id) is not None:
                return
            tombstone_id = await self._bury(conn, row, refresh_token_enc=tokens.refresh_token_enc, sealed=tokens)
        log.warning("token.refresh.deleted_meanwhile", user_id=user_id, tombstone_id=tombstone_id)
        await self._revoke_now(user_id, tombstone_id)

    async def _bury(
        self, conn: AsyncConnection, row: TokenRow, *, refresh_token_enc: str, sealed: TokenRow | NewTokens
    ) -> int:
        """Keep the user's grant for revoking, due now, in the caller's transaction: `refresh_token_enc` and the
        access token of `sealed` (the row's own pair, or the one a refresh just wrote). Returns the tombstone's id."""
        return await tombstones.bury(
            conn,
            user_id=row.user_id,
            athlete_id=row.athlete_id,
            refresh_token_enc=refresh_token_enc,
            access_token_enc=sealed.access_token_enc,
            access_expires_at=sealed.expires_at,
            key_id=sealed.key_id,
            due_at=int(self._clock()),
            now=self._now_dt(),
        )

    def row_changed(self, user_id: str) -> None:
        """A transaction of this process that changed the user's row has committed: this replica's reader forgets
        what it held for the user at once (other replicas hear of it through the database)."""
        self._rows.forget(user_id)

    def begin_close(self) -> None:
        """From now on no new refresh starts here (callers get a 503 and try another replica)."""
        self._closing = True

    async def aclose(self, grace_seconds: float = 20.0) -> None:
        """Shutdown: refuse new refreshes, then let every one in flight (on-demand, background, sweep, webhook
        check) finish within `grace_seconds`; one still running then is cancelled and gives its claim back (a
        refresh cut between Strava and the commit would strand its user, hence the wait)."""
        self.begin_close()
        running = {*self._background, *self._flights.values()}
        if not running:
            return
        _done, pending = await asyncio.wait(running, timeout=grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("token.refresh.cut_at_shutdown", count=len(pending))
            await asyncio.wait(pending, timeout=2.0)

    # -- the refresh itself -----------------------------------------------------------------------------------

    async def _ensure_fresh(
        self,
        user_id: str,
        *,
        force: bool,
        min_ttl: int,
        trigger: str,
        strava_slots: asyncio.Semaphore | None = None,
        rejected_version: int | None = None,
    ) -> Outcome:
        """Join the user's in-flight refresh (sharing its result or its error), or start one.

        A caller the joined flight did not satisfy (it wanted `force`, or more life) starts its own afterwards.
        With `rejected_version`, `force` holds only while the row is still that version.
        """
        flight = self._flights.get(user_id)
        if flight is not None:
            outcome = await asyncio.shield(flight)
            moved = rejected_version is not None and outcome.row.version != rejected_version
            if (outcome.refreshed or moved or not force) and outcome.row.expires_at - self._clock() >= min_ttl:
                return outcome
        flight = self._flights.get(user_id)
        if flight is None or flight.done():
            if self._closing:
                raise ProviderUnavailable("the service is shutting down; try another replica", retry_after=1)
            ask = _Ask(force, min_ttl, trigger, strava_slots, rejected_version)
            flight = asyncio.create_task(self._refresh_guarded(user_id, ask))
            self._flights[user_id] = flight
            flight.add_done_callback(lambda done: self._forget_flight(user_id, done))
        # shield: a caller that goes away (client disconnect) must not cancel the refresh others are waiting for
        return await asyncio.shield(flight)

    def _forget_flight(self, user_id: str, flight: asyncio.Task[Outcome]) -> None:
        if self._flights.get(user_id) is flight:
            del self._flights[user_id]

    def _refresh_in_background(self, user_id: str) -> None:
        if user_id in self._flights or self._closing:
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

    async def _refresh_guarded(self, user_id: str, ask: _Ask) -> Outcome:
        """The refresh's steps, with one metric and one log line for what they came to."""
        trigger = ask.trigger
        outcome_label = "error"
        try:
            outcome = await self._refresh_steps(user_id, ask)
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

    async def _refresh_steps(self, user_id: str, ask: _Ask) -> Outcome:
        """Decide, claim, call, store. The claim and the store are each one short transaction; the Strava call
        holds no connection. A caller that finds the claim held by a live owner waits for it (at most the wait
        budget), or takes the stored token when it still satisfies `min_ttl`, else 503 with `Retry-After`."""
        force, min_ttl, trigger, rejected_version = ask.force, ask.min_ttl, ask.trigger, ask.rejected_version
        priority: Priority = "sweep" if trigger in AUTOMATIC_TRIGGERS else "on_demand"
        give_up = time.monotonic() + self._wait_seconds
        message = MSG_STILL_VALID
        # The sweeper claimed the user because it is due: a lock-free look first would only repeat that.
        known = await self._read_fresh(user_id) if trigger == "sweep" else await self._get(user_id)
        while True:
            row = self._usable(user_id, known)
            if rejected_version is not None and row.version != rejected_version:
                force = False  # the rejected token was replaced already (here or on another replica)
            if not self._due(row, force=force, min_ttl=min_ttl):
                return Outcome(row, refreshed=False, message=message)  # the common case: no claim, no budget
            # The sweep's bound on Strava calls in flight is taken before the claim, so no claim waits for a slot.
            async with ask.strava_slots or contextlib.nullcontext():
                claim, current = await self._claim(user_id, row)
                if claim is not None:
                    return await self._call_and_store(user_id, row, claim, trigger=trigger, priority=priority)
            if current is None or current.version != row.version:
                known, force, message = current, False, MSG_SIBLING  # someone stored a pair since we read
                continue
            # The sweep and background refreshes leave a user another replica is refreshing to it. A caller who
            # asked for a refresh waits for that one and shares its result (the contract's refresh rules), and so
            # does one holding a token Strava refused, however long it seems to last.
            refused = rejected_version is not None and force
            automatic = trigger in AUTOMATIC_TRIGGERS
            if automatic and not refused and row.expires_at - self._clock() >= max(min_ttl, 1):
                return Outcome(row, refreshed=False, message=MSG_ELSEWHERE)
            log.info("token.refresh.waiting_for_claim", user_id=user_id, version=row.version)
            if not await self._wait_for_claim(user_id, row.version, give_up):
                raise ProviderUnavailable("a refresh for this user is in progress elsewhere; try again", retry_after=2)
            known, force, message = await self._read_fresh(user_id), False, MSG_SIBLING

    async def under_claim(
        self,
        row: TokenRow,
        call: Callable[[], Awaitable[CallResult]],
        store_result: Callable[[AsyncConnection, CallResult], Awaitable[StoreResult | None]],
    ) -> StoreResult | None:
        """Other work on a user's tokens through the refresh's own steps (the webhook's deauthorization check):
        claim the user's refresh at `row`'s version (one short transaction), `call` Strava holding no connection,
        then `store_result` in one short transaction that also gives the claim back. While the claim is held no
        refresh of the user rotates the tokens under the call. None when the row moved on from `row`, or
        `store_result` said so: decide again. A live owner's claim is waited on first (at most the wait budget).

        Raises ProviderUnavailable when that wait runs out, and what `call` or `store_result` raise (the claim is
        given back)."""
        user_id = row.user_id
        claim, current = await self._claim(user_id, row)
        if claim is None:
            held = current is not None and current.version == row.version
            if held and not await self._wait_for_claim(user_id, row.version, time.monotonic() + self._wait_seconds):
                raise ProviderUnavailable("a refresh for this user is in progress elsewhere; try again", retry_after=2)
            return None
        released = False
        try:
            result = await call()
            async with self._engine.begin() as conn:
                stored = await store_result(conn, result)
                await claims.release(conn, user_id, owner=self._owner, now=self._now_ms())
            released = True
        finally:
            if not released:
                await self._release(user_id)
        self.row_changed(user_id)
        return stored

    async def _read_fresh(self, user_id: str) -> TokenRow | None:
        async with self._autocommit.connect() as conn:
            return await store.get(conn, user_id)

    async def _claim(self, user_id: str, row: TokenRow) -> tuple[Claim | None, TokenRow | None]:
        """One short transaction: claim the user's refresh, then re-read the row under the claim. The claim is
        kept only if the row is still the version decided on; otherwise (or when a live owner holds the claim)
        nothing is kept and the caller gets the current row to decide again."""
        now = self._now_ms()
        until = now + int(self._claim_seconds * 1000)
        waiting = time.perf_counter()
        async with self._engine.connect() as conn, conn.begin() as tx:
            claim = await claims.take(
                conn,
                user_id,
                owner=self._owner,
                version_read=row.version,
                now=now,
                until=until,
                write_until=until + int(self._write_budget * 1000),
            )
            current = await store.get(conn, user_id)
            if claim is None or current is None or current.version != row.version:
                await tx.rollback()
                claim = None
        metrics.LOCK_WAIT_SECONDS.observe(time.perf_counter() - waiting)
        if claim is not None and claim.pending_until > now:
            log.warning("token.refresh.claim_taken_over", user_id=user_id, pending_ms=claim.pending_until - now)
        return claim, current

    async def _wait_for_claim(self, user_id: str, version: int, give_up: float) -> bool:
        """Look, backing off, until the row changes or the claim is gone or lapsed (True), or `give_up` (False).
        On Postgres the row's change notification (the token cache's LISTEN) wakes the waiter at once; a claim
        given back without a new pair, or a lapse, is seen at the next look. Each look is one autocommit read;
        nothing is held between looks."""
        delay = 0.02
        changed = self._rows.watch(user_id)
        try:
            while time.monotonic() < give_up:
                pause = min(delay, max(0.0, give_up - time.monotonic()))
                if changed is None:
                    await asyncio.sleep(pause)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), timeout=pause)
                    changed.clear()
                delay = min(delay * 1.5, 0.5)
                async with self._autocommit.connect() as conn:
                    row = await store.get(conn, user_id)
                    if row is None or row.version != version:
                        return True
                    claim = await claims.get(conn, user_id)
                if claim is None or claim.until <= self._now_ms():
                    return True
            return False
        finally:
            if changed is not None:
                self._rows.unwatch(user_id, changed)

    async def _call_and_store(
        self,
        user_id: str,
        row: TokenRow,
        claim: Claim,
        *,
        trigger: str,
        priority: Priority,
    ) -> Outcome:
        """Holding the claim: take a unit of the rate budget, call Strava (no connection held), store the answer.
        The claim is given back on every path (with the result, or in a short transaction of its own; a process
        that dies leaves it to lapse)."""
        started = time.perf_counter()
        if claim.rejected_version == row.version and claim.pending_until <= self._now_ms():
            # Strava already said no to this very token, and the owner who might have rotated it had its chance.
            return await self._after_rejection(user_id, row, claim, trigger=trigger, exc=None, started=started)
        released = False
        try:
            # /oauth/token takes no unit (Strava does not count it; the provider bounds such calls per process): only
            # a pause of token calls (a 429 anywhere in the fleet) gives the claim back unused.
            await self._budget.token_calls_allowed()
            try:
                grant = await self._call_strava(user_id, row)
            except ProviderRejectedError as exc:
                released = True
                return await self._after_rejection(user_id, row, claim, trigger=trigger, exc=exc, started=started)
            except (ProviderUnavailable, TokenUnreadable) as exc:
                await self._after_failure(row, exc, trigger=trigger, duration_ms=_ms_since(started))
                raise
            released = True
            return await self._store(user_id, row, grant, trigger=trigger, duration_ms=_ms_since(started))
        finally:
            if not released:
                await self._release(user_id)

    async def _release(self, user_id: str) -> None:
        """Give the claim back in a short transaction of its own (best effort: a lapse frees it anyway)."""
        try:
            async with self._engine.begin() as conn:
                await claims.release(conn, user_id, owner=self._owner, now=self._now_ms())
        except (DBAPIError, OSError) as exc:
            log.warning("token.refresh.claim_not_released", user_id=user_id, error=type(exc).__name__)

    async def _store(
        self, user_id: str, row: TokenRow, grant: TokenGrant, *, trigger: str, duration_ms: int
    ) -> Outcome:
        """One short transaction: the fenced write, its audit, the claim given back. Strava already rotated, so a
        database that is away is retried for the write budget with the new pair kept in memory."""
        tokens = self._encrypt_grant(user_id, grant)
        failpoints.hit("refresh.before_store")  # tests only: Strava answered, nothing written yet (kill or freeze)
        try:
            written = await self._write(user_id, row, tokens, trigger=trigger, duration_ms=duration_ms)
        except (DBAPIError, OSError) as exc:
            log.error("token.refresh.write_failed_retrying", user_id=user_id, error=type(exc).__name__)
            try:
                written = await self._persist_after_outage(
                    user_id, row, tokens, trigger=trigger, duration_ms=duration_ms
                )
            except (DBAPIError, OSError) as lost:
                # The write budget is spent: this pair is lost; the claim lapses and the next attempt will tell.
                log.error("token.refresh.write_lost", user_id=user_id, error=type(lost).__name__)
                raise ProviderUnavailable("the database stayed away after Strava answered", retry_after=5) from lost
        if written is None:
            # Someone stored a newer pair (an import, a connect) while we called: theirs is kept. Or the user was
            # deleted meanwhile: then the new pair is a live grant to revoke.
            await self._release(user_id)
            try:
                await self._bury_if_deleted(user_id, row, tokens)
            except (DBAPIError, OSError) as exc:
                log.error("token.refresh.orphan_pair_lost", user_id=user_id, error=type(exc).__name__)
            log.error("token.refresh.version_conflict", user_id=user_id)
            raise ProviderUnavailable("the token row changed during the refresh; try again", retry_after=5)
        self.row_changed(user_id)
        log.info(
            "token.refresh.succeeded",
            user_id=user_id,
            expires_at=grant.expires_at,
            rotated=grant.refresh_token is not None,
            version=written.version,
        )
        return Outcome(written, refreshed=True, message=MSG_REFRESHED, access_token=grant.access_token)

    async def _write(
        self, user_id: str, row: TokenRow, tokens: NewTokens, *, trigger: str, duration_ms: int
    ) -> TokenRow | None:
        async with self._engine.begin() as conn:
            written = await store.write_refresh(
                conn,
                user_id,
                tokens,
                expected_version=row.version,
                now=self._now_dt(),
                read_refresh_enc=row.refresh_token_enc,
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
                await claims.release(conn, user_id, owner=self._owner, now=self._now_ms())
                failpoints.hit("refresh.before_commit")  # tests only: a kill between Strava and commit
        return written

    async def _persist_after_outage(
        self, user_id: str, row: TokenRow, tokens: NewTokens, *, trigger: str, duration_ms: int
    ) -> TokenRow | None:
        async for attempt in stamina.retry_context(on=(DBAPIError, OSError), timeout=self._write_budget, attempts=None):
            with attempt:
                return await self._write(user_id, row, tokens, trigger=trigger, duration_ms=duration_ms)
        return None

    async def _after_rejection(
        self,
        user_id: str,
        row: TokenRow,
        claim: Claim,
        *,
        trigger: str,
        exc: ProviderRejectedError | None,
        started: float,
    ) -> Outcome:
        """Strava said no to the refresh token we read. One short transaction: a newer pair stored meanwhile is
        used; a lapsed owner that may still store its pair keeps the user unflagged (503 until its write budget
        ends); otherwise the user is flagged `needs_reauth`. The claim is given back either way."""
        now_ms = self._now_ms()
        async with self._engine.begin() as conn:
            if exc is not None:
                await self.journal.refresh_attempt(
                    conn,
                    user_id,
                    trigger=trigger,
                    outcome="rejected",
                    strava_status=exc.status_code,
                    duration_ms=_ms_since(started),
                )
            current = await store.get(conn, user_id)
            if current is not None and current.version != row.version:
                await claims.release(conn, user_id, owner=self._owner, now=now_ms)
                log.info("token.refresh.sibling_rotated", user_id=user_id, version=current.version)
                return Outcome(self._usable(user_id, current), refreshed=False, message=MSG_SIBLING)
            pending = claim.pending_until > now_ms
            if pending:
                # Held until then, so that nobody presents the dead token again before the owner could write.
                await claims.hold(
                    conn, user_id, owner=self._owner, until=claim.pending_until, rejected_version=row.version
                )
                await store.record_failure(
                    conn, user_id, error="owner_write_pending", retry_at=claim.pending_until // 1000 + 1
                )
            else:
                await self._flag_rejected(conn, row, trigger=trigger)
                await claims.release(conn, user_id, owner=self._owner, now=now_ms)
        if pending:
            wait = max(1, (claim.pending_until - now_ms) // 1000 + 1)
            log.warning("token.refresh.rejected_owner_pending", user_id=user_id, retry_after=wait)
            raise ProviderUnavailable(
                "an earlier refresh of this user may still be storing its result", retry_after=wait
            )
        self.row_changed(user_id)
        log.warning("token.refresh.reauth_required", user_id=user_id, reason="refresh_token_invalid")
        raise ReauthRequired(
            MSG_REAUTH, authorize_url=self._authorize_url(user_id), reauth_reason="refresh_token_invalid"
        )

    async def _flag_rejected(self, conn: AsyncConnection, row: TokenRow, *, trigger: str) -> None:
        flagged = await store.mark_needs_reauth(
            conn, row.user_id, reason="refresh_token_invalid", now=self._now_dt(), expected_version=row.version
        )
        if flagged is not None:
            await self.journal.needs_reauth(
                conn, row.user_id, athlete_id=row.athlete_id, reason="refresh_token_invalid", trigger=trigger
            )

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
                delay = int(backoff_seconds(row.failure_count + 1, first=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS))
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

    async def _call_strava(self, user_id: str, row: TokenRow) -> TokenGrant:
        """One token call, retries included, within the token deadline (shorter than the claim), holding no
        connection. Raises ProviderRejectedError (handled by the caller) or the service's 503 errors."""
        refresh_token = self._decrypt(row, "refresh")
        started = time.perf_counter()
        try:
            try:
                # The deadline starts when the call is sent; the wait for a token slot is bounded by what the claim
                # leaves beyond it (a claim is at least 5 s longer than the deadline: config.py).
                grant = await self._strava.refresh(
                    refresh_token,
                    deadline_seconds=self._token_timeout,
                    slot_wait_seconds=max(1.0, self._claim_seconds - self._token_timeout - 2.0),
                )
            except TimeoutError as exc:
                raise ProviderTransientError(
                    "Strava did not answer within the token deadline", answer_lost=True
                ) from exc
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

    def _decrypt(self, row: TokenRow, field: Field) -> str:
        try:
            return self._cipher.open(row, field)
        except DecryptionError as exc:
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

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _now_dt(self) -> datetime:
        return datetime.fromtimestamp(int(self._clock()), UTC)


AUTOMATIC_TRIGGERS = frozenset({"sweep", "background"})
BACKOFF_BASE_SECONDS = 30
BACKOFF_CAP_SECONDS = 3600


_OUTCOME_BY_CODE = {
    "reauth_required": "reauth_required",
    "tokens_missing": "tokens_missing",
    "provider_unavailable": "transient",
    "provider_rate_limited": "rate_limited",
}


def _encode_cursor(row: TokenRow) -> str:
    return base64.urlsafe_b64encode(f"{row.expires_at}:{row.user_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    """Range-checked before any SQL: a tampered cursor (an int past BIGINT, a NUL in the id) is a 422, never a
    database error (a 500 on SQLite, a `database_unavailable` on Postgres, before issue 14)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        expires_at, user_id = raw.split(":", 1)
        expires = int(expires_at)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValidationFailed("`cursor` is not a cursor this service issued") from exc
    if not 0 <= expires <= MAX_BIGINT or not USER_ID_RE.fullmatch(user_id):
        raise ValidationFailed("`cursor` is not a cursor this service issued")
    return expires, user_id


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
