"""SQL for revocable sessions: one watermark per subject (`session_revocations`)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import session_revocations as r
from tokensvc.store.dialect import greatest, insert_into


async def not_before_ms(conn: AsyncConnection, subject: str) -> int:
    """Sessions of `subject` issued before this (epoch ms) are void; 0 when none was ever ended."""
    value = await conn.scalar(sa.select(r.c.not_before_ms).where(r.c.subject == subject))
    return int(value or 0)


async def revoke(conn: AsyncConnection, subject: str, *, now_ms: int) -> None:
    """End every session of `subject` issued before `now_ms` (never moving the watermark back)."""
    stmt = (
        insert_into(conn, r)
        .values(subject=subject, not_before_ms=now_ms)
        .on_conflict_do_update(
            index_elements=[r.c.subject],
            set_={"not_before_ms": greatest(conn, r.c.not_before_ms, now_ms)},
        )
    )
    await conn.execute(stmt)
