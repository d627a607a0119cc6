"""All SQL of encryption-key rotation: find rows with a ciphertext under an old key, lock a batch, write it back.

Rows are walked in primary-key order (keyset pagination), so each pass reads the table once whatever the outcome of
a row. The predicate looks at the ciphertexts themselves, not only the `key_id` column: a refresh whose answer had no
rotated refresh token keeps the stored refresh ciphertext (possibly under an older key) next to a new access one.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import user_tokens as t


@dataclass(frozen=True, slots=True)
class SealedRow:
    """A row's ciphertexts and the version they were read at."""

    user_id: str
    access_token_enc: str | None
    refresh_token_enc: str | None
    version: int


def under_other_key(column: sa.Column[str | None], current_key_id: str) -> sa.ColumnElement[bool]:
    """A ciphertext column (of any table) holding a ciphertext not sealed under `current_key_id`; NULL holds none."""
    prefix = f"v1.{current_key_id}."
    return sa.and_(column.is_not(None), sa.not_(column.startswith(prefix, autoescape=True)))


def needs_rotation(current_key_id: str) -> sa.ColumnElement[bool]:
    """A row holding any ciphertext that is not under `current_key_id`, or whose `key_id` names another key."""
    has_ciphertext = sa.or_(t.c.access_token_enc.is_not(None), t.c.refresh_token_enc.is_not(None))
    return sa.or_(
        under_other_key(t.c.access_token_enc, current_key_id),
        under_other_key(t.c.refresh_token_enc, current_key_id),
        sa.and_(has_ciphertext, sa.or_(t.c.key_id.is_(None), t.c.key_id != current_key_id)),
    )


async def lock_batch(conn: AsyncConnection, *, current_key_id: str, after: str, limit: int) -> list[SealedRow]:
    """The next `limit` rows needing rotation with `user_id > after`, locked until the caller's transaction ends.

    Postgres: `FOR UPDATE SKIP LOCKED`, so a row an in-flight refresh holds is passed over (never waited for) and
    a refresh that comes later waits only for this short transaction. SQLite has no row locks: the database's write
    lock is taken first (as `tokens.lock_for_refresh` does), so nobody writes between this read and the caller's
    writes.
    """
    stmt = (
        sa.select(t.c.user_id, t.c.access_token_enc, t.c.refresh_token_enc, t.c.version)
        .where(t.c.user_id > after, needs_rotation(current_key_id))
        .order_by(t.c.user_id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    else:
        await conn.execute(sa.update(t).where(t.c.user_id == "").values(version=t.c.version))
    return [SealedRow(**row._mapping) for row in (await conn.execute(stmt)).all()]


async def write_sealed(
    conn: AsyncConnection,
    row: SealedRow,
    *,
    access_token_enc: str | None,
    refresh_token_enc: str | None,
    key_id: str,
) -> bool:
    """Replace a row's ciphertexts if it is still at the version they were read at; False when it changed.

    The version is not bumped: the tokens are the same, only their encryption changed, so a refresh that read the
    row before (and retries its write after a database outage) still writes its newer tokens over these.
    """
    stmt = (
        sa.update(t)
        .where(t.c.user_id == row.user_id, t.c.version == row.version)
        .values(access_token_enc=access_token_enc, refresh_token_enc=refresh_token_enc, key_id=key_id)
    )
    return bool((await conn.execute(stmt)).rowcount)


async def pending(conn: AsyncConnection, *, current_key_id: str, limit: int) -> list[str]:
    """Up to `limit` user ids (in order) whose rows still need rotation; no locks taken."""
    stmt = sa.select(t.c.user_id).where(needs_rotation(current_key_id)).order_by(t.c.user_id).limit(limit)
    return list((await conn.execute(stmt)).scalars())
