"""All SQL about when a user's token was last asked for (`token_usage`), and what the sweeper does with it.

`token_usage` is a table of its own so that noting a use never bumps `user_tokens.version` or fires the token
cache's NOTIFY. The sweeper's few writes to `user_tokens` here change `sweep_at` alone, which notifies nobody.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import token_usage as u
from tokensvc.models import user_tokens as t
from tokensvc.store.dialect import insert_into

# A row whose sweep_at lies further past `expires_at - buffer` than the sweep's jitter (< 900 s) was moved out
# for being idle (or leased right now, which pulling in cannot harm: the refresh guard decides).
_JITTER = 900


async def record(conn: AsyncConnection, uses: Sequence[tuple[str, int]]) -> None:
    """Upsert last uses (user id, epoch seconds), never moving one backwards."""
    if not uses:
        return
    stmt = insert_into(conn, u).values([{"user_id": user_id, "last_used_at": at} for user_id, at in uses])
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[u.c.user_id],
            set_={"last_used_at": stmt.excluded.last_used_at},
            where=u.c.last_used_at < stmt.excluded.last_used_at,
        )
    )


async def pull_in(conn: AsyncConnection, user_ids: Sequence[str], *, buffer_seconds: int) -> int:
    """Users asked about again whose sweep was moved out while idle go back on the ordinary schedule (inside the
    buffer before expiry). Rows in backoff (failures) keep theirs. Returns how many moved."""
    if not user_ids:
        return 0
    normal = t.c.expires_at - buffer_seconds
    stmt = (
        sa.update(t)
        .where(
            t.c.user_id.in_(user_ids),
            t.c.reauth_reason.is_(None),
            t.c.failure_count == 0,
            t.c.sweep_at > normal + _JITTER,
        )
        .values(sweep_at=normal)
    )
    return int((await conn.execute(stmt)).rowcount or 0)


async def idle_among(
    conn: AsyncConnection, user_ids: Sequence[str], *, active_since: int
) -> list[tuple[str, datetime]]:
    """Of these users, those nobody asked about since `active_since`, with their last refresh (or their creation,
    if never refreshed). A user without a `token_usage` row counts as used: the migration backfilled every user,
    and every import or connect notes a use, so such a user is one whose first use another replica has not
    flushed yet."""
    if not user_ids:
        return []
    last_refresh = sa.func.coalesce(t.c.last_refreshed_at, t.c.created_at, type_=t.c.created_at.type)
    stmt = (
        sa.select(t.c.user_id, last_refresh)
        .select_from(t.join(u, u.c.user_id == t.c.user_id))
        .where(t.c.user_id.in_(user_ids), u.c.last_used_at < active_since)
    )
    return [(user_id, at) for user_id, at in (await conn.execute(stmt)).all()]


async def move_out(conn: AsyncConnection, moves: Sequence[tuple[str, int]]) -> None:
    """Set idle users' next sweep (their keep-alive) so sweeps do not rescan them meanwhile."""
    for user_id, sweep_at in moves:
        await conn.execute(sa.update(t).where(t.c.user_id == user_id).values(sweep_at=sweep_at))


async def count_active(conn: AsyncConnection, *, active_since: int, expired_by: int | None = None) -> int:
    """Users who can still be refreshed and whose token something asked for since `active_since` (with
    `expired_by`: only those whose access token expired by then). A user with no usage row yet counts as active, as
    the sweeper counts them: its first use may still be unflushed in some replica."""
    stmt = (
        sa.select(sa.func.count())
        .select_from(t.outerjoin(u, u.c.user_id == t.c.user_id))
        .where(t.c.reauth_reason.is_(None), sa.or_(u.c.last_used_at.is_(None), u.c.last_used_at >= active_since))
    )
    if expired_by is not None:
        stmt = stmt.where(t.c.expires_at <= expired_by)
    return int((await conn.execute(stmt)).scalar_one())


async def forget(conn: AsyncConnection, user_id: str) -> None:
    await conn.execute(sa.delete(u).where(u.c.user_id == user_id))
