"""The dashboard's HTML on its own: every value escaped, and the chart's bars stacked to scale."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from tokensvc.api.dashboard_page import chart, render_dashboard, render_login
from tokensvc.service.dashboard import DashboardView, HourBar, ReconnectRow
from tokensvc.service.gateway_stats import OUTCOMES, GatewayTotals
from tokensvc.service.rate_budget import BudgetState
from tokensvc.store.stats import Failure, OutcomeCounts

NOW = datetime(2027, 1, 15, 8, 20, tzinfo=UTC)
FIRST_HOUR = NOW.replace(minute=0) - timedelta(hours=23)
HOSTILE = ["a.b-c_<", "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "x' onmouseover='y"]


def hours(**at: tuple[int, int, int]) -> list[HourBar]:
    """24 buckets, all empty but the ones named `h<index>` = (success, failure, reauth_required)."""
    bars = []
    for i in range(24):
        success, failure, reauth = at.get(f"h{i}", (0, 0, 0))
        bars.append(HourBar(FIRST_HOUR + timedelta(hours=i), success, failure, reauth))
    return bars


def view(
    *, user_id: str = "user-1", detail: str | None = "Strava answered 500", paused_until: int = 0
) -> DashboardView:
    return DashboardView(
        version="0.1.0",
        as_of=NOW,
        users={"total": 3, "valid": 1, "expiring_soon": 0, "expired": 1, "needs_reauth": 1},
        last_24h=OutcomeCounts(success=4, failure=1, reauth_required=1),
        hours=hours(h20=(3, 1, 0), h23=(1, 0, 1)),
        must_reconnect=[ReconnectRow(user_id, 134815, "Strava rejected the refresh token", NOW)],
        failures=[Failure(NOW, user_id, "sweep", "transient", 500, detail)],
        budget=BudgetState(limit_15min=200, limit_daily=2000, used_15min=7, used_daily=42, paused_until=paused_until),
        notifications_pending=2,
    )


class TestEscaping:
    @pytest.mark.parametrize("hostile", HOSTILE)
    def test_user_ids_and_details_are_escaped(self, hostile: str) -> None:
        """Whatever a caller or Strava put in an id or a detail is text on the page, never markup."""
        page = render_dashboard(view(user_id=hostile, detail=hostile))
        assert hostile not in page
        escaped = hostile.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        escaped = escaped.replace('"', "&#34;").replace("'", "&#39;")
        assert page.count(escaped) == 3  # the reconnect row, the failure's user and its detail
        assert "<script" not in page

    def test_the_login_message_is_escaped(self) -> None:
        """Even the sign-in form's message goes through autoescape."""
        page = render_login(error="<b>no</b>")
        assert "<b>no</b>" not in page
        assert "&lt;b&gt;no&lt;/b&gt;" in page


class TestGateway:
    def test_the_gateway_section_shows_the_success_rate_and_every_outcome(self) -> None:
        """The sync success rate as a percentage of the calls, each outcome's count, and the windows' resets."""
        counts = dict.fromkeys(OUTCOMES, 0) | {"ok": 45, "rate_limited": 3, "client_error": 2}
        page = render_dashboard(dataclasses.replace(view(), gateway=GatewayTotals(counts)))
        assert 'data-testid="gateway-success-rate">90.0%<' in page
        assert 'data-testid="gateway-calls">50<' in page
        for outcome, count in counts.items():
            assert f'data-testid="gateway-{outcome}">{count}<' in page
        assert 'data-testid="budget-15min-reset">resets 2027-01-15 08:30:00 UTC<' in page
        assert 'data-testid="budget-daily-reset">resets 2027-01-16 00:00:00 UTC<' in page

    def test_no_calls_is_no_rate(self) -> None:
        page = render_dashboard(view())
        assert 'data-testid="gateway-success-rate">n/a<' in page
        assert 'data-testid="gateway-calls">0<' in page


class TestPage:
    def test_the_page_shows_every_part(self) -> None:
        """Header, cards, chart with legend and axis labels, budget, both tables; no script, no other origin."""
        page = render_dashboard(view())
        assert 'data-testid="version">0.1.0<' in page
        assert "2027-01-15 08:20:00 UTC" in page
        assert 'data-testid="users-needs_reauth"><div class="label">Needs reauth</div><div class="value">1<' in page
        assert 'data-testid="notifications-pending"><div class="label">Notifications pending</div>' in page
        assert "<svg" in page
        assert "hour (UTC)" in page
        assert "refresh attempts" in page
        assert "success (4)" in page
        assert "failure (1)" in page
        assert "reauth required (1)" in page
        assert "7 / 200" in page
        assert "42 / 2000" in page
        assert "Not paused" in page
        assert "Strava rejected the refresh token" in page
        assert "<script" not in page
        assert "http://" not in page
        assert "https://" not in page

    def test_a_pause_is_shown_with_its_end(self) -> None:
        """paused_until (epoch seconds) reads as a UTC time."""
        until = int((NOW + timedelta(minutes=10)).timestamp())
        page = render_dashboard(view(paused_until=until))
        assert "Paused until 2027-01-15 08:30:00 UTC" in page

    def test_empty_tables_say_so(self) -> None:
        """No rows: a sentence, not an empty table."""
        empty = DashboardView(
            version="0.1.0",
            as_of=NOW,
            users={"total": 0, "valid": 0, "expiring_soon": 0, "expired": 0, "needs_reauth": 0},
            last_24h=OutcomeCounts(0, 0, 0),
            hours=hours(),
            must_reconnect=[],
            failures=[],
            budget=BudgetState(200, 2000, 0, 0, 0),
            notifications_pending=0,
        )
        page = render_dashboard(empty)
        assert "Nobody needs to reconnect." in page
        assert "No failed refreshes recorded." in page
        assert "<rect" not in page


class TestChart:
    def test_bars_only_for_hours_with_attempts_stacked_in_order(self) -> None:
        """Success at the bottom, then failure, then reauth, each touching the next; empty hours draw nothing."""
        drawn = chart(hours(h5=(2, 1, 1), h23=(4, 0, 0)))
        assert [(bar.series, bar.x) for bar in drawn.bars] == [
            ("success", drawn.bars[0].x),
            ("failure", drawn.bars[0].x),
            ("reauth_required", drawn.bars[0].x),
            ("success", drawn.bars[3].x),
        ]
        success, failure, reauth, later = drawn.bars
        assert success.y + success.height == pytest.approx(drawn.bottom)
        assert failure.y + failure.height == pytest.approx(success.y)
        assert reauth.y + reauth.height == pytest.approx(failure.y)
        assert success.height == pytest.approx(2 * failure.height)
        assert later.height == pytest.approx(success.height * 2)
        assert later.x > success.x
        assert drawn.totals == {"success": 6, "failure": 1, "reauth_required": 1}

    def test_the_y_axis_tops_at_a_round_number_above_the_busiest_hour(self) -> None:
        """Seven attempts in an hour: the axis reads 0, 5, 10 and the bar reaches 70% of it."""
        drawn = chart(hours(h0=(7, 0, 0)))
        assert [tick.label for tick in drawn.y_ticks] == ["0", "5", "10"]
        plot_height = drawn.bottom - drawn.top
        assert drawn.bars[0].height == pytest.approx(0.7 * plot_height)

    @pytest.mark.parametrize(("busiest", "labels"), [(1, ["0", "1"]), (3, ["0", "2", "5"]), (0, ["0", "1"])])
    def test_each_y_label_sits_at_its_own_value(self, busiest: int, labels: list[str]) -> None:
        """Labels are whole attempts, placed where that many attempts would reach."""
        drawn = chart(hours(h0=(busiest, 0, 0)))
        assert [tick.label for tick in drawn.y_ticks] == labels
        top = int(labels[-1])
        for tick in drawn.y_ticks:
            expected = drawn.bottom - (drawn.bottom - drawn.top) * int(tick.label) / top
            assert tick.position == pytest.approx(expected)

    def test_the_x_axis_labels_every_third_hour(self) -> None:
        """Eight labels, the first the oldest hour."""
        drawn = chart(hours())
        assert [tick.label for tick in drawn.x_ticks][:2] == ["09:00", "12:00"]
        assert len(drawn.x_ticks) == 8
        assert drawn.bars == []
