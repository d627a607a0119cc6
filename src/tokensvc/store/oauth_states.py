"""All SQL about OAuth state nonces."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import oauth_state_uses as t


async def consume(conn: AsyncConnection, nonce: str, *, user_id: str, expires_at: int, now: datetime) -> bool:
    """Record that a state nonce was used; False when it was used before (a replay)."""
    try:
        async with conn.begin_nested():
            await conn.execute(sa.insert(t).values(nonce=nonce, user_id=user_id, used_at=now, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


async def purge_expired(conn: AsyncConnection, *, now: int) -> int:
    """Forget nonces whose state has expired anyway (an expired state is refused by its signature's age)."""
    result = await conn.execute(sa.delete(t).where(t.c.expires_at < now))
    return int(result.rowcount)
