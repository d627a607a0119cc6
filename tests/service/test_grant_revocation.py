"""Ending a deleted user's grant (`service/grant_revocation.py`, `store/tombstones.py`) on SQLite and Postgres,
against the sandbox over HTTP: `/oauth/revoke` by default, the fallback to `/oauth/deauthorize` on a 404, the
pinned settings, an outage that leaves the tombstone until Strava confirms, claims between replicas, a reconnect
that supersedes it, and the periodic job that retries it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from pydantic import SecretStr

from tests.api.test_webhooks_api import wait_until
from tests.conftest import FakeClock, Seeded, import_body, make_settings, seed_user
from tokensvc.app import Resources, open_resources
from tokensvc.config import Settings
from tokensvc.crypto import TokenCipher, generate_key
from tokensvc.errors import ProviderUnavailable
from tokensvc.models import revocation_tombstones
from tokensvc.sandbox import FaultSpec, SandboxState
from tokensvc.service.grant_revocation import BACKOFF_CAP_SECONDS, LEASE_SECONDS
from tokensvc.service.keys import KeyRotator
from tokensvc.store import tombstones

pytestmark = pytest.mark.dialects("sqlite", "postgres")

INVALID_TOKEN = '{"message": "Bad Request", "errors": [{"resource": "Token", "field": "token", "code": "invalid"}]}'


@pytest.fixture
def endpoint() -> str:
    return "auto"


@pytest.fixture
def settings(database_url: str, endpoint: str) -> Settings:
    """The retry job off: tests run `run_due` when they mean to (one test starts the job itself)."""
    return make_settings(database_url, strava_revoke_endpoint=endpoint, revoke_poll_interval_seconds=0)


async def pending(res: Resources) -> list[tuple[str, int]]:
    async with res.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(revocation_tombstones.c.user_id, revocation_tombstones.c.attempts).order_by(
                revocation_tombstones.c.id
            )
        )
        return [(row.user_id, row.attempts) for row in rows]


def revocations(outcome: str) -> float:
    return REGISTRY.get_sample_value("tokensvc_strava_revocations_total", {"outcome": outcome}) or 0.0


def calls(sandbox: SandboxState) -> tuple[int, int, int]:
    return sandbox.calls["revoke"], sandbox.calls["deauthorize"], sandbox.calls["refresh"]


async def delete_during_outage(res: Resources, sandbox: SandboxState, clock: FakeClock, status: int = 503) -> Seeded:
    """A user deleted while Strava answers `status` to the revoke: the row is gone, the grant is not."""
    user = await seed_user(res, sandbox, clock, expires_in=20_000)
    sandbox.add_fault(FaultSpec(endpoint="revoke", kind="status", status=status))
    await res.service.delete(user.user_id)
    assert (await res.service.status(user.user_id)).status == "missing"
    assert sandbox.snapshot(user.athlete_id)["revoked"] is False
    return user


class TestRevokeByDefault:
    async def test_delete_revokes_the_grant_with_the_refresh_token_and_leaves_no_tombstone(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """One POST /oauth/revoke, no deauthorize, no refresh; Strava's grant ends; nothing is kept."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        revoked_before = revocations("revoked")
        await resources.service.delete(user.user_id)
        assert calls(sandbox) == (1, 0, 0)
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True
        assert sandbox.calls_by_athlete[user.athlete_id]["revoke"] == 1
        assert await pending(resources) == []
        assert revocations("revoked") == revoked_before + 1

    async def test_the_revoke_is_rate_counted(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The revoke takes one unit of the shared overall window."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        before = (await resources.budget.state()).used_15min
        await resources.service.delete(user.user_id)
        assert (await resources.budget.state()).used_15min == before + 1

    async def test_a_dead_token_confirms(self, resources: Resources, sandbox: SandboxState, clock: FakeClock) -> None:
        """Strava calling the token invalid (400) means nothing is left alive: the tombstone goes."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.add_fault(FaultSpec(endpoint="revoke", kind="status", status=400, body=INVALID_TOKEN))
        await resources.service.delete(user.user_id)
        assert await pending(resources) == []


class TestFallback:
    async def test_a_404_from_revoke_falls_back_to_deauthorize_and_remembers(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """auto: /oauth/revoke answering 404 → /oauth/deauthorize with the live access token; the next delete goes
        straight to deauthorize (no second 404 spent)."""
        first = await seed_user(resources, sandbox, clock, expires_in=20_000)
        second = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.add_fault(FaultSpec(endpoint="revoke", kind="status", status=404))
        await resources.service.delete(first.user_id)
        assert calls(sandbox) == (1, 1, 0)
        await resources.service.delete(second.user_id)
        assert calls(sandbox) == (1, 2, 0)
        assert sandbox.snapshot(first.athlete_id)["revoked"] is True
        assert sandbox.snapshot(second.athlete_id)["revoked"] is True
        assert await pending(resources) == []

    async def test_the_fallback_is_retried_after_a_while(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """An hour after the 404, revoke is tried again (it may have been deployed meanwhile)."""
        first = await seed_user(resources, sandbox, clock, expires_in=50_000)
        sandbox.add_fault(FaultSpec(endpoint="revoke", kind="status", status=404))
        await resources.service.delete(first.user_id)
        clock.advance(3601)
        second = await seed_user(resources, sandbox, clock, expires_in=50_000)
        await resources.service.delete(second.user_id)
        assert calls(sandbox) == (2, 1, 0)


class TestPinned:
    @pytest.mark.parametrize("endpoint", ["deauthorize"])
    async def test_deauthorize_pinned_never_sends_revoke(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """TOKENSVC_STRAVA_REVOKE_ENDPOINT=deauthorize: the legacy endpoint only."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        await resources.service.delete(user.user_id)
        assert calls(sandbox) == (0, 1, 0)
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True

    @pytest.mark.parametrize("endpoint", ["deauthorize"])
    async def test_deauthorize_with_an_expired_access_token_refreshes_first(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Deauthorize needs a live access token: an expired one is replaced by a refresh, then the grant ends."""
        user = await seed_user(resources, sandbox, clock, expires_in=-100)
        await resources.service.delete(user.user_id)
        assert calls(sandbox) == (0, 1, 1)
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True
        assert await pending(resources) == []

    @pytest.mark.parametrize("endpoint", ["deauthorize"])
    async def test_an_access_token_strava_killed_early_is_refreshed_and_retried(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A 401 for a stored access token that looked alive is not proof the grant is gone: refresh, deauthorize."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.invalidate_access(user.athlete_id)
        await resources.service.delete(user.user_id)
        assert calls(sandbox) == (0, 2, 1)
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True

    @pytest.mark.parametrize("endpoint", ["revoke"])
    async def test_revoke_pinned_does_not_fall_back_and_keeps_the_tombstone(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """TOKENSVC_STRAVA_REVOKE_ENDPOINT=revoke: a 404 is retried later, never a deauthorize."""
        user = await delete_during_outage(resources, sandbox, clock, status=404)
        assert calls(sandbox) == (1, 0, 0)
        assert await pending(resources) == [(user.user_id, 1)]


class TestOutageThenRecovery:
    @pytest.mark.parametrize("status", [503, 429])
    async def test_the_tombstone_waits_and_the_retry_confirms_and_deletes_it(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock, status: int
    ) -> None:
        """The row goes at once; the grant stays in a tombstone until the retry (after its backoff) is confirmed."""
        user = await delete_during_outage(resources, sandbox, clock, status=status)
        assert await pending(resources) == [(user.user_id, 1)]
        assert await resources.revoker.run_due() == 0  # not due yet: backoff
        clock.advance(BACKOFF_CAP_SECONDS + 1)
        assert await resources.revoker.run_due() == 1
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True
        assert await pending(resources) == []
        assert sandbox.calls["revoke"] == 2

    async def test_a_429_pauses_rate_counted_calls_on_every_replica(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava's 429 on the revoke pauses the overall window (nothing more is sent until it resets)."""
        await delete_during_outage(resources, sandbox, clock, status=429)
        assert (await resources.budget.state()).paused_until > clock()

    async def test_a_spent_budget_sends_nothing_and_retries_after_the_reset(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """No unit in the service's share: no call; the tombstone is due when the window resets."""
        user = await seed_user(resources, sandbox, clock, expires_in=50_000)
        await resources.budget.pause(600)
        await resources.service.delete(user.user_id)
        assert calls(sandbox) == (0, 0, 0)
        assert await pending(resources) == [(user.user_id, 1)]
        clock.advance(601)
        assert await resources.revoker.run_due() == 1
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True

    async def test_the_pending_gauge_counts_tombstones(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """tokensvc_revocation_tombstones_pending follows the table (set by the gauges job)."""
        await delete_during_outage(resources, sandbox, clock)
        await resources.stats.update_gauges()
        assert REGISTRY.get_sample_value("tokensvc_revocation_tombstones_pending") == 1
        clock.advance(BACKOFF_CAP_SECONDS + 1)
        await resources.revoker.run_due()
        await resources.stats.update_gauges()
        assert REGISTRY.get_sample_value("tokensvc_revocation_tombstones_pending") == 0


class TestClaims:
    async def test_a_claimed_tombstone_is_not_sent_by_another_replica_until_the_claim_lapses(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Another replica's claim keeps this one from sending; once that claim lapses (its owner died), one send."""
        user = await delete_during_outage(resources, sandbox, clock)
        clock.advance(BACKOFF_CAP_SECONDS + 1)
        now = int(clock())
        async with resources.engine.begin() as conn:
            claimed = await tombstones.claim_due(conn, now=now, limit=10, lease_until=now + LEASE_SECONDS)
        assert [t.user_id for t in claimed] == [user.user_id]
        assert await resources.revoker.run_due() == 0
        assert sandbox.calls["revoke"] == 1
        clock.advance(LEASE_SECONDS + 1)
        assert await resources.revoker.run_due() == 1
        assert sandbox.calls["revoke"] == 2
        async with resources.engine.begin() as conn:
            assert not await tombstones.finish(conn, claimed[0])  # the lapsed owner's late write does nothing

    async def test_two_replicas_retrying_at_once_send_it_once(
        self,
        settings: Settings,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> None:
        """Two replicas' jobs run together over the same due tombstones: each is revoked exactly once."""
        users = [await delete_during_outage(resources, sandbox, clock) for _ in range(3)]
        clock.advance(BACKOFF_CAP_SECONDS + 1)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as other:
            counts = await asyncio.gather(resources.revoker.run_due(), other.revoker.run_due())
        assert sum(counts) == 3
        assert sandbox.calls["revoke"] == 3 + 3
        assert all(sandbox.snapshot(u.athlete_id)["revoked"] for u in users)


class TestSuperseded:
    async def test_a_reconnected_athlete_is_not_revoked(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The athlete is held again (reconnected since the delete): the tombstone goes unsent."""
        user = await delete_during_outage(resources, sandbox, clock)
        snapshot = sandbox.rotate_athlete(user.athlete_id)  # a new pair, as a reconnect brings
        await resources.service.import_tokens("again", import_body(user.with_pair(snapshot)))
        clock.advance(BACKOFF_CAP_SECONDS + 1)
        assert await resources.revoker.run_due() == 1
        assert sandbox.calls["revoke"] == 1  # the failed first attempt only
        assert sandbox.snapshot(user.athlete_id)["revoked"] is False
        assert await pending(resources) == []


class TestJob:
    @pytest.fixture
    def settings(self, database_url: str) -> Settings:
        return make_settings(database_url, revoke_poll_interval_seconds=3600)

    @pytest.fixture
    async def running(
        self, settings: Settings, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> AsyncIterator[Resources]:
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
            res.start_background(sweeper=False)
            yield res

    async def test_the_periodic_job_retries_due_tombstones(
        self, running: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The job every replica runs (wired like housekeeping) takes a due tombstone and confirms it."""
        user = await delete_during_outage(running, sandbox, clock)
        clock.advance(BACKOFF_CAP_SECONDS + 1)
        assert running.revoker.job is not None
        running.revoker.job.wake()

        async def confirmed() -> bool:
            return await pending(running) == []

        await wait_until(confirmed)
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True


class TestRotateKeys:
    async def test_a_tombstone_rotated_to_a_new_key_is_revoked_by_replicas_that_know_only_that_key(
        self,
        database_url: str,
        settings: Settings,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> None:
        """rotate-keys re-encrypts tombstones: once the old key is retired, the retry still decrypts and revokes."""
        user = await delete_during_outage(resources, sandbox, clock)
        old = [key.get_secret_value() for key in settings.encryption_keys]
        new = generate_key()
        report = await KeyRotator(engine=resources.engine, cipher=TokenCipher([new, *old])).rotate()
        assert (report.ok, report.reencrypted) == (True, 1)

        clock.advance(BACKOFF_CAP_SECONDS + 1)
        retired = make_settings(database_url, encryption_keys=[SecretStr(new)], revoke_poll_interval_seconds=0)
        async with open_resources(retired, clock=clock, strava_transport=strava_transport) as res:
            assert await res.revoker.run_due() == 1
            assert await pending(res) == []
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True


class TestDeleteDuringARefresh:
    async def test_a_pair_strava_rotated_while_the_user_was_deleted_is_revoked_too(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A refresh at Strava when the DELETE comes: the delete buries the old pair (its revoke fails here), Strava
        then rotates, and the refresh's write finds no row: the new pair, the grant's only live refresh token, is
        buried and revoked, not dropped (revoking the rotated-away token alone would leave the grant alive)."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        sandbox.gate.hold("refresh")
        refresh = asyncio.create_task(resources.service.refresh(user.user_id))
        await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=10)
        sandbox.add_fault(FaultSpec(endpoint="revoke", kind="status", status=503))
        await resources.service.delete(user.user_id)
        assert await pending(resources) == [(user.user_id, 1)]
        sandbox.gate.release()
        with pytest.raises(ProviderUnavailable):
            await refresh
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True
        assert sandbox.calls["revoke"] == 2
        clock.advance(BACKOFF_CAP_SECONDS + 1)
        assert await resources.revoker.run_due() == 1  # the old, rotated-away token: confirmed, nothing left
        assert await pending(resources) == []
