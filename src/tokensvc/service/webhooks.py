"""Strava webhooks: the subscription check; athlete deauthorizations, stored at once and applied in the background
only once Strava confirms them; every other event for a connected athlete forwarded to the app through the outbox.

The intake costs an attacker more than it costs us: an event naming another subscription (once the app's is known)
or an athlete nobody holds is dropped after one index read; a deauthorization arms the athlete's one pending check
(one row per athlete, nothing of the body kept; events coalesce into it, and a finished check is re-armed no sooner
than `recheck_seconds` after it ran); a forwarded event is one outbox row per user keyed by its content (Strava's
retries collapse), with only Strava's documented `updates`, capped per athlete and hour (service/forwarded_events.py).

Events are unsigned, so an event is a hint, never proof. For every user connected as the athlete, the processor
asks Strava about the user's own access token (obtained through the normal exactly-once refresh path): 401 means
access really was revoked; 200 means it was not (a forged or stale event: the tokens are kept and the audit says
so). A refresh token Strava already rejected counts as confirmed. The check takes the refresh's own steps
(decide, claim, call, store: `TokenService.under_claim`): the user's refresh claim is held while Strava is asked, so
no refresh rotates the tokens under the question, and only if the row is still the version that was checked are the
tokens discarded, in the claim's short store transaction; a refresh that read the row earlier can no longer write
(its version check stops it), so the deauthorization wins. A user already `deauthorized` is left alone, which makes
Strava's retries (and replays) one effect.

Each replica runs a processor: a new event wakes the replica that stored it, and a poll picks up events due for
another attempt (after a transient failure) or left behind by a replica that died (its lease runs out).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import Counter
from datetime import UTC, datetime
from functools import partial
from typing import Final, Literal

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokensvc import metrics
from tokensvc.background import STOP_DEADLINE_SECONDS, every
from tokensvc.backoff import backoff_seconds
from tokensvc.clock import Clock
from tokensvc.errors import ProviderRateLimited, ReauthRequired, RetryLater, TokensMissing, WebhookForbidden
from tokensvc.providers.strava import ProviderConfigError, ProviderTransientError, StravaClient
from tokensvc.schemas import StravaEvent
from tokensvc.service import forwarded_events as forwarded
from tokensvc.service.forwarded_events import forwarded_type
from tokensvc.service.rate_budget import RateBudget
from tokensvc.service.tokens import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, TokenService
from tokensvc.store import journal
from tokensvc.store import tokens as tokens_store
from tokensvc.store import webhook_events as store
from tokensvc.store.tokens import TokenRow
from tokensvc.store.webhook_events import NewEvent, PendingEvent

log = structlog.get_logger(__name__)

DEAUTHORIZED = "deauthorized"
# What one user's check ended with: tokens discarded now; discarded before (a duplicate); Strava still honours the
# token; no such user (any more).
UserOutcome = Literal["deauthorized", "already", "unconfirmed", "gone"]
_APPLIED: Final = "deauthorized"
_ALREADY: Final = "already"
_UNCONFIRMED: Final = "unconfirmed"
_GONE: Final = "gone"
_MIN_TTL = 60  # enough life for the one confirmation call
_ROUNDS = 3  # re-checks when the user's row changes between the check and the guard
_STORED_CHECK: Final = "deauthorization"
_FORWARDED: Final = "forwarded"
_SUBSCRIPTION_TTL = 60.0  # how stale this replica's idea of the app's subscription id may be
HOUR = 3600


class _RetryLater(Exception):
    """The event cannot be decided now (Strava or the budget unavailable); try it again later."""

    def __init__(self, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class StravaWebhooks:
    """Receives Strava's push events and processes deauthorizations. Each method says where its transactions are."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        tokens: TokenService,
        strava: StravaClient,
        budget: RateBudget,
        verify_token: str | None,
        clock: Clock,
        path_secret: str | None = None,
        forward_per_athlete_hour: int = 100,
        recheck_seconds: int = 600,
        poll_interval_seconds: int = 30,
        lease_seconds: int = 300,
        batch_size: int = 20,
    ) -> None:
        self._engine = engine
        self._tokens = tokens
        self._strava = strava
        self._budget = budget
        self._verify_digest = hashlib.sha256(verify_token.encode()).digest() if verify_token else None
        self._path_digest = hashlib.sha256(path_secret.encode()).digest() if path_secret else None
        self._clock = clock
        self.forward_per_athlete_hour = forward_per_athlete_hour
        self.recheck_seconds = recheck_seconds
        self._subscription: tuple[float, int | None] | None = None
        self.lease_seconds = lease_seconds
        self.batch_size = batch_size
        self._stopping = asyncio.Event()
        self._job = every("webhooks", self._scheduled_pass, interval_seconds=poll_interval_seconds)

    # -- receiving ----------------------------------------------------------------------------------------------

    def challenge(self, *, verify_token: str, challenge: str) -> str:
        """The challenge to echo when `verify_token` is ours (digests compared in constant time).

        Raises WebhookForbidden otherwise, and when no verify token is configured.
        """
        presented = hashlib.sha256(verify_token.encode()).digest()
        if self._verify_digest is None or not hmac.compare_digest(presented, self._verify_digest):
            log.warning("webhook.challenge_refused", configured=self._verify_digest is not None)
            raise WebhookForbidden("the verify token is not this service's TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN")
        log.info("webhook.challenge_answered")
        return challenge

    def path_matches(self, presented: str | None) -> bool:
        """Whether a request came to the configured callback path: the secret segment when one is set (compared in
        constant time), else the bare path."""
        if self._path_digest is None or presented is None:
            return self._path_digest is None and presented is None
        return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._path_digest)

    async def receive(self, event: StravaEvent) -> bool:
        """Decide an event before the 200: dropped (another subscription's, an athlete nobody holds, of no known
        kind, over the athlete's cap), coalesced into the athlete's pending deauthorization check, or forwarded to
        the app through the outbox. True when something was stored. One read and at most one short transaction;
        no Strava call."""
        kind = await self._receive(event)
        metrics.WEBHOOK_EVENTS_TOTAL.labels(kind=kind).inc()
        log.info(
            "webhook.event_received",
            kind=kind,
            object_type=event.object_type,
            aspect_type=event.aspect_type,
            athlete_id=event.owner_id,
        )
        return kind in (_STORED_CHECK, _FORWARDED)

    async def _receive(self, event: StravaEvent) -> str:
        if not await self._ours(event.subscription_id):
            return "other_subscription"
        event_type = None if event.is_deauthorization else forwarded_type(event)
        if not event.is_deauthorization and (event_type is None or not self._tokens.journal.notify):
            return "ignored"
        async with self._engine.connect() as conn:
            user_ids = await store.users_of_athlete(conn, event.owner_id)
        if not user_ids:
            return "unknown_athlete"
        if event_type is None:
            return await self._arm_check(event)
        return await self._forward(event, event_type, user_ids)

    async def _arm_check(self, event: StravaEvent) -> str:
        new = NewEvent(
            dedupe_key=f"deauth:{event.owner_id}",
            owner_id=event.owner_id,
            object_type=event.object_type,
            aspect_type=event.aspect_type,
            event_time=event.event_time,
            subscription_id=event.subscription_id,
            payload="",
        )
        now = self._clock()
        async with self._engine.begin() as conn:
            # whole seconds: a check being processed is touched at most once a second (store.arm_check)
            armed = await store.arm_check(conn, new, received_at=datetime.fromtimestamp(int(now), UTC), due_at=int(now))
        if armed:
            self.wake()
        return _STORED_CHECK if armed else "coalesced"

    async def _forward(self, event: StravaEvent, event_type: str, user_ids: list[str]) -> str:
        """One transaction: the athlete's count for the hour looked at first (over the cap nothing is written: no
        row, and no dead row either), then a notification per user (Strava's retries are the same rows) and the
        count raised. Replicas racing at the cap may each store one more."""
        updates = forwarded.documented_updates(event.updates)
        now = self._clock()
        window = int(now) - int(now) % HOUR
        created_at = datetime.fromtimestamp(now, UTC)
        async with self._engine.begin() as conn:
            if await store.forwarded_count(conn, event.owner_id, window_start=window) >= self.forward_per_athlete_hour:
                return "over_cap"
            stored = 0
            for user_id in user_ids:
                stored += await journal.enqueue(
                    conn,
                    message_id=forwarded.message_id(event, updates, user_id),
                    event_type=event_type,
                    user_id=user_id,
                    payload=forwarded.payload(event, event_type, updates, user_id, now=created_at),
                    created_at=created_at,
                    deliver_at=int(now),
                    once=True,
                )
            if not stored:
                return "duplicate"
            await store.count_forwarded(conn, event.owner_id, window_start=window)
        return _FORWARDED

    async def _ours(self, subscription_id: int) -> bool:
        """False for an event naming another subscription than the app's, once the service knows the app's (read
        from the database at most every `_SUBSCRIPTION_TTL` seconds)."""
        now = time.monotonic()
        if self._subscription is None or now - self._subscription[0] > _SUBSCRIPTION_TTL:
            async with self._engine.connect() as conn:
                self._subscription = (now, await store.known_subscription(conn))
        known = self._subscription[1]
        return known is None or known == subscription_id

    async def learn_subscription(self, subscription_id: int | None) -> None:
        """Record the app's push subscription id (None: it has none); every replica sees it within a minute."""
        async with self._engine.begin() as conn:
            await store.learn_subscription(conn, subscription_id, now=self._now_dt())
        self._subscription = None
        log.info("webhook.subscription_learned", subscription_id=subscription_id)

    # -- processing ---------------------------------------------------------------------------------------------

    async def process_once(self) -> int:
        """Process every pending event that is due now, claimed in batches (one short transaction per claim, one
        per user decision). Returns how many events were worked on. Raises database errors."""
        processed = 0
        while not self._stopping.is_set():
            now = int(self._clock())
            async with self._engine.begin() as conn:
                claimed = await store.claim_pending(
                    conn, now=now, limit=self.batch_size, lease_until=now + self.lease_seconds
                )
            if not claimed:
                break
            for event in claimed:
                if self._stopping.is_set():
                    break  # its lease runs out and another replica (or the next start) takes it
                await self._process(event)
                processed += 1
        return processed

    async def _process(self, event: PendingEvent) -> None:
        async with self._engine.connect() as conn:
            user_ids = await store.users_of_athlete(conn, event.owner_id)
        outcomes: Counter[UserOutcome] = Counter()
        try:
            for user_id in user_ids:
                outcomes[await self._deauthorize_user(user_id, event.owner_id)] += 1
        except _RetryLater as exc:
            delay = exc.retry_after or int(
                backoff_seconds(event.attempts + 1, first=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS)
            )
            async with self._engine.begin() as conn:
                await store.retry_later(
                    conn, event.id, next_attempt_at=int(self._clock()) + delay, result=f"retrying: {exc}"
                )
            metrics.DEAUTHORIZATIONS_TOTAL.labels(outcome="retried").inc()
            log.warning("webhook.deauthorization_retry", athlete_id=event.owner_id, in_seconds=delay, reason=str(exc))
            return
        if outcomes[_APPLIED] or outcomes[_ALREADY]:
            state = "confirmed"
        elif outcomes[_UNCONFIRMED]:
            state = "unconfirmed"
        else:
            state = "no_user"
        result = ", ".join(f"{name} {outcomes[name]}" for name in (_APPLIED, _ALREADY, _UNCONFIRMED, _GONE))
        async with self._engine.begin() as conn:
            finished = await store.finish(
                conn,
                event,
                state=state,
                result=result,
                processed_at=self._now_dt(),
                recheck_at=int(self._clock()) + self.recheck_seconds,
            )
        metrics.DEAUTHORIZATIONS_TOTAL.labels(outcome=state).inc()
        log.info(
            "webhook.deauthorization_processed",
            athlete_id=event.owner_id,
            state=state,
            users=len(user_ids),
            again_after=None if finished else self.recheck_seconds,  # an event came while it ran
        )

    async def _deauthorize_user(self, user_id: str, athlete_id: int) -> UserOutcome:
        """Decide, claim, call, store: the refresh's own steps (`TokenService.under_claim`), no lock of its own.

        Decide from a read which token to ask Strava about; claim the user's refresh at that row's version (no
        refresh rotates the tokens while Strava is asked); ask, holding no connection; store in one short
        transaction, fenced by the version: discard the tokens when Strava confirmed, else note that it did not.
        A row that moved on meanwhile is decided again. A confirmed deauthorization beats a late refresh write (the
        version, and a flag other than `refresh_token_invalid`, stop that write).

        A refresh token Strava rejects while this event is checked confirms it. A user flagged
        `refresh_token_invalid` before the event came is another matter: that rejection proves the refresh token
        dead (a lost answer strands a user the same way), not that the athlete revoked access, so the stored access
        token is asked about while it is alive (another client's rotation leaves it alive, a revocation does not);
        once it has expired, the earlier rejection is the only answer Strava gave, and it is taken.
        """
        rejected_now = False
        for _round in range(_ROUNDS):
            async with self._engine.connect() as conn:
                before = await tokens_store.get(conn, user_id)
            if before is None or before.athlete_id != athlete_id:
                return _GONE  # deleted, or reconnected as another athlete, since the event was stored
            if before.reauth_reason == DEAUTHORIZED:
                return _ALREADY
            try:
                token = await self._token_to_ask(before, rejected_now=rejected_now)
                outcome: UserOutcome | None = await self._tokens.under_claim(
                    before, partial(self._confirmed, token), partial(self._store_verdict, before)
                )
            except ReauthRequired:
                rejected_now = True
                continue  # Strava rejected the refresh token just now: the next round sees it
            except TokensMissing:
                return _GONE
            except RetryLater as exc:  # Strava or the budget unavailable, or keys missing: nothing changed
                raise _RetryLater(exc.code, exc.retry_after) from exc
            if outcome is not None:
                return outcome
        raise _RetryLater("the user's tokens kept changing while the deauthorization was checked")

    async def _token_to_ask(self, before: TokenRow, *, rejected_now: bool) -> str | None:
        """The access token to ask Strava about, or None when the answer is in already (the refresh token was
        rejected: just now, or earlier with the access token since expired). An unflagged user's token comes from
        the normal exactly-once refresh path. Raises ReauthRequired, TokensMissing, RetryLater."""
        if before.reauth_reason is None:
            return (await self._tokens.access_token(before.user_id, min_ttl=_MIN_TTL)).access_token
        if rejected_now:
            return None
        stored = self._tokens.live_access_token(before, min_ttl=_MIN_TTL)
        if stored is None:
            # Nothing left to ask: Strava's rejection of the refresh token is the only answer there is. The user
            # must reconnect either way, and the tokens discarded were dead.
            log.info("webhook.deauthorization_on_rejection", user_id=before.user_id, was=before.reauth_reason)
        return stored

    async def _confirmed(self, access_token: str | None) -> bool:
        """The call step: whether Strava confirms the revocation (refuses `access_token`; None: confirmed)."""
        return access_token is None or not await self._strava_honours(access_token)

    async def _strava_honours(self, access_token: str) -> bool:
        try:
            # Background work, like the sweep: it may use the sweep's share of the window only, so a flood of
            # (unsigned, possibly forged) events can never spend the calls that callers' refreshes need.
            await self._budget.acquire("sweep", read=True)  # a GET: the overall and the read windows
        except ProviderRateLimited as exc:
            raise _RetryLater(exc.code, exc.retry_after) from exc
        try:
            return await self._strava.check_access(access_token)
        except ProviderTransientError as exc:
            delay = None
            if exc.rate_limited:
                delay = await self._budget.pause(exc.retry_after, kind=self._budget.kind_of_429(read=True))
            raise _RetryLater(f"Strava unavailable ({exc.status_code or 'no answer'})", delay) from exc
        except ProviderConfigError as exc:
            raise _RetryLater("Strava rejected the application's credentials", 300) from exc

    async def _store_verdict(self, before: TokenRow, conn: AsyncConnection, confirmed: bool) -> UserOutcome | None:
        """The store step, in the claim's second short transaction: discard the tokens and flag `deauthorized` if
        the row is still the version that was checked (None when it changed: decide again); or, unconfirmed, note
        that Strava still honours the token (the tokens are kept)."""
        user_id, athlete_id = before.user_id, before.athlete_id
        if not confirmed:
            await self._tokens.journal.note(
                conn,
                user_id,
                kind="deauthorization_unconfirmed",
                detail=f"athlete {athlete_id}: Strava still honours the access token; tokens kept",
            )
            log.warning("webhook.deauthorization_unconfirmed", user_id=user_id, athlete_id=athlete_id)
            return _UNCONFIRMED
        flagged = await tokens_store.mark_needs_reauth(
            conn, user_id, reason=DEAUTHORIZED, now=self._now_dt(), expected_version=before.version, discard_tokens=True
        )
        if flagged is None:
            return None
        if before.reauth_reason is None:
            await self._tokens.journal.needs_reauth(
                conn, user_id, athlete_id=athlete_id, reason=DEAUTHORIZED, trigger="webhook"
            )
        else:  # already told to reconnect: a record of the change, but no second notification
            await self._tokens.journal.note(
                conn, user_id, kind="needs_reauth", detail=f"{DEAUTHORIZED} (was {before.reauth_reason})"
            )
        log.info("token.deauthorized", user_id=user_id, athlete_id=athlete_id, was=before.reauth_reason)
        return _APPLIED

    # -- the background loop ------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Process now (a new event arrived in this replica)."""
        self._job.wake()

    def start(self) -> None:
        """Process pending events on every wake and every `poll_interval_seconds` (±10%) until `stop`."""
        self._job.start()

    async def _scheduled_pass(self) -> None:
        try:
            await self.process_once()
        except (DBAPIError, OSError) as exc:  # any other failure is the job's; the leases hand its events back later
            log.error("webhook.processor.database_unavailable", error=type(exc).__name__)

    async def stop(self, *, deadline_seconds: float = STOP_DEADLINE_SECONDS) -> None:
        """Claim nothing more, let the event in hand finish (within `deadline_seconds`), end the loop."""
        self._stopping.set()
        await self._job.stop(deadline_seconds=deadline_seconds)

    def _now_dt(self) -> datetime:
        return datetime.fromtimestamp(int(self._clock()), UTC)
