"""All SQL of revocation tombstones: bury a deleted user's grant, claim the due ones, finish or reschedule them,
re-encrypt them (rotate-keys), count them.

A claim moves `due_at` to the end of its lease in one statement that also re-checks `due_at <= now`, so two
replicas never both hold a tombstone (Postgres re-evaluates the predicate on the row another transaction just
updated; SQLite serialises writers). Every later write of the attempt is fenced by that lease value: a claim that
lapsed (its owner died or froze) and was taken over writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import revocation_tombstones as g
from tokensvc.models import user_tokens as t
from tokensvc.store.keys import under_other_key


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A grant to revoke, as claimed: the ciphertexts are bound to `user_id` (the row they came from)."""

    id: int
    user_id: str
    athlete_id: int | None
    refresh_token_enc: str
    access_token_enc: str | None
    access_expires_at: int
    attempts: int
    due_at: int  # the claim's lease while claimed: what fences this attempt's writes

    def __repr__(self) -> str:  # never a ciphertext in a log line either
        return f"Tombstone(id={self.id}, user_id={self.user_id!r}, attempts={self.attempts})"


_COLUMNS = (
    g.c.id,
    g.c.user_id,
    g.c.athlete_id,
    g.c.refresh_token_enc,
    g.c.access_token_enc,
    g.c.access_expires_at,
    g.c.attempts,
    g.c.due_at,
)


async def bury(
    conn: AsyncConnection,
    *,
    user_id: str,
    athlete_id: int | None,
    refresh_token_enc: str,
    access_token_enc: str | None,
    access_expires_at: int,
    key_id: str | None,
    due_at: int,
    now: datetime,
) -> int:
    """Keep a grant's ciphertexts (as the user's row held them) for revoking, in the caller's transaction.
    Returns the tombstone's id."""
    stmt = (
        sa.insert(g)
        .values(
            user_id=user_id,
            athlete_id=athlete_id,
            refresh_token_enc=refresh_token_enc,
            access_token_enc=access_token_enc,
            access_expires_at=access_expires_at,
            key_id=key_id,
            due_at=due_at,
            attempts=0,
            created_at=now,
        )
        .returning(g.c.id)
    )
    return int((await conn.execute(stmt)).scalar_one())


async def claim(conn: AsyncConnection, tombstone_id: int, *, now: int, lease_until: int) -> Tombstone | None:
    """Claim one tombstone if it is due (not claimed by anyone, or its claim lapsed); None otherwise."""
    stmt = sa.update(g).where(g.c.id == tombstone_id, g.c.due_at <= now).values(due_at=lease_until).returning(*_COLUMNS)
    row = (await conn.execute(stmt)).first()
    return Tombstone(**row._mapping) if row is not None else None


async def claim_due(conn: AsyncConnection, *, now: int, limit: int, lease_until: int) -> list[Tombstone]:
    """Claim up to `limit` due tombstones, longest due first (a range scan on ix_revocation_tombstones_due_at)."""
    due = sa.select(g.c.id).where(g.c.due_at <= now).order_by(g.c.due_at, g.c.id).limit(limit)
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    stmt = (
        sa.update(g)
        .where(g.c.id.in_(due.scalar_subquery()), g.c.due_at <= now)
        .values(due_at=lease_until)
        .returning(*_COLUMNS)
    )
    return sorted((Tombstone(**row._mapping) for row in (await conn.execute(stmt)).all()), key=lambda x: x.id)


async def finish(conn: AsyncConnection, tombstone: Tombstone) -> bool:
    """Strava confirmed: the tombstone goes (if this claim still holds it)."""
    stmt = sa.delete(g).where(g.c.id == tombstone.id, g.c.due_at == tombstone.due_at)
    return bool((await conn.execute(stmt)).rowcount)


async def retry_later(conn: AsyncConnection, tombstone: Tombstone, *, due_at: int, error: str) -> bool:
    """Count a failed attempt and leave the tombstone until `due_at` (if this claim still holds it)."""
    stmt = (
        sa.update(g)
        .where(g.c.id == tombstone.id, g.c.due_at == tombstone.due_at)
        .values(due_at=due_at, attempts=g.c.attempts + 1, last_error=error[:64])
    )
    return bool((await conn.execute(stmt)).rowcount)


async def reseal(
    conn: AsyncConnection,
    tombstone: Tombstone,
    *,
    refresh_token_enc: str,
    access_token_enc: str,
    access_expires_at: int,
    key_id: str,
) -> bool:
    """Keep the pair a refresh made for the grant (the old refresh token may be dead now), under this claim."""
    stmt = (
        sa.update(g)
        .where(g.c.id == tombstone.id, g.c.due_at == tombstone.due_at)
        .values(
            refresh_token_enc=refresh_token_enc,
            access_token_enc=access_token_enc,
            access_expires_at=access_expires_at,
            key_id=key_id,
        )
    )
    return bool((await conn.execute(stmt)).rowcount)


async def athlete_connected(conn: AsyncConnection, athlete_id: int) -> bool:
    """Whether a user holds this athlete with usable tokens again (a reconnect since the delete): revoking the old
    grant now would end the new connection too (an index scan on ix_user_tokens_athlete_id)."""
    stmt = sa.select(t.c.user_id).where(
        t.c.athlete_id == athlete_id, t.c.reauth_reason.is_(None), t.c.refresh_token_enc.is_not(None)
    )
    return (await conn.execute(stmt.limit(1))).first() is not None


async def count(conn: AsyncConnection) -> int:
    """Tombstones waiting for Strava (claimed or not)."""
    return int((await conn.execute(sa.select(sa.func.count()).select_from(g))).scalar_one())


# -- rotate-keys ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SealedTombstone:
    id: int
    user_id: str
    refresh_token_enc: str
    access_token_enc: str | None


def _needs_rotation(current_key_id: str) -> sa.ColumnElement[bool]:
    return sa.or_(
        under_other_key(g.c.refresh_token_enc, current_key_id),
        under_other_key(g.c.access_token_enc, current_key_id),
        g.c.key_id.is_(None),
        g.c.key_id != current_key_id,
    )


async def needing_rotation(
    conn: AsyncConnection, *, current_key_id: str, after: int, limit: int
) -> list[SealedTombstone]:
    """The next `limit` tombstones (by id, `id > after`) holding a ciphertext under another key than the current."""
    stmt = (
        sa.select(g.c.id, g.c.user_id, g.c.refresh_token_enc, g.c.access_token_enc)
        .where(g.c.id > after, _needs_rotation(current_key_id))
        .order_by(g.c.id)
        .limit(limit)
    )
    return [SealedTombstone(**row._mapping) for row in (await conn.execute(stmt)).all()]


async def write_sealed(
    conn: AsyncConnection,
    old: SealedTombstone,
    *,
    refresh_token_enc: str,
    access_token_enc: str | None,
    key_id: str,
) -> bool:
    """Replace a tombstone's ciphertexts if they are still the ones read (an attempt may have resealed it)."""
    stmt = (
        sa.update(g)
        .where(g.c.id == old.id, g.c.refresh_token_enc == old.refresh_token_enc)
        .values(refresh_token_enc=refresh_token_enc, access_token_enc=access_token_enc, key_id=key_id)
    )
    return bool((await conn.execute(stmt)).rowcount)


async def pending_rotation(conn: AsyncConnection, *, current_key_id: str, limit: int) -> list[int]:
    """Up to `limit` tombstone ids still holding a ciphertext under another key."""
    stmt = sa.select(g.c.id).where(_needs_rotation(current_key_id)).order_by(g.c.id).limit(limit)
    return list((await conn.execute(stmt)).scalars())
