"""Engines and migrations. The lifespan owns the engine; migrations run under a Postgres advisory lock."""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import await_

# Any constant shared by every replica; two replicas starting at once take turns on this lock.
MIGRATION_LOCK_KEY = 0x746F6B656E737663  # "tokensvc"
# An engine execution option: the engine reaches Postgres through a transaction-mode pooler.
POOLED = "tokensvc_pooled"


def make_engine(
    url: str,
    *,
    pool_size: int = 6,
    pool_timeout_seconds: float = 10.0,
    lock_timeout_seconds: float = 30.0,
    statement_cache: bool = True,
) -> AsyncEngine:
    """An async engine tuned per dialect (SQLite: WAL and a busy timeout; Postgres: a fixed-size pool).

    No overflow on Postgres: overflow connections are closed when returned, and under load that churn (a new
    server process per connection) cost more than waiting for a pooled one; and `pool_size` is then the most
    connections the engine ever opens (the connection budget, config.py). A wait for a pooled connection ends after
    `pool_timeout_seconds` with SQLAlchemy's TimeoutError (answered 503 with Retry-After, api/problems.py).
    `statement_cache=False` is for a transaction-mode pooler (TOKENSVC_DB_STATEMENT_CACHE): no prepared statement
    outlives its statement, and `lock_timeout` is not sent at connect (PgBouncer refuses startup parameters it does
    not know; set it on the database role instead, docs/operations.md).
    """
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": lock_timeout_seconds})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {
        "server_settings": {
            "application_name": "tokensvc",
            "lock_timeout": f"{int(lock_timeout_seconds * 1000)}ms",
        }
    }
    if not statement_cache:
        connect_args = {
            "server_settings": {"application_name": "tokensvc"},
            # SQLAlchemy's cache of prepared statements, asyncpg's own, and names that never repeat: a statement
            # prepared on one server connection is never looked for on another.
            "prepared_statement_cache_size": 0,
            "statement_cache_size": 0,
            "prepared_statement_name_func": _unique_statement_name,
        }
    engine = create_async_engine(
        url,
        execution_options={POOLED: not statement_cache},
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout_seconds,
        # A database restart leaves every pooled connection dead; without a ping the first transaction on each
        # replica after the restart failed with 503 (tests/reliability). The hot read path (store/reader.py) has its
        # own pool and does not pay it.
        pool_pre_ping=True,
        # Every lock wait (a refresh's row lock, an import behind it) gives up after the lock timeout: set once per
        # connection rather than by a statement in every transaction.
        connect_args=connect_args,
    )
    if statement_cache:
        # SQLAlchemy's asyncpg ping is BEGIN; ";"; ROLLBACK, three round trips per checkout, for a
        # transaction-mode pooler's sake (sqlalchemy#10226). Without one, ";" alone tells a dead connection: a
        # refresh checks out twice (claim, store), and the two extra round trips were a fifth of a sweep's CPU.
        engine.sync_engine.dialect.do_ping = _ping_once  # type: ignore[method-assign]
    return engine


def _ping_once(dbapi_connection: Any) -> bool:
    """One `;` round trip on the adapted asyncpg connection; asyncpg's errors become the DBAPI's, as SQLAlchemy's
    own ping does, so a dead connection is recognised as a disconnect and replaced."""
    try:
        await_(dbapi_connection._connection.fetchrow(";"))
    except Exception as error:  # translated to the DBAPI's error types (and raised) by the adapter
        dbapi_connection._handle_exception(error)
    return True


class Autocommit:
    """Connections for statements that each stand alone (reads, single-row updates): AUTOCOMMIT, which saves the
    BEGIN and COMMIT round trips. Behind a transaction-mode pooler (an engine made with `statement_cache=False`)
    they run in one short transaction committed at the end instead: a statement prepared outside a transaction
    may be executed on another server connection, where it does not exist."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.pooled = bool(engine.get_execution_options().get(POOLED))
        self._engine = engine if self.pooled else engine.execution_options(isolation_level="AUTOCOMMIT")

    def connect(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self._engine.begin() if self.pooled else self._engine.connect()


def _unique_statement_name() -> str:
    return f"__tokensvc_{uuid.uuid4().hex}__"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers go on while a refresh holds the write lock.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def alembic_dir() -> Path:
    """The migration scripts: inside the installed wheel, or at the repository root in a checkout."""
    packaged = Path(__file__).parent / "_alembic"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "alembic"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    cfg.attributes["url"] = url
    return cfg


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the schema to `revision` in one transaction; on Postgres, one replica at a time."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await conn.run_sync(_upgrade, alembic_config(engine.url.render_as_string(hide_password=False)), revision)


def _upgrade(connection: Connection, cfg: Config, revision: str) -> None:
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, alembic_config(engine.url.render_as_string(hide_password=False)), revision)


def _downgrade(connection: Connection, cfg: Config, revision: str) -> None:
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)
