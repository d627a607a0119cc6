"""What the service records about each change: an audit row for every change of state and every failed refresh
attempt, a count per hour and outcome for every refresh attempt, and a notification for the app when a user's
connection changes state (`token.needs_reauth`, `token.recovered`, `token.revoked`) or a connect gives the app
something new to sync (`token.connected`).

A successful refresh is only counted (at a million athletes that is millions of rows a day that nobody reads); it
gets an audit row too when it ends a run of failures, so a user's history shows how each failure streak ended.

Every method takes the connection of the transaction that makes the change, so the record, the notification and
the change commit together or not at all (the transactional outbox). One notification per change of state: the
callers only call these when their UPDATE actually changed the state, never per attempt.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.clock import Clock
from tokensvc.store import journal as store
from tokensvc.store.journal import EventRecord

SUCCEEDED = "succeeded"
# Rows of the hourly rollup each (hour, outcome) is spread over, so that concurrent commits seldom wait on one row.
COUNT_SLOTS = 8
HOUR = 3600

NEEDS_REAUTH = "token.needs_reauth"
RECOVERED = "token.recovered"
REVOKED = "token.revoked"
CONNECTED = "token.connected"


def new_message_id() -> str:
    """A Standard Webhooks `webhook-id`: unique, and the same on every delivery attempt of one notification."""
    return f"msg_{secrets.token_hex(16)}"


class Journal:
    """Audit rows and outbox notifications. `notify` False (no TOKENSVC_NOTIFY_URL) records audit rows only."""

    def __init__(self, *, clock: Clock = time.time, notify: bool = False, connect_url: str | None = None) -> None:
        self._clock = clock
        self.notify = notify
        # Where the app can send a user to reconnect: the browser endpoint that starts the consent with the user's
        # session. It does not expire, unlike a signed authorize URL (ten minutes), so a late delivery still works.
        self._connect_url = connect_url

    async def refresh_attempt(
        self,
        conn: AsyncConnection,
        user_id: str,
        *,
        trigger: str,
        outcome: str,
        strava_status: int | None = None,
        duration_ms: int | None = None,
        detail: str | None = None,
        after_failures: int = 0,
    ) -> None:
        """One call to Strava's token endpoint and how it ended: counted always; an audit row unless it succeeded
        without ending a run of `after_failures` failed attempts."""
        now = self._clock()
        await store.count_attempt(
            conn, hour=int(now) - int(now) % HOUR, outcome=outcome, slot=random.randrange(COUNT_SLOTS)
        )
        if outcome == SUCCEEDED:
            if not after_failures:
                return
            detail = f"after {after_failures} failures"
        await store.append(
            conn,
            EventRecord(
                user_id=user_id,
                kind="refresh",
                occurred_at=self._now(),
                trigger=trigger,
                outcome=outcome,
                strava_status=strava_status,
                duration_ms=duration_ms,
                detail=detail,
            ),
        )

    async def stored(self, conn: AsyncConnection, user_id: str, *, kind: str, previous_reason: str | None) -> None:
        """Tokens stored by a connect (`connected`) or an import (`imported`); a user who needed to reconnect and
        now has tokens again has recovered."""
        await store.append(conn, EventRecord(user_id=user_id, kind=kind, occurred_at=self._now()))
        if previous_reason is not None:
            await self._changed(
                conn,
                user_id,
                RECOVERED,
                kind="recovered",
                detail=f"was {previous_reason}",
                data={
                    "status": "valid",
                    "previous_reason": previous_reason,
                    "via": kind,
                },
            )

    async def connected(
        self,
        conn: AsyncConnection,
        user_id: str,
        *,
        athlete_id: int | None,
        scopes: list[str],
        scopes_added: list[str] | None = None,
    ) -> None:
        """A connect that gives the app something new to sync: a first one (`scopes_added` None: the user had no
        row, never connected or deleted since, or held another athlete), or a reconnect that added scopes (listed in
        `scopes_added`). No audit row of its own: `stored` wrote the connect's."""
        data: dict[str, object] = {"athlete_id": athlete_id, "scopes": scopes}
        if scopes_added is not None:
            data["scopes_added"] = scopes_added
        await self._enqueue(conn, user_id, CONNECTED, data)

    async def needs_reauth(
        self, conn: AsyncConnection, user_id: str, *, athlete_id: int | None, reason: str, trigger: str | None = None
    ) -> None:
        """The user moved to `needs_reauth` (`refresh_token_invalid` or `deauthorized`)."""
        await self._changed(
            conn,
            user_id,
            NEEDS_REAUTH,
            kind="needs_reauth",
            trigger=trigger,
            detail=reason,
            data={
                "status": "needs_reauth",
                "reason": reason,
                "athlete_id": athlete_id,
                "connect_url": self._connect_url,
            },
        )

    async def revoked(self, conn: AsyncConnection, user_id: str, *, athlete_id: int | None, reason: str) -> None:
        """The user's tokens were revoked at Strava and deleted here (`DELETE …/tokens`); the user is `missing`."""
        await self._changed(
            conn,
            user_id,
            REVOKED,
            kind="revoked",
            detail=reason,
            data={"status": "missing", "reason": reason, "athlete_id": athlete_id, "connect_url": self._connect_url},
        )

    async def note(self, conn: AsyncConnection, user_id: str, *, kind: str, detail: str | None = None) -> None:
        """An audit row without a change of state (for example a deauthorization Strava did not confirm)."""
        await store.append(conn, EventRecord(user_id=user_id, kind=kind, occurred_at=self._now(), detail=detail))

    async def _changed(
        self,
        conn: AsyncConnection,
        user_id: str,
        event_type: str,
        *,
        kind: str,
        data: dict[str, object],
        trigger: str | None = None,
        detail: str | None = None,
    ) -> None:
        await store.append(
            conn, EventRecord(user_id=user_id, kind=kind, occurred_at=self._now(), trigger=trigger, detail=detail)
        )
        await self._enqueue(conn, user_id, event_type, data)

    async def _enqueue(self, conn: AsyncConnection, user_id: str, event_type: str, data: dict[str, object]) -> None:
        """One notification in the outbox, in the caller's transaction (nothing without TOKENSVC_NOTIFY_URL)."""
        if not self.notify:
            return
        now = self._now()
        payload = {
            "type": event_type,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "data": {"user_id": user_id, **data},
        }
        await store.enqueue(
            conn,
            message_id=new_message_id(),
            event_type=event_type,
            user_id=user_id,
            payload=json.dumps(payload, separators=(",", ":")),
            created_at=now,
            deliver_at=int(self._clock()),
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)


def connect_news(
    previous: tuple[int | None, list[str]] | None, *, inserted: bool, athlete_id: int | None, scopes: list[str]
) -> tuple[bool, list[str] | None]:
    """Whether a connect is news for the app, and which scopes it added.

    `inserted`: the connect's own write created the user's row (the database decides, so two concurrent first
    connects notify once). `previous`: the row's (athlete, scopes) as the connect's transaction read it, None when
    it saw none (then, if it did not insert, a concurrent connect did, and notified). A first connect, or one for
    another athlete than the stored one, is news with no `scopes_added`; a reconnect of the same athlete is news
    only when it added scopes."""
    if inserted:
        return True, None
    if previous is None:
        return False, None
    if previous[0] is not None and athlete_id is not None and previous[0] != athlete_id:
        return True, None
    added = [s for s in scopes if s not in previous[1]]
    return bool(added), added or None
