"""All SQL about OAuth state nonces."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import oauth_state_uses as t
from tokensvc.store.housekeeping import batch_delete


async def consume(conn: AsyncConnection, nonce: str, *, user_id: str, expires_at: int, now: datetime) -> bool:
    """Record that a state nonce was used; False when it was used before (a replay)."""
    try:
        async with conn.begin_nested():
            await conn.execute(sa.insert(t).values(nonce=nonce, user_id=user_id, used_at=now, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


async def purge_expired(conn: AsyncConnection, *, now: int, limit: int | None = None) -> int:
    """Forget nonces whose state has expired anyway (an expired state is refused by its signature's age); at most
    `limit` of them when given."""
    expired = t.c.expires_at < now
    stmt = sa.delete(t).where(expired) if limit is None else batch_delete(t, t.c.nonce, expired, limit=limit)
    result = await conn.execute(stmt)
    return int(result.rowcount)
