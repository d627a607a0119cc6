"""An in-process cache of valid token rows, kept true across replicas by Postgres LISTEN/NOTIFY (Postgres only).

Every change to a user's row NOTIFYs `tokensvc_token_changes` with the user id (a trigger, migration 0005), whoever
writes it. Each replica LISTENs on one connection of its own and drops that user's entry when told. So a replica
serves a cached row only while nobody has changed it, give or take the notification's delivery (well under a
millisecond on one network; an access token replaced by a refresh stays valid at Strava until its own expiry).

What keeps it honest when the notifications cannot be trusted:
- the cache is used only while the listener is connected; losing the connection empties it and bypasses it until
  the listener is back (and has emptied it again);
- a read that raced a notification is not cached (an epoch counter moves on every notification and reset);
- an entry lives at most `max_age_seconds`, which bounds staleness even if a connection dies silently, and the
  listener pings its connection so that such a death is noticed;
- the service forgets a user itself right after each commit of its own that changes the row (import, connect,
  refresh, deauthorization, delete), so the replica that wrote never serves what it replaced, even before the
  notification arrives;
- only rows the caller's `keep` accepts are cached or served (the service keeps `valid` rows only: a row that is
  due for a refresh, or flagged, is always read from the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from tokensvc.background import PeriodicJob
from tokensvc.store.reader import RowReader
from tokensvc.store.tokens import TokenRow

log = structlog.get_logger(__name__)

CHANNEL = "tokensvc_token_changes"
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0


class CachedReader:
    """A `RowReader` in front of another, for Postgres. `start()` begins listening; until the listener is
    connected every read goes to the database.

    Bounded: at most `max_entries` rows (under 2 KB each with their ciphertexts, bench/growth.py: 100,000
    entries stay under about 200 MB), none older than `max_age_seconds`. Entries are kept in the order they were
    stored, which is also the order of their age, so evicting the oldest (when full) and reaping the stale ones (on
    every store, and every `ping_seconds` while idle) are O(1) per entry.
    """

    def __init__(
        self,
        inner: RowReader,
        *,
        dsn: str,
        keep: Callable[[TokenRow], bool],
        max_entries: int = 100_000,
        max_age_seconds: float = 30.0,
        ping_seconds: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._dsn = dsn
        self._keep = keep
        self.max_entries = max_entries
        self.max_age_seconds = max_age_seconds
        self._ping_seconds = ping_seconds
        self._monotonic = monotonic
        self._entries: OrderedDict[str, tuple[TokenRow, float]] = OrderedDict()
        self._epoch = 0
        self._live = False
        self._interrupt = asyncio.Event()  # ends the current connection's wait: lost, or closing
        self._listener = PeriodicJob("token-cache", self._listen, interval_seconds=RECONNECT_FIRST_SECONDS, jitter=0)
        self._retry_in = RECONNECT_FIRST_SECONDS  # the wait after the next failure
        self._watchers: dict[str, set[asyncio.Event]] = {}

    @property
    def live(self) -> bool:
        """True while the listener is connected: only then is anything served from memory."""
        return self._live

    @property
    def size(self) -> int:
        """Entries held now (at most `max_entries`)."""
        return len(self._entries)

    async def get(self, user_id: str) -> TokenRow | None:
        if self._live:
            entry = self._entries.get(user_id)
            if entry is not None:
                row, cached_at = entry
                if self._monotonic() - cached_at < self.max_age_seconds and self._keep(row):
                    return row
                self._entries.pop(user_id, None)
        epoch = self._epoch
        fresh = await self._inner.get(user_id)
        if fresh is not None and self._live and epoch == self._epoch and self._keep(fresh):
            self._store(user_id, fresh)
        return fresh

    def _store(self, user_id: str, row: TokenRow) -> None:
        now = self._monotonic()
        entries = self._entries
        entries[user_id] = (row, now)
        entries.move_to_end(user_id)  # a concurrent miss may have stored it first: keep the order that of age
        self._reap(now)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def _reap(self, now: float) -> None:
        """Drop the entries past their age, oldest first (they are at the front)."""
        entries = self._entries
        horizon = now - self.max_age_seconds
        while entries:
            _row, cached_at = entries[next(iter(entries))]
            if cached_at > horizon:
                return
            entries.popitem(last=False)

    def forget(self, user_id: str) -> None:
        """This user's row changed (a notification, or this replica's own commit): drop it, and keep any read in
        flight from caching what it saw."""
        self._epoch += 1
        self._entries.pop(user_id, None)
        for event in self._watchers.get(user_id, ()):
            event.set()

    def _reset(self, *, live: bool) -> None:
        self._epoch += 1
        self._entries.clear()
        self._live = live
        for events in self._watchers.values():  # a change may have gone unheard: every waiter looks again
            for event in events:
                event.set()

    def watch(self, user_id: str) -> asyncio.Event | None:
        """Set on every change to the user's row this replica hears of (a notification, its own commit) and on
        every listener reset; a waiter on a refresh claim wakes on it instead of at its next poll."""
        event = asyncio.Event()
        self._watchers.setdefault(user_id, set()).add(event)
        return event

    def unwatch(self, user_id: str, event: asyncio.Event) -> None:
        events = self._watchers.get(user_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._watchers[user_id]

    # -- the listener -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._listener.start()

    async def _listen(self) -> None:
        """The listener job's run: one connection, until it is lost. The job's interval is the wait before the
        next connection: `RECONNECT_FIRST_SECONDS` after one that worked, doubled (up to `RECONNECT_MAX_SECONDS`)
        by each failure in a row, whatever it was (an unexpected one is then logged by the job, with its traceback)."""
        listener = self._listener
        try:
            await self._listen_once()
        except Exception as exc:
            listener.interval_seconds, self._retry_in = self._retry_in, min(self._retry_in * 2, RECONNECT_MAX_SECONDS)
            if not isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError | TimeoutError):
                raise
            log.warning(
                "token_cache.listener_down", error=type(exc).__name__, retry_in_seconds=listener.interval_seconds
            )
        else:
            listener.interval_seconds = self._retry_in = RECONNECT_FIRST_SECONDS

    async def _listen_once(self) -> None:
        """Listen until the connection is lost (or a ping fails, or `aclose`)."""
        self._interrupt = interrupt = asyncio.Event()

        def on_notification(_conn: Any, _pid: int, _channel: str, user_id: str) -> None:
            self.forget(user_id)

        def on_termination(_conn: Any) -> None:
            self._reset(live=False)  # at once: the notifications stopped with the connection
            interrupt.set()

        conn = await asyncpg.connect(self._dsn, timeout=5, server_settings={"application_name": "tokensvc-token-cache"})
        try:
            conn.add_termination_listener(on_termination)
            await conn.add_listener(CHANNEL, on_notification)
            self._reset(live=True)  # nothing cached before the LISTEN can be trusted: start empty
            log.info("token_cache.listening")
            while not interrupt.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupt.wait(), timeout=self._ping_seconds)
                if not interrupt.is_set():
                    await conn.fetchval("SELECT 1", timeout=self._ping_seconds)
                    self._reap(self._monotonic())
        finally:
            self._reset(live=False)
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except Exception:
                conn.terminate()  # never two listeners at once: the connection budget counts one (config.py)

    async def aclose(self) -> None:
        self._interrupt.set()  # the connection's wait ends now; the job's stop ends the waits between connections
        await self._listener.stop()
        await self._inner.aclose()
