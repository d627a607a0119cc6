"""What the store writes differently on its two databases (Postgres, SQLite), said once."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

Upsert = PgInsert | SqliteInsert


def insert_into(conn: AsyncConnection, table: sa.Table) -> Upsert:
    """An INSERT into `table` that can take ON CONFLICT, in the connection's dialect."""
    return pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table)


def greatest(
    conn: AsyncConnection, column: sa.ColumnElement[int], other: sa.ColumnElement[int] | int
) -> sa.ColumnElement[int]:
    """The larger of the two: Postgres' GREATEST, SQLite's two-argument MAX."""
    if conn.dialect.name == "postgresql":
        return sa.func.greatest(column, other)
    return sa.func.max(column, other)
