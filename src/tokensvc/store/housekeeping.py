"""SQL shared by the retention purges: deletes in bounded batches, and the lock that lets one replica at a time
run them (a Postgres advisory lock, tried without waiting; SQLite serves one process). The session-level lock
spans a whole pass; behind a transaction-mode pooler, where a session is not one server connection, the
transaction-level one is taken by each batch instead."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

# Any constant shared by every replica (and different from db.MIGRATION_LOCK_KEY).
HOUSEKEEPING_LOCK_KEY = 0x746F6B656E737668  # "tokensvh"


def batch_delete(
    table: sa.Table, key: sa.ColumnElement[object], condition: sa.ColumnElement[bool], *, limit: int
) -> sa.Delete:
    """DELETE at most `limit` rows matching `condition` (found through an index on it), by primary key."""
    return sa.delete(table).where(key.in_(sa.select(key).where(condition).limit(limit)))


async def try_lock(conn: AsyncConnection, key: int = HOUSEKEEPING_LOCK_KEY) -> bool:
    """Take the session-level lock `key` if nobody holds it (True), without waiting. It lasts until `unlock` or
    the end of the connection, across the connection's transactions. The caller commits after."""
    if conn.dialect.name != "postgresql":
        return True
    return bool((await conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key})).scalar_one())


async def unlock(conn: AsyncConnection, key: int = HOUSEKEEPING_LOCK_KEY) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})


async def try_lock_transaction(conn: AsyncConnection, key: int = HOUSEKEEPING_LOCK_KEY) -> bool:
    """Take the lock `key` until the end of the current transaction if nobody holds it (True), without waiting."""
    if conn.dialect.name != "postgresql":
        return True
    stmt = sa.text("SELECT pg_try_advisory_xact_lock(:key)")
    return bool((await conn.execute(stmt, {"key": key})).scalar_one())
