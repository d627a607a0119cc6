"""All SQL about refresh claims (`refresh_claims`). The caller owns the (short) transaction.

A claim says: this owner is calling Strava for this user, having read this version of the token row, until then.
Times are epoch milliseconds of the database's clock (the service's `Clock`), so replicas compare leases alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import refresh_claims as c
from tokensvc.store.dialect import greatest, insert_into


@dataclass(frozen=True, slots=True)
class Claim:
    user_id: str
    owner: str
    version_read: int
    until: int
    write_until: int
    pending_until: int
    rejected_version: int


_COLUMNS = (
    c.c.user_id,
    c.c.owner,
    c.c.version_read,
    c.c.until,
    c.c.write_until,
    c.c.pending_until,
    c.c.rejected_version,
)


def _claim(row: sa.Row[*tuple[Any, ...]]) -> Claim:
    return Claim(**row._mapping)


async def get(conn: AsyncConnection, user_id: str) -> Claim | None:
    row = (await conn.execute(sa.select(*_COLUMNS).where(c.c.user_id == user_id))).first()
    return _claim(row) if row is not None else None


async def take(
    conn: AsyncConnection, user_id: str, *, owner: str, version_read: int, now: int, until: int, write_until: int
) -> Claim | None:
    """Claim the user's refresh: a new claim, or one whose holder's lease has lapsed (taken over). None when a
    live claim is held by someone else. A taken-over claim remembers how long its lapsed owner may still write."""
    stmt = insert_into(conn, c).values(
        user_id=user_id,
        owner=owner,
        version_read=version_read,
        until=until,
        write_until=write_until,
        pending_until=0,
        rejected_version=0,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[c.c.user_id],
        set_={
            "owner": stmt.excluded.owner,
            "version_read": stmt.excluded.version_read,
            "until": stmt.excluded.until,
            "write_until": stmt.excluded.write_until,
            # a released claim has write_until 0: only an owner that lapsed may still be writing
            "pending_until": greatest(conn, c.c.pending_until, c.c.write_until),
        },
        where=c.c.until <= now,
    )
    row = (await conn.execute(stmt.returning(*_COLUMNS))).first()
    return _claim(row) if row is not None else None


async def release(conn: AsyncConnection, user_id: str, *, owner: str, now: int) -> None:
    """Give the claim back. Kept (lapsed, nothing of its own pending) while an earlier owner may still write, so
    the next claimant still knows; otherwise removed."""
    mine = sa.and_(c.c.user_id == user_id, c.c.owner == owner)
    await conn.execute(sa.delete(c).where(mine, c.c.pending_until <= now))
    await conn.execute(sa.update(c).where(mine).values(until=0, write_until=0))


async def hold(conn: AsyncConnection, user_id: str, *, owner: str, until: int, rejected_version: int) -> None:
    """Keep the claim until `until` with nothing of the owner's own pending (Strava rejected the token of
    `rejected_version` while an earlier owner may still write): callers meanwhile wait or are told to retry, and
    nobody presents that token again, then or after."""
    mine = sa.and_(c.c.user_id == user_id, c.c.owner == owner)
    await conn.execute(sa.update(c).where(mine).values(until=until, write_until=0, rejected_version=rejected_version))
