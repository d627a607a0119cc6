"""The dashboard's view model from real data: users by status, hourly chart, who must reconnect, failures, budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import FakeClock, Seeded, import_body, seed_athlete, seed_user
from tokensvc.app import Resources
from tokensvc.errors import NeedsReconnect, ProviderRateLimited, ProviderUnavailable
from tokensvc.sandbox import SandboxState
from tokensvc.sandbox.faults import FaultSpec
from tokensvc.service.dashboard import AdminSessions, DashboardService, DashboardView, HourBar, reason_in_words
from tokensvc.service.sessions import Sessions
from tokensvc.service.tokens import TokenService

pytestmark = pytest.mark.dialects("sqlite", "postgres")

HOUR = 3600


def dashboard(resources: Resources, clock: FakeClock) -> DashboardService:
    return DashboardService(engine=resources.engine, budget=resources.budget, clock=clock, buffer_seconds=1800)


async def seed_mixed(service: TokenService, sandbox: SandboxState, clock: FakeClock) -> dict[str, Seeded]:
    """Six users: one refreshed two hours ago, then (now) one valid, one expiring, one expired, one whose refresh
    token Strava rejects (needs_reauth) and one whose refresh hits a Strava 500 (a transient failure)."""

    async def seed(expires_in: int) -> Seeded:
        seeded = seed_athlete(sandbox, clock, expires_in=expires_in)
        await service.import_tokens(seeded.user_id, import_body(seeded))
        return seeded

    users: dict[str, Seeded] = {}
    users["refreshed"] = await seed(100)
    await service.refresh(users["refreshed"].user_id, trigger="api")
    clock.advance(2 * HOUR)
    users["valid"] = await seed(6 * HOUR)
    users["expiring"] = await seed(600)
    users["expired"] = await seed(-60)
    users["rejected"] = await seed(100)
    sandbox.revoke(users["rejected"].athlete_id)
    with pytest.raises(NeedsReconnect):
        await service.refresh(users["rejected"].user_id, trigger="sweep")
    users["transient"] = await seed(100)
    sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=500))
    with pytest.raises(ProviderUnavailable):
        await service.refresh(users["transient"].user_id, trigger="browser")
    return users


class TestDashboardView:
    async def test_counts_users_by_status(self, resources: Resources, sandbox: SandboxState, clock: FakeClock) -> None:
        """Each stored user is counted once, under the status the contract gives them now."""
        await seed_mixed(resources.service, sandbox, clock)
        view = await dashboard(resources, clock).view()
        assert view.users == {
            "total": 6,
            "valid": 2,  # the refreshed one and the valid import
            "expiring_soon": 2,  # the expiring import and the one whose refresh failed
            "expired": 1,
            "needs_reauth": 1,
        }
        assert view.as_of == datetime.fromtimestamp(clock.now, UTC)

    async def test_chart_has_the_attempts_in_the_hours_they_happened(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """24 hourly buckets ending with the current one; the success two hours ago, the reject and the 500 now."""
        await seed_mixed(resources.service, sandbox, clock)
        view = await dashboard(resources, clock).view()
        now_hour = datetime.fromtimestamp(clock.now, UTC).replace(minute=0, second=0, microsecond=0)
        assert len(view.hours) == 24
        assert [h.hour for h in view.hours] == [now_hour - timedelta(hours=23 - i) for i in range(24)]
        assert view.hours[-1] == HourBar(now_hour, success=0, failure=1, reauth_required=1)
        assert view.hours[-3] == HourBar(now_hour - timedelta(hours=2), success=1, failure=0, reauth_required=0)
        assert sum(h.total for h in view.hours) == 3
        assert (view.last_24h.success, view.last_24h.failure, view.last_24h.reauth_required) == (1, 1, 1)

    async def test_attempts_older_than_the_chart_are_left_out(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A day later the chart is empty, and the last-24-hours figures say so."""
        await seed_mixed(resources.service, sandbox, clock)
        clock.advance(25 * HOUR)
        view = await dashboard(resources, clock).view()
        assert sum(h.total for h in view.hours) == 0
        assert (view.last_24h.success, view.last_24h.failure, view.last_24h.reauth_required) == (0, 0, 0)
        assert len(view.failures) == 2  # recent failures are the latest ones, however old

    async def test_must_reconnect_lists_flagged_users_with_the_reason_in_words(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Only the rejected user must reconnect; the transient failure is not a false alarm."""
        users = await seed_mixed(resources.service, sandbox, clock)
        view = await dashboard(resources, clock).view()
        assert [(r.user_id, r.athlete_id, r.reason) for r in view.must_reconnect] == [
            (users["rejected"].user_id, users["rejected"].athlete_id, "Strava rejected the refresh token")
        ]
        assert view.must_reconnect[0].since == datetime.fromtimestamp(clock.now, UTC)

    async def test_recent_failures_newest_first_with_trigger_and_strava_status(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The 500 and the rejection are listed (newest first); the success is not."""
        users = await seed_mixed(resources.service, sandbox, clock)
        view = await dashboard(resources, clock).view()
        rows = [(f.user_id, f.trigger, f.outcome, f.strava_status) for f in view.failures]
        assert rows == [
            (users["transient"].user_id, "browser", "transient", 500),
            (users["rejected"].user_id, "sweep", "rejected", 400),
        ]

    async def test_rate_budget_shows_usage_and_a_pause(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Only calls Strava counts take units (a refresh takes none, a deauthorize one of each overall window); a
        429 with Retry-After on a token call shows as that kind paused until then."""
        user = await seed_user(resources, sandbox, clock, expires_in=100)
        other = await seed_user(resources, sandbox, clock, expires_in=20_000)
        before = await dashboard(resources, clock).view()
        assert (before.budget.used_15min, before.budget.paused_until) == (0, 0)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=429, retry_after=600))
        with pytest.raises(ProviderRateLimited):
            await resources.service.refresh(user.user_id)
        view = await dashboard(resources, clock).view()
        assert (view.budget.used_15min, view.budget.used_daily) == (0, 0)
        assert view.budget.token_paused_until == int(clock.now) + 600
        assert view.budget.paused_until == 0  # rate-counted calls are not paused by a token call's 429
        await resources.service.delete(other.user_id)
        view = await dashboard(resources, clock).view()
        assert (view.budget.used_15min, view.budget.used_daily, view.budget.read_used_15min) == (1, 1, 0)
        assert (view.budget.limit_15min, view.budget.limit_daily) == (200, 2000)
        assert (view.budget.read_limit_15min, view.budget.read_limit_daily) == (100, 1000)

    async def test_an_empty_service(self, resources: Resources, clock: FakeClock) -> None:
        """No users, no attempts: zeros everywhere, never an error."""
        view: DashboardView = await dashboard(resources, clock).view()
        assert view.users == {"total": 0, "valid": 0, "expiring_soon": 0, "expired": 0, "needs_reauth": 0}
        assert view.must_reconnect == []
        assert view.failures == []
        assert view.notifications_pending == 0


class TestReasonInWords:
    @pytest.mark.parametrize(
        ("code", "words"),
        [
            ("refresh_token_invalid", "Strava rejected the refresh token"),
            ("deauthorized", "The athlete revoked access on Strava"),
            ("something_new", "something_new"),
        ],
    )
    def test_reason(self, code: str, words: str) -> None:
        """The contract's reason codes in an operator's words; an unknown code is shown as it is."""
        assert reason_in_words(code) == words


class TestAdminSessions:
    SECRET = "s" * 40

    def test_a_minted_admin_token_verifies_until_it_expires(self) -> None:
        """Valid within its lifetime, refused a second after."""
        clock = FakeClock()
        admin = AdminSessions(self.SECRET, ttl_seconds=600, clock=clock)
        token = admin.mint()
        assert admin.issued_ms(token) is not None
        clock.advance(601)
        assert admin.issued_ms(token) is None

    def test_tampered_or_foreign_tokens_are_refused(self) -> None:
        """Another secret, an edited token, or nothing at all is not an admin session."""
        clock = FakeClock()
        token = AdminSessions(self.SECRET, ttl_seconds=600, clock=clock).mint()
        admin = AdminSessions("o" * 40, ttl_seconds=600, clock=clock)
        assert admin.issued_ms(token) is None
        ours = AdminSessions(self.SECRET, ttl_seconds=600, clock=clock)
        assert ours.issued_ms(token[:-2] + ("AA" if not token.endswith("AA") else "BB")) is None
        assert ours.issued_ms("") is None
        assert ours.issued_ms(None) is None

    def test_user_sessions_and_admin_sessions_do_not_mix(self) -> None:
        """Signed with the same secret, a user session is no admin session, and an admin token is no user session."""
        clock = FakeClock()
        admin = AdminSessions(self.SECRET, ttl_seconds=600, clock=clock)
        sessions = Sessions(self.SECRET, ttl_seconds=600, clock=clock)
        user_token, _session = sessions.mint("alice")
        assert admin.issued_ms(user_token) is None
        assert sessions.verify(admin.mint()) is None
