"""The database's clock (the one time every replica shares)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

_POSTGRES_NOW = sa.text("SELECT extract(epoch FROM clock_timestamp())")
# SQLite's own clock with millisecond precision (julianday counts days from noon, 4714 BC).
_SQLITE_NOW = sa.text("SELECT (julianday('now') - 2440587.5) * 86400.0")


async def database_now(conn: AsyncConnection) -> float:
    """Epoch seconds on the database server, at the moment the statement runs."""
    stmt = _POSTGRES_NOW if conn.dialect.name == "postgresql" else _SQLITE_NOW
    return float((await conn.execute(stmt)).scalar_one())
