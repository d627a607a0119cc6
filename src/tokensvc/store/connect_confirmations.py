"""All SQL about connects waiting for the app's confirmation (`connect/complete`)."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import connect_confirmations as t
from tokensvc.store.housekeeping import batch_delete


@dataclass(frozen=True, slots=True)
class Confirmation:
    user_id: str
    scopes: list[str]
    code_sealed: str
    expires_at: int


async def put(
    conn: AsyncConnection, id_hash: str, *, user_id: str, scopes: list[str], code_sealed: str, expires_at: int
) -> None:
    await conn.execute(
        sa.insert(t).values(
            id_hash=id_hash, user_id=user_id, scopes=",".join(scopes), code_sealed=code_sealed, expires_at=expires_at
        )
    )


async def take(conn: AsyncConnection, id_hash: str, *, now: int) -> Confirmation | None:
    """Spend a confirmation: delete it and return what it held; None when unknown, spent or expired."""
    columns = (t.c.user_id, t.c.scopes, t.c.code_sealed, t.c.expires_at)
    stmt = sa.delete(t).where(t.c.id_hash == id_hash).returning(*columns)
    row = (await conn.execute(stmt)).one_or_none()
    if row is None or row.expires_at <= now:
        return None
    return Confirmation(row.user_id, [s for s in row.scopes.split(",") if s], row.code_sealed, row.expires_at)


async def purge_expired(conn: AsyncConnection, *, now: int, limit: int | None = None) -> int:
    """Forget confirmations nobody completed in time; at most `limit` of them when given."""
    expired = t.c.expires_at <= now
    stmt = sa.delete(t).where(expired) if limit is None else batch_delete(t, t.c.id_hash, expired, limit=limit)
    result = await conn.execute(stmt)
    return int(result.rowcount)
