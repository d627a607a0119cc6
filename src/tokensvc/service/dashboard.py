"""The operators' dashboard: who may see it (admin sessions) and what it shows (one read-only view model).

Everything here is aggregates and ids from `store/stats.py` and the rate budget; no token is ever read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc import __version__
from tokensvc.clock import Clock
from tokensvc.schemas import AthleteCounts
from tokensvc.service.gateway_stats import GatewayTotals
from tokensvc.service.rate_budget import BudgetState, RateBudget
from tokensvc.service.signing import SignedTokens
from tokensvc.service.stats import athlete_counts, connected_athletes
from tokensvc.status import Status
from tokensvc.store import gateway_counts, stats
from tokensvc.store import usage as usage_store
from tokensvc.store.stats import Failure, OutcomeCounts

ADMIN_COOKIE = "tokensvc_admin"
HOURS = 24
RECONNECT_LIMIT = 50
FAILURE_LIMIT = 25

REASONS = {
    "refresh_token_invalid": "Strava rejected the refresh token",
    "deauthorized": "The athlete revoked access on Strava",
}


def reason_in_words(reason: str) -> str:
    """Why a user must reconnect, as an operator reads it (an unknown code is shown as it is)."""
    return REASONS.get(reason, reason)


class AdminSessions:
    """Signed, expiring admin logins for the dashboard cookie.

    Signed under their own purpose (salt) and payload, so a user's browser session is never an admin session and
    an admin cookie never authenticates a user endpoint.
    """

    def __init__(self, secret: str, *, ttl_seconds: int, clock: Clock) -> None:
        self._tokens = SignedTokens(secret, purpose="admin", max_age=ttl_seconds, clock=clock)
        self._clock = clock
        self.ttl_seconds = ttl_seconds

    def mint(self) -> str:
        token, _expires_at = self._tokens.dumps({"admin": True, "i": int(self._clock() * 1000)})
        return token

    def issued_ms(self, token: str | None) -> int | None:
        """When an unexpired, untampered admin token was minted (epoch ms; 0 for one without the time); None
        for anything else. Whether it was revoked since is the caller's check (`SessionRevocations`)."""
        if not token:
            return None
        payload = self._tokens.loads(token)
        if payload is None or payload.get("admin") is not True:
            return None
        issued = payload.get("i")
        return issued if isinstance(issued, int) else 0


@dataclass(frozen=True, slots=True)
class HourBar:
    """Refresh attempts that started within one hour (UTC)."""

    hour: datetime
    success: int
    failure: int
    reauth_required: int

    @property
    def total(self) -> int:
        return self.success + self.failure + self.reauth_required


@dataclass(frozen=True, slots=True)
class ReconnectRow:
    user_id: str
    athlete_id: int | None
    reason: str
    since: datetime


@dataclass(frozen=True, slots=True)
class DashboardView:
    version: str
    as_of: datetime
    users: dict[str, int]  # total, valid, expiring_soon, expired, needs_reauth
    last_24h: OutcomeCounts
    hours: list[HourBar]  # HOURS buckets, oldest first, the last one the current hour
    must_reconnect: list[ReconnectRow]
    failures: list[Failure]
    budget: BudgetState
    notifications_pending: int
    active: int | None = None  # users the sweeper keeps fresh (v1.1); None when every user is swept
    idle: int | None = None
    athletes: AthleteCounts | None = None  # connected athletes against TOKENSVC_STRAVA_ATHLETE_CAPACITY (v1.1)

    @property
    def capacity_percent(self) -> int | None:
        """Connected athletes as a share of the capacity, rounded down; None when no capacity is set."""
        if self.athletes is None or self.athletes.capacity is None:
            return None
        return self.athletes.connected * 100 // self.athletes.capacity

    # v1.1: the gateway's calls in the same 24 hours, by outcome (as /v1/stats `gateway`), every replica's as flushed
    gateway: GatewayTotals = field(default_factory=lambda: GatewayTotals.of({}))


def bucket_outcome(outcome: str) -> str:
    """The chart's three series, as /v1/stats counts them: a rejection means reauth; anything else not a success
    is a failure."""
    if outcome == stats.SUCCESS:
        return "success"
    if outcome == stats.REJECTED:
        return "reauth_required"
    return "failure"


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardService:
    """Assembles the dashboard from a handful of aggregate reads on one connection (no transaction kept open)."""

    engine: AsyncEngine
    budget: RateBudget
    clock: Clock
    buffer_seconds: int
    active_days: int = 0
    athlete_capacity: int | None = None

    async def view(self) -> DashboardView:
        """The dashboard as of now. Raises SQLAlchemy errors when the database is unreachable."""
        now = self.clock()
        as_of = datetime.fromtimestamp(now, UTC)
        first_hour = as_of.replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS - 1)
        since_hour = int(first_hour.timestamp())
        async with self.engine.connect() as conn:
            by_status = await stats.users_by_status(conn, now=int(now), buffer_seconds=self.buffer_seconds)
            by_hour = await stats.refresh_outcomes_by_hour(conn, since_hour=since_hour)
            reconnect = await stats.needs_reauth_users(conn, limit=RECONNECT_LIMIT)
            failures = await stats.recent_failures(conn, limit=FAILURE_LIMIT)
            pending = await stats.notifications_pending(conn)
            gateway = GatewayTotals.of(await gateway_counts.totals(conn, since_hour=since_hour))
            active = None
            if self.active_days:
                active = await usage_store.count_active(conn, active_since=int(now) - self.active_days * 86_400)
        budget = await self.budget.state()
        users = {status.value: by_status[status] for status in _COUNTED}
        hours = _hour_bars(first_hour, by_hour)
        return DashboardView(
            version=__version__,
            as_of=as_of,
            users={"total": sum(users.values()), **users},
            last_24h=_totals(hours),
            hours=hours,
            must_reconnect=[
                ReconnectRow(r.user_id, r.athlete_id, reason_in_words(r.reason), r.since) for r in reconnect
            ],
            failures=failures,
            budget=budget,
            notifications_pending=pending,
            active=active,
            idle=None if active is None else max(0, sum(users.values()) - users["needs_reauth"] - active),
            athletes=athlete_counts(connected_athletes(by_status), self.athlete_capacity),
            gateway=gateway,
        )


_COUNTED = (Status.VALID, Status.EXPIRING_SOON, Status.EXPIRED, Status.NEEDS_REAUTH)


def _totals(bars: list[HourBar]) -> OutcomeCounts:
    """The chart's bars added up: what /v1/stats reports for the same 24 hours."""
    return OutcomeCounts(
        success=sum(b.success for b in bars),
        failure=sum(b.failure for b in bars),
        reauth_required=sum(b.reauth_required for b in bars),
    )


def _hour_bars(first_hour: datetime, rows: list[tuple[datetime, str, int]]) -> list[HourBar]:
    counts: dict[datetime, dict[str, int]] = {
        first_hour + timedelta(hours=i): {"success": 0, "failure": 0, "reauth_required": 0} for i in range(HOURS)
    }
    for hour, outcome, count in rows:
        bucket = counts.get(hour.astimezone(UTC))
        if bucket is not None:  # an attempt stamped in the future (clock skew between replicas) is left out
            bucket[bucket_outcome(outcome)] += count
    return [HourBar(hour, **series) for hour, series in counts.items()]
