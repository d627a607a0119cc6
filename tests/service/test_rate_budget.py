"""The service's own reserve in the shared Strava windows, on both databases: the app's sync (80 %) and backfill
(50 %) calls can never starve the service's deauthorization checks and revokes, which otherwise spend from the
backfill share; the reserve is shared by every replica and rolls with the window."""

from __future__ import annotations

import pytest

from tests.conftest import FakeClock, make_settings
from tokensvc.app import Resources, open_resources
from tokensvc.config import Settings
from tokensvc.errors import ProviderRateLimited
from tokensvc.service.rate_budget import Priority, RateBudget

pytestmark = pytest.mark.dialects("sqlite", "postgres")

# 100 calls per 15 minutes, 1,000 a day: sync may spend 80, backfill and the service's background calls 50,
# and the service keeps a reserve of 5 (5 %).
LIMITS = {"strava_rate_limit": "100,1000", "strava_read_rate_limit": "100,1000"}


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, **LIMITS)


async def spend(budget: RateBudget, priority: Priority, *, read: bool = False) -> int:
    """Take units at `priority` until the budget refuses; how many were taken."""
    taken = 0
    while True:
        try:
            await budget.acquire(priority, read=read)
        except ProviderRateLimited:
            return taken
        taken += 1


class TestReserve:
    async def test_sync_leaves_the_service_its_reserve(self, resources: Resources) -> None:
        """Sync spends its 80 %: the service's background calls, past their 50 % share, still get their 5, then
        stop; an interactive call may still spend the rest of the window."""
        budget = resources.budget
        assert await spend(budget, "sync") == 80
        assert await spend(budget, "sweep") == 5
        assert await spend(budget, "interactive") == 15

    async def test_backfill_leaves_the_service_its_reserve(self, resources: Resources) -> None:
        """Backfill spends its 50 %, the same share as the service's background calls: the service still gets its
        reserve (and only that), and sync the rest of its 80 %."""
        budget = resources.budget
        assert await spend(budget, "backfill") == 50
        assert await spend(budget, "sweep") == 5
        assert await spend(budget, "sync") == 25

    async def test_the_reserve_holds_for_reads_too(self, resources: Resources) -> None:
        """A deauthorization check is a GET: with sync's reads at 80 % of the read window, the checks still pass."""
        budget = resources.budget
        assert await spend(budget, "sync", read=True) == 80
        assert await spend(budget, "sweep", read=True) == 5

    async def test_the_service_spends_from_the_backfill_share(self, resources: Resources) -> None:
        """On its own, the service's background work stops at the backfill share (its reserve is part of what it
        spent), so the app's sync and interactive calls keep the rest."""
        budget = resources.budget
        assert await spend(budget, "sweep") == 50
        assert await spend(budget, "sync") == 30

    async def test_the_reserve_is_shared_by_every_replica_and_rolls_with_the_window(
        self, resources: Resources, settings: Settings, clock: FakeClock
    ) -> None:
        """Another replica's service calls spend the same reserve; the next window brings a new one."""
        async with open_resources(settings, clock=clock) as other:
            assert await spend(resources.budget, "sync") == 80
            await resources.budget.acquire("sweep")
            assert await spend(other.budget, "sweep") == 4
            clock.advance(900)
            assert await spend(other.budget, "sync") == 80
            assert await spend(resources.budget, "sweep") == 5

    async def test_a_refund_gives_the_reserve_back(self, resources: Resources) -> None:
        """A revoke that was not sent after all returns its unit, to the window and to the reserve."""
        budget = resources.budget
        assert await spend(budget, "sync") == 80
        assert await spend(budget, "sweep") == 5
        await budget.refund("sweep")
        assert await spend(budget, "sweep") == 1

    async def test_a_deletes_revoke_may_spend_the_whole_window(self, resources: Resources) -> None:
        """On-demand calls of the service (a DELETE's revoke) are not held to a share at all."""
        assert await spend(resources.budget, "sync") == 80
        assert await spend(resources.budget, "on_demand") == 20

    async def test_a_spent_window_reserve_does_not_hold_back_the_days(
        self, resources: Resources, clock: FakeClock
    ) -> None:
        """The app's sync has spent more than the background share of the day (and of the window): when the
        service's reserve of the 15-minute window runs out, its calls wait for the next window, not the day's end
        (the day's reserve, 50, is far from spent)."""
        budget = resources.budget
        for _ in range(7):  # 7 windows of 80 sync calls: 560 of the day's 1,000, past the background 500
            assert await spend(budget, "sync") == 80
            clock.advance(900)
        assert await spend(budget, "sync") == 80
        assert await spend(budget, "sweep") == 5
        with pytest.raises(ProviderRateLimited) as refused:
            await budget.acquire("sweep")
        assert refused.value.retry_after <= 900
        clock.advance(900)
        assert await spend(budget, "sync") == 80
        assert await spend(budget, "sweep") == 5
