"""All SQL behind /v1/stats, the metrics gauges and the operators' dashboard: aggregates, never a token."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import notifications as n
from tokensvc.models import token_events as e
from tokensvc.models import user_tokens as t
from tokensvc.service.status import Status

# Refresh outcomes as /v1/stats reports them: everything that is neither a success nor a rejection is a failure.
SUCCESS = "succeeded"
REJECTED = "rejected"


async def users_by_status(conn: AsyncConnection, *, now: int, buffer_seconds: int) -> dict[Status, int]:
    """Stored users per status in one pass (`missing` users have no row and are not counted)."""
    live = t.c.reauth_reason.is_(None)
    stmt = sa.select(
        sa.func.count().filter(live, t.c.expires_at > now + buffer_seconds),
        sa.func.count().filter(live, t.c.expires_at > now, t.c.expires_at <= now + buffer_seconds),
        sa.func.count().filter(live, t.c.expires_at <= now),
        sa.func.count().filter(t.c.reauth_reason.is_not(None)),
    )
    valid, expiring_soon, expired, needs_reauth = (await conn.execute(stmt)).one()
    return {
        Status.VALID: int(valid),
        Status.EXPIRING_SOON: int(expiring_soon),
        Status.EXPIRED: int(expired),
        Status.NEEDS_REAUTH: int(needs_reauth),
    }


@dataclass(frozen=True, slots=True)
class OutcomeCounts:
    success: int
    failure: int
    reauth_required: int


async def refresh_outcomes(conn: AsyncConnection, *, since: datetime) -> OutcomeCounts:
    """Refresh attempts at Strava since `since`, from the audit trail (so every replica's attempts count)."""
    refreshes = sa.and_(e.c.kind == "refresh", e.c.occurred_at >= since)
    stmt = sa.select(
        sa.func.count().filter(e.c.outcome == SUCCESS),
        sa.func.count().filter(e.c.outcome.not_in([SUCCESS, REJECTED])),
        sa.func.count().filter(e.c.outcome == REJECTED),
    ).where(refreshes)
    success, failure, rejected = (await conn.execute(stmt)).one()
    return OutcomeCounts(success=int(success), failure=int(failure), reauth_required=int(rejected))


async def refresh_outcomes_by_hour(conn: AsyncConnection, *, since: datetime) -> list[tuple[datetime, str, int]]:
    """(hour, outcome, count) for refresh attempts since `since`, counted by the database (a day can hold hundreds
    of thousands of attempts; the dashboard reloads every 30 s). The hour is a `YYYY-MM-DD HH` text in UTC, which
    both dialects can make."""
    if conn.dialect.name == "postgresql":
        hour = sa.func.to_char(sa.func.timezone("UTC", e.c.occurred_at), "YYYY-MM-DD HH24")
    else:  # SQLite keeps the UTC time as ISO text
        hour = sa.func.strftime("%Y-%m-%d %H", e.c.occurred_at)
    stmt = (
        sa.select(hour.label("hour"), e.c.outcome, sa.func.count())
        .where(e.c.kind == "refresh", e.c.occurred_at >= since)
        .group_by(hour, e.c.outcome)
    )
    rows = (await conn.execute(stmt)).all()
    counts = [
        (datetime.strptime(text, "%Y-%m-%d %H").replace(tzinfo=UTC), outcome or "", int(count))
        for text, outcome, count in rows
    ]
    return sorted(counts)


@dataclass(frozen=True, slots=True)
class ReconnectNeeded:
    user_id: str
    athlete_id: int | None
    reason: str
    since: datetime


async def needs_reauth_users(conn: AsyncConnection, *, limit: int) -> list[ReconnectNeeded]:
    """Users who must reconnect, most recent first (`updated_at` is when they were flagged)."""
    stmt = (
        sa.select(t.c.user_id, t.c.athlete_id, t.c.reauth_reason, t.c.updated_at)
        .where(t.c.reauth_reason.is_not(None))
        .order_by(t.c.updated_at.desc(), t.c.user_id)
        .limit(limit)
    )
    return [ReconnectNeeded(r.user_id, r.athlete_id, r.reauth_reason, r.updated_at) for r in await conn.execute(stmt)]


@dataclass(frozen=True, slots=True)
class Failure:
    occurred_at: datetime
    user_id: str
    trigger: str | None
    outcome: str | None
    strava_status: int | None
    detail: str | None


async def recent_failures(conn: AsyncConnection, *, limit: int) -> list[Failure]:
    """The latest refresh attempts that did not succeed, newest first."""
    stmt = (
        sa.select(e.c.occurred_at, e.c.user_id, e.c.trigger, e.c.outcome, e.c.strava_status, e.c.detail)
        .where(e.c.kind == "refresh", e.c.outcome != SUCCESS)
        .order_by(e.c.id.desc())
        .limit(limit)
    )
    return [Failure(**row._mapping) for row in (await conn.execute(stmt)).all()]


async def notifications_pending(conn: AsyncConnection) -> int:
    stmt = sa.select(sa.func.count()).select_from(n).where(n.c.delivered_at.is_(None))
    return int((await conn.execute(stmt)).scalar_one())
