"""Single-row reads for the hot path (`access-token`, status, the refresh's first look).

On Postgres they go through a small asyncpg pool of their own with one prepared statement: SQLAlchemy's
per-call work (pool checkout through greenlets, statement cache keys, result wrapping) was most of the cost of a
primary-key read (bench/README.md). Elsewhere the engine does it. Either way the SQL is the store's `_SELECT`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.db import Autocommit
from tokensvc.store import tokens as store
from tokensvc.store.tokens import TokenRow

_BY_USER = f"SELECT {', '.join(c.name for c in store.COLUMNS)} FROM user_tokens WHERE user_id = $1"


class RowReader(Protocol):
    async def get(self, user_id: str) -> TokenRow | None: ...

    def forget(self, user_id: str) -> None:
        """The user's row was just changed by this process (called after the commit)."""

    def watch(self, user_id: str) -> asyncio.Event | None:
        """An event set whenever this reader hears the user's row changed (another process's commit included), for
        a caller waiting on a refresh claim; None when it hears of nothing (poll). Hand it back with `unwatch`."""

    def unwatch(self, user_id: str, event: asyncio.Event) -> None: ...

    async def aclose(self) -> None: ...


class _Uncached:
    """A reader that keeps nothing and hears of no change (its callers poll)."""

    def forget(self, user_id: str) -> None:
        return None  # nothing kept

    def watch(self, user_id: str) -> asyncio.Event | None:
        return None  # hears of no change: waiters poll

    def unwatch(self, user_id: str, event: asyncio.Event) -> None:
        return None


class EngineReader(_Uncached):
    """Reads through the SQLAlchemy engine, without a transaction (autocommit saves BEGIN/ROLLBACK)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = Autocommit(engine)

    async def get(self, user_id: str) -> TokenRow | None:
        async with self._engine.connect() as conn:
            return await store.get(conn, user_id)

    async def aclose(self) -> None:
        return None


class AsyncpgReader(_Uncached):
    """Reads on a dedicated asyncpg pool (Postgres only), opened on first use so that the service starts (and
    answers /readyz with 503) while the database is down. Errors are asyncpg's own or OSError."""

    def __init__(self, engine: AsyncEngine, *, size: int, acquire_timeout_seconds: float = 10.0) -> None:
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._size = size
        self._acquire_timeout = acquire_timeout_seconds
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _ready_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=1,
                        max_size=self._size,
                        reset=_keep_session,
                        server_settings={"application_name": "tokensvc-reader"},
                    )
        return self._pool

    async def get(self, user_id: str) -> TokenRow | None:
        pool = self._pool or await self._ready_pool()
        # A bounded wait for one of the `size` connections: TimeoutError (an OSError), answered 503 like the engine's.
        async with pool.acquire(timeout=self._acquire_timeout) as conn:
            record = await conn.fetchrow(_BY_USER, user_id)
        return TokenRow(**record) if record is not None else None

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """These connections only ever run one SELECT outside a transaction: there is no session state to reset,
    and asyncpg's default reset (RESET ALL, UNLISTEN *, …) costs a round trip on every release."""


def open_reader(
    engine: AsyncEngine, *, size: int, statement_cache: bool = True, acquire_timeout_seconds: float = 10.0
) -> RowReader:
    """The asyncpg pool on Postgres; the engine elsewhere, and behind a transaction-mode pooler (no statement cache),
    where every read must run inside a transaction (`db.Autocommit`)."""
    if engine.dialect.name == "postgresql" and statement_cache:
        return AsyncpgReader(engine, size=size, acquire_timeout_seconds=acquire_timeout_seconds)
    return EngineReader(engine)
