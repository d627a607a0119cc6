"""All SQL behind /v1/stats, the metrics gauges and the operators' dashboard: aggregates, never a token."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import FAILED_REFRESH
from tokensvc.models import notifications as n
from tokensvc.models import refresh_counts as c
from tokensvc.models import token_events as e
from tokensvc.models import user_tokens as t
from tokensvc.status import Status
from tokensvc.store import rollup

# Refresh outcomes as /v1/stats reports them: everything that is neither a success nor a rejection is a failure.
SUCCESS = "succeeded"
REJECTED = "rejected"


async def users_by_status(conn: AsyncConnection, *, now: int, buffer_seconds: int) -> dict[Status, int]:
    """Stored users per status (`missing` users have no row and are not counted), in one statement of four
    index reads: the users that can be refreshed (an index-only scan of ix_user_tokens_due, the one count that
    grows with the table), those of them due within the buffer and those expired (ranges of the same index), and
    the flagged ones (ix_user_tokens_needs_reauth). Valid users are the difference."""
    live = t.c.reauth_reason.is_(None)

    def count(*where: sa.ColumnElement[bool]) -> sa.ScalarSelect[int]:
        return sa.select(sa.func.count()).select_from(t).where(*where).scalar_subquery()

    stmt = sa.select(
        count(live),
        count(live, t.c.expires_at <= now + buffer_seconds),
        count(live, t.c.expires_at <= now),
        count(t.c.reauth_reason.is_not(None)),
    )
    live_count, due_count, expired, needs_reauth = (await conn.execute(stmt)).one()
    return {
        Status.VALID: int(live_count) - int(due_count),
        Status.EXPIRING_SOON: int(due_count) - int(expired),
        Status.EXPIRED: int(expired),
        Status.NEEDS_REAUTH: int(needs_reauth),
    }


@dataclass(frozen=True, slots=True)
class OutcomeCounts:
    success: int
    failure: int
    reauth_required: int


async def refresh_outcomes(conn: AsyncConnection, *, since_hour: int, hours: int = 24) -> OutcomeCounts:
    """Refresh attempts at Strava in the `hours` hourly buckets from `since_hour` (epoch seconds at an hour's
    start), from the hourly rollup, so every replica's attempts count and no audit row is read."""
    totals = await rollup.totals(conn, c, since_hour=since_hour, hours=hours)
    success = totals.pop(SUCCESS, 0)
    rejected = totals.pop(REJECTED, 0)
    return OutcomeCounts(success=success, failure=sum(totals.values()), reauth_required=rejected)


async def refresh_outcomes_by_hour(conn: AsyncConnection, *, since_hour: int) -> list[tuple[datetime, str, int]]:
    """(hour, outcome, count) for refresh attempts in the hours from `since_hour` on, from the hourly rollup."""
    stmt = (
        sa.select(c.c.hour, c.c.outcome, sa.func.sum(c.c.count))
        .where(c.c.hour >= since_hour)
        .group_by(c.c.hour, c.c.outcome)
    )
    rows = (await conn.execute(stmt)).all()
    return sorted((datetime.fromtimestamp(hour, UTC), outcome, int(count)) for hour, outcome, count in rows)


@dataclass(frozen=True, slots=True)
class ReconnectNeeded:
    user_id: str
    athlete_id: int | None
    reason: str
    since: datetime


async def needs_reauth_users(conn: AsyncConnection, *, limit: int) -> list[ReconnectNeeded]:
    """Users who must reconnect, most recent first (`updated_at` is when they were flagged): the first entries of
    ix_user_tokens_needs_reauth."""
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
        .where(sa.text(FAILED_REFRESH))  # literal, like the predicate of ix_token_events_failures
        .order_by(e.c.id.desc())
        .limit(limit)
    )
    return [Failure(**row._mapping) for row in (await conn.execute(stmt)).all()]


async def notifications_pending(conn: AsyncConnection) -> int:
    """Undelivered notifications (an index-only scan of ix_notifications_due)."""
    stmt = sa.select(sa.func.count()).select_from(n).where(n.c.delivered_at.is_(None))
    return int((await conn.execute(stmt)).scalar_one())
