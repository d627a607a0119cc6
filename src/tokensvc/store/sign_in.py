"""SQL for sign-in throttling: one row of failures per client (`sign_in_failures`)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import sign_in_failures as f
from tokensvc.store.dialect import insert_into


async def blocked_until(conn: AsyncConnection, client: str) -> int:
    """Until when (epoch seconds) `client` must wait; 0 when it has no failures on record."""
    value = await conn.scalar(sa.select(f.c.blocked_until).where(f.c.client == client))
    return int(value or 0)


async def add_failure(conn: AsyncConnection, client: str, *, now: int) -> int:
    """Count one more failure of `client` (an atomic upsert: replicas never lose one); the new count."""
    upsert = (
        insert_into(conn, f)
        .values(client=client, failures=1, blocked_until=0, last_failed_at=now)
        .on_conflict_do_update(index_elements=[f.c.client], set_={"failures": f.c.failures + 1, "last_failed_at": now})
    )
    stmt = upsert.returning(f.c.failures)
    return int((await conn.execute(stmt)).scalar_one())


async def block(conn: AsyncConnection, client: str, *, until: int) -> None:
    await conn.execute(sa.update(f).where(f.c.client == client).values(blocked_until=until))


async def forget(conn: AsyncConnection, client: str) -> None:
    await conn.execute(sa.delete(f).where(f.c.client == client))


async def purge(conn: AsyncConnection, *, failed_before: int) -> int:
    """Drop the rows of clients whose last failure is older than `failed_before` (their block has long ended)."""
    result = await conn.execute(sa.delete(f).where(f.c.last_failed_at < failed_before))
    return int(result.rowcount or 0)
