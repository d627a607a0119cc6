"""All SQL about user tokens. Functions take the caller's connection; the caller owns the transaction.

Rows carry ciphertext only: encryption is the service's job, so nothing here ever sees a token in the clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import user_tokens as t
from tokensvc.status import Status
from tokensvc.store.dialect import insert_into


@dataclass(frozen=True, slots=True)
class TokenRow:
    user_id: str
    access_token_enc: str | None
    refresh_token_enc: str | None
    key_id: str | None
    expires_at: int
    athlete_id: int | None
    scopes: str
    reauth_reason: str | None
    last_refreshed_at: datetime | None
    version: int
    failure_count: int
    sweep_at: int

    @property
    def scope_list(self) -> list[str]:
        return [s for s in self.scopes.split(",") if s]


@dataclass(frozen=True, slots=True)
class NewTokens:
    """Encrypted material for a write; `refresh_token_enc` None keeps the stored refresh token.

    `sweep_at` is when the background sweeper should take the user next (decided by the service).
    """

    access_token_enc: str
    refresh_token_enc: str | None
    key_id: str
    expires_at: int
    sweep_at: int


COLUMNS = (
    t.c.user_id,
    t.c.access_token_enc,
    t.c.refresh_token_enc,
    t.c.key_id,
    t.c.expires_at,
    t.c.athlete_id,
    t.c.scopes,
    t.c.reauth_reason,
    t.c.last_refreshed_at,
    t.c.version,
    t.c.failure_count,
    t.c.sweep_at,
)
_SELECT = sa.select(*COLUMNS)


def _row(row: sa.Row[*tuple[Any, ...]]) -> TokenRow:
    return TokenRow(**row._mapping)


async def get(conn: AsyncConnection, user_id: str) -> TokenRow | None:
    row = (await conn.execute(_SELECT.where(t.c.user_id == user_id))).first()
    return _row(row) if row is not None else None


async def lock_for_refresh(conn: AsyncConnection, user_id: str) -> TokenRow | None:
    """Take the cross-process refresh guard for one user and read the row under it.

    Postgres: a row lock (`FOR UPDATE`), waited for at most the connection's `lock_timeout` (`db.make_engine`).
    SQLite has no row locks: a no-op UPDATE takes the database's write lock, which other processes wait for through
    the busy timeout.
    Either way the guard lasts until the caller's transaction ends, and readers are never blocked.
    """
    if conn.dialect.name == "postgresql":
        row = (await conn.execute(_SELECT.where(t.c.user_id == user_id).with_for_update())).first()
    else:
        await conn.execute(sa.update(t).where(t.c.user_id == user_id).values(version=t.c.version))
        row = (await conn.execute(_SELECT.where(t.c.user_id == user_id))).first()
    return _row(row) if row is not None else None


def _fresh(tokens: NewTokens, now: datetime) -> dict[str, object]:
    """What every write of a new pair sets: the access token and its expiry, the next sweep, and a clean record."""
    return {
        "access_token_enc": tokens.access_token_enc,
        "key_id": tokens.key_id,
        "expires_at": tokens.expires_at,
        "sweep_at": tokens.sweep_at,
        "failure_count": 0,
        "last_error": None,
        "reauth_reason": None,
        "updated_at": now,
    }


async def upsert(
    conn: AsyncConnection,
    user_id: str,
    tokens: NewTokens,
    *,
    athlete_id: int | None,
    scopes: Sequence[str] | None,
    now: datetime,
) -> TokenRow:
    """Insert or replace a user's tokens (import, connect); clears `needs_reauth` and bumps the version.

    On a replace, an `athlete_id` or `scopes` of None keeps what the row had.
    """
    values = {**_fresh(tokens, now), "refresh_token_enc": tokens.refresh_token_enc}
    stmt = insert_into(conn, t).values(
        user_id=user_id,
        created_at=now,
        version=1,
        athlete_id=athlete_id,
        scopes=",".join(scopes or ()),
        **values,
    )
    on_conflict: dict[str, object] = {
        **values,
        "athlete_id": sa.func.coalesce(stmt.excluded.athlete_id, t.c.athlete_id),
        "version": t.c.version + 1,
    }
    if scopes is not None:
        on_conflict["scopes"] = stmt.excluded.scopes
    upsert_stmt = stmt.on_conflict_do_update(index_elements=[t.c.user_id], set_=on_conflict).returning(*COLUMNS)
    return _row((await conn.execute(upsert_stmt)).one())


async def write_refresh(
    conn: AsyncConnection,
    user_id: str,
    tokens: NewTokens,
    *,
    expected_version: int,
    now: datetime,
    read_refresh_enc: str | None = None,
) -> TokenRow | None:
    """Store a refresh's result if the row is still at `expected_version`; None when someone wrote in between.

    With `read_refresh_enc` (the refresh token the pair was traded for), a row flagged `refresh_token_invalid`
    since, but still holding that refresh token, is written too and unflagged: the newest pair wins over a
    rejection of the token it replaced. A deauthorization (which discards the tokens) or any newer pair is kept.
    """
    values = {**_fresh(tokens, now), "last_refreshed_at": now, "version": t.c.version + 1}
    if tokens.refresh_token_enc is not None:
        values["refresh_token_enc"] = tokens.refresh_token_enc
    current = t.c.version == expected_version
    if read_refresh_enc is not None:
        flagged_since = sa.and_(t.c.reauth_reason == "refresh_token_invalid", t.c.refresh_token_enc == read_refresh_enc)
        current = sa.or_(current, flagged_since)
    stmt = sa.update(t).where(t.c.user_id == user_id, current).values(**values).returning(*COLUMNS)
    row = (await conn.execute(stmt)).first()
    return _row(row) if row is not None else None


async def mark_needs_reauth(
    conn: AsyncConnection,
    user_id: str,
    *,
    reason: str,
    now: datetime,
    expected_version: int | None = None,
    discard_tokens: bool = False,
) -> TokenRow | None:
    """Flag a user as needing to reconnect (only if still at `expected_version`, when given)."""
    values: dict[str, object] = {"reauth_reason": reason, "updated_at": now, "version": t.c.version + 1}
    if discard_tokens:
        values |= {"access_token_enc": None, "refresh_token_enc": None}
    stmt = sa.update(t).where(t.c.user_id == user_id)
    if expected_version is not None:
        stmt = stmt.where(t.c.version == expected_version)
    row = (await conn.execute(stmt.values(**values).returning(*COLUMNS))).first()
    return _row(row) if row is not None else None


async def record_failure(conn: AsyncConnection, user_id: str, *, error: str, retry_at: int) -> None:
    """Count a failed refresh and hold automatic attempts back until `retry_at`. Tokens and version untouched."""
    await conn.execute(
        sa.update(t)
        .where(t.c.user_id == user_id)
        .values(failure_count=t.c.failure_count + 1, last_error=error[:64], sweep_at=retry_at)
    )


async def reschedule(conn: AsyncConnection, user_id: str, *, sweep_at: int) -> None:
    await conn.execute(sa.update(t).where(t.c.user_id == user_id).values(sweep_at=sweep_at))


def due_statement(*, now: int, limit: int) -> sa.Select[str]:
    """The sweeper's "who is next": a range scan on ix_user_tokens_sweep, skipping rows other replicas hold."""
    return (
        sa.select(t.c.user_id)
        .where(t.c.reauth_reason.is_(None), t.c.sweep_at <= now)
        .order_by(t.c.sweep_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


async def claim_due(conn: AsyncConnection, *, now: int, limit: int, lease_until: int) -> list[str]:
    """Take up to `limit` users the sweeper should refresh now, oldest first, and lease them until `lease_until`.

    On Postgres `FOR UPDATE SKIP LOCKED` lets replicas claim disjoint batches without a leader; the lease keeps a
    claimed user out of every other claim until it is written back (or the lease runs out, if this process dies).
    """
    user_ids = list((await conn.execute(due_statement(now=now, limit=limit))).scalars())
    if user_ids:
        await conn.execute(sa.update(t).where(t.c.user_id.in_(user_ids)).values(sweep_at=lease_until))
    return user_ids


async def release_claims(conn: AsyncConnection, user_ids: Sequence[str], *, lease_until: int | None, now: int) -> None:
    """Give back leased users that were not worked on, so the next sweep anywhere takes them. With a
    `lease_until`, only rows still under that lease (nobody wrote them since)."""
    stmt = sa.update(t).where(t.c.user_id.in_(user_ids))
    if lease_until is not None:
        stmt = stmt.where(t.c.sweep_at == lease_until)
    await conn.execute(stmt.values(sweep_at=now))


async def count_due(conn: AsyncConnection, *, now: int) -> int:
    stmt = sa.select(sa.func.count()).where(t.c.reauth_reason.is_(None), t.c.sweep_at <= now)
    return int((await conn.execute(stmt)).scalar_one())


async def delete(conn: AsyncConnection, user_id: str) -> bool:
    result = await conn.execute(sa.delete(t).where(t.c.user_id == user_id))
    return bool(result.rowcount)


def _status_condition(status: Status, now: int, buffer_seconds: int) -> sa.ColumnElement[bool]:
    live = t.c.reauth_reason.is_(None)
    if status is Status.NEEDS_REAUTH:
        return t.c.reauth_reason.is_not(None)
    if status is Status.VALID:
        return sa.and_(live, t.c.expires_at > now + buffer_seconds)
    if status is Status.EXPIRING_SOON:
        return sa.and_(live, t.c.expires_at > now, t.c.expires_at <= now + buffer_seconds)
    if status is Status.EXPIRED:
        return sa.and_(live, t.c.expires_at <= now)
    raise ValueError(f"no stored row can have status {status}")


async def list_by_status(
    conn: AsyncConnection,
    statuses: Sequence[Status],
    *,
    now: int,
    buffer_seconds: int,
    limit: int,
    after: tuple[int, str] | None = None,
) -> list[TokenRow]:
    """Rows in any of `statuses`, oldest expiry first, keyset-paginated on (expires_at, user_id)."""
    stmt = _SELECT.where(sa.or_(*(_status_condition(s, now, buffer_seconds) for s in statuses)))
    if after is not None:
        stmt = stmt.where(sa.tuple_(t.c.expires_at, t.c.user_id) > sa.tuple_(*after))
    stmt = stmt.order_by(t.c.expires_at, t.c.user_id).limit(limit)
    return [_row(r) for r in (await conn.execute(stmt)).all()]


async def lock_athlete(conn: AsyncConnection, athlete_id: int) -> None:
    """Serialise stores of one athlete until the transaction ends (one athlete, one user). Postgres: a transaction
    advisory lock on the athlete; SQLite: the database's write lock, which every write transaction holds anyway."""
    if conn.dialect.name == "postgresql":
        key = sa.func.hashtextextended(f"tokensvc.athlete:{athlete_id}", 0)
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


async def holders_of_athlete(conn: AsyncConnection, athlete_id: int, *, other_than: str) -> list[TokenRow]:
    """The other users holding tokens for this athlete (rows whose tokens were discarded hold nothing)."""
    stmt = _SELECT.where(
        t.c.athlete_id == athlete_id, t.c.user_id != other_than, t.c.access_token_enc.is_not(None)
    ).order_by(t.c.user_id)
    return [_row(row) for row in (await conn.execute(stmt)).all()]
