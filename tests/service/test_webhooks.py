"""Deauthorization webhooks: stored once, confirmed with Strava before anything changes, one effect however often
they come, and stronger than a racing refresh. SQLite and Postgres, the sandbox over HTTP (ASGI)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from tests.conftest import FakeClock, import_body, make_settings, seed_user
from tokensvc.app import Resources, open_resources
from tokensvc.config import Settings
from tokensvc.crypto import generate_notify_secret
from tokensvc.errors import AthleteInUse, ProviderRateLimited, ReauthRequired
from tokensvc.sandbox import FaultSpec, SandboxState
from tokensvc.schemas import StravaEvent
from tokensvc.status import Status
from tokensvc.store import claims, webhook_events
from tokensvc.store import journal as journal_store
from tokensvc.store.webhook_events import StoredWebhookEvent

pytestmark = pytest.mark.dialects("sqlite", "postgres")

VERIFY_TOKEN = "verify-me-please"
SUBSCRIPTION_ID = 1001
EVENT_TIME = 1_800_000_000


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Notifications on (to count them), the processor's loop off: tests process when they mean to."""
    return make_settings(
        database_url,
        strava_webhook_verify_token=SecretStr(VERIFY_TOKEN),
        notify_url="http://app.test/tokensvc-events",
        notify_secret=SecretStr(generate_notify_secret()),
        webhook_poll_interval_seconds=0,
    )


def deauthorization(athlete_id: int, *, event_time: int = EVENT_TIME, **changes: Any) -> StravaEvent:
    body: dict[str, Any] = {
        "aspect_type": "update",
        "event_time": event_time,
        "object_id": athlete_id,
        "object_type": "athlete",
        "owner_id": athlete_id,
        "subscription_id": SUBSCRIPTION_ID,
        "updates": {"authorized": "false"},
    }
    return StravaEvent.model_validate(body | changes)


async def events(res: Resources) -> list[StoredWebhookEvent]:
    async with res.engine.connect() as conn:
        return await webhook_events.list_recent(conn, limit=100)


async def token_columns(res: Resources, user_id: str) -> tuple[str | None, str | None, str | None]:
    async with res.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT access_token_enc, refresh_token_enc, reauth_reason FROM user_tokens WHERE user_id = :u"
                ),
                {"u": user_id},
            )
        ).one()
    return row[0], row[1], row[2]


async def notifications(res: Resources, user_id: str) -> list[str]:
    async with res.engine.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT event_type FROM notifications WHERE user_id = :u ORDER BY created_at"), {"u": user_id}
        )
        return [r[0] for r in rows]


async def audit(res: Resources, user_id: str) -> list[tuple[str, str | None]]:
    """The user's audit rows, oldest first, as (kind, detail)."""
    async with res.engine.connect() as conn:
        rows = await journal_store.list_for_user(conn, user_id, limit=100)
    return [(r.kind, r.detail) for r in reversed(rows)]


async def assert_deauthorized(res: Resources, user_id: str) -> None:
    """needs_reauth (deauthorized), both token columns NULL, and access-token refuses with that reason."""
    status = await res.service.status(user_id)
    assert (status.status, status.reauth_reason) == (Status.NEEDS_REAUTH, "deauthorized")
    assert await token_columns(res, user_id) == (None, None, "deauthorized")
    with pytest.raises(ReauthRequired) as caught:
        await res.service.access_token(user_id, min_ttl=0)
    assert caught.value.extra["reauth_reason"] == "deauthorized"


class TestConfirmedDeauthorization:
    async def test_a_revoked_athlete_loses_its_tokens_once_strava_confirms(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Stored pending, then one check at Strava (401): deauthorized, tokens gone, one audit row, one notice."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.revoke(user.athlete_id)
        assert await resources.webhooks.receive(deauthorization(user.athlete_id)) is True
        assert [e.state for e in await events(resources)] == ["pending"]
        assert await resources.webhooks.process_once() == 1
        await assert_deauthorized(resources, user.user_id)
        (event,) = await events(resources)
        assert (event.state, event.attempts, event.processed_at is not None) == ("confirmed", 1, True)
        assert sandbox.calls["athlete"] == 1
        assert sandbox.calls["refresh"] == 0
        assert ("needs_reauth", "deauthorized") in await audit(resources, user.user_id)
        assert await notifications(resources, user.user_id) == ["token.needs_reauth"]

    async def test_an_expired_token_of_a_revoked_athlete_counts_as_confirmed_and_is_told_once(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The check needs a token: the refresh is rejected (revoked), which confirms it; the user, first flagged
        refresh_token_invalid, ends deauthorized with tokens gone, and hears of it once."""
        user = await seed_user(resources, sandbox, clock, expires_in=-60)
        sandbox.revoke(user.athlete_id)
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        await assert_deauthorized(resources, user.user_id)
        assert sandbox.calls["refresh"] == 1
        assert sandbox.calls["athlete"] == 0
        kinds = await audit(resources, user.user_id)
        assert ("needs_reauth", "refresh_token_invalid") in kinds
        assert ("needs_reauth", "deauthorized (was refresh_token_invalid)") in kinds
        assert await notifications(resources, user.user_id) == ["token.needs_reauth"]

    async def test_the_user_of_the_athlete_is_deauthorized_and_others_are_left_alone(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """One athlete, one user (v1.1: a second user is refused the athlete, so the two rows can no longer kill
        each other's refresh tokens): the athlete's user loses the tokens; a user of another athlete keeps theirs."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        bystander = await seed_user(resources, sandbox, clock, expires_in=20_000)
        with pytest.raises(AthleteInUse):
            await resources.service.import_tokens("twin", import_body(user))
        sandbox.revoke(user.athlete_id)
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        await assert_deauthorized(resources, user.user_id)
        assert (await resources.service.status("twin")).status is Status.MISSING
        assert (await resources.service.status(bystander.user_id)).status is Status.VALID
        assert (await events(resources))[0].result == "deauthorized 1, already 0, unconfirmed 0, gone 0"


class TestDuplicates:
    async def test_strava_retries_are_one_row_and_one_effect(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The same event three times: one row; a later replay (another event_time) re-arms the athlete's one
        check, no sooner than the re-check delay: no second effect, no second notification, no Strava call."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.revoke(user.athlete_id)
        received = [await resources.webhooks.receive(deauthorization(user.athlete_id)) for _ in range(3)]
        assert received == [True, False, False]
        assert len(await events(resources)) == 1
        await resources.webhooks.process_once()
        calls = dict(sandbox.calls)
        assert await resources.webhooks.receive(deauthorization(user.athlete_id, event_time=EVENT_TIME + 5))
        assert await resources.webhooks.process_once() == 0  # not before the re-check delay
        clock.advance(resources.webhooks.recheck_seconds)
        assert await resources.webhooks.process_once() == 1
        (event,) = await events(resources)
        assert event.state == "confirmed"
        assert event.result == "deauthorized 0, already 1, unconfirmed 0, gone 0"
        assert dict(sandbox.calls) == calls
        await assert_deauthorized(resources, user.user_id)
        assert await notifications(resources, user.user_id) == ["token.needs_reauth"]
        assert [a for a in await audit(resources, user.user_id) if a[0] == "needs_reauth"] == [
            ("needs_reauth", "deauthorized")
        ]


class TestUsersAlreadyFlagged:
    """A user flagged `refresh_token_invalid` before the event came (stranded by another client's rotation, or a
    lost answer): that rejection proves the refresh token dead, not a revocation, so Strava is asked about the stored
    access token (another client's rotation leaves it alive)."""

    async def stranded(self, resources: Resources, sandbox: SandboxState, clock: FakeClock) -> Any:
        user = await seed_user(resources, sandbox, clock, expires_in=600)
        sandbox.rotate_athlete(user.athlete_id)  # another client refreshes: our refresh token dies
        with pytest.raises(ReauthRequired):
            await resources.service.refresh(user.user_id)
        assert (await resources.service.status(user.user_id)).reauth_reason == "refresh_token_invalid"
        return user

    async def test_a_forged_event_does_not_turn_a_rejected_token_into_a_revocation(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await self.stranded(resources, sandbox, clock)
        before = await token_columns(resources, user.user_id)
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        (event,) = await events(resources)
        assert event.state == "unconfirmed"
        assert await token_columns(resources, user.user_id) == before  # still refresh_token_invalid, tokens kept
        assert sandbox.calls["athlete"] == 1
        assert await notifications(resources, user.user_id) == ["token.needs_reauth"]  # only the first flag's

    async def test_a_real_revocation_of_a_flagged_user_is_confirmed_by_its_access_token(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await self.stranded(resources, sandbox, clock)
        sandbox.revoke(user.athlete_id)
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        await assert_deauthorized(resources, user.user_id)
        assert (await events(resources))[0].state == "confirmed"
        assert await notifications(resources, user.user_id) == ["token.needs_reauth"]  # told once, not twice

    async def test_once_its_access_token_has_expired_the_earlier_rejection_is_taken_as_the_answer(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Nothing is left to ask Strava: the user must reconnect either way, the dead tokens go, and the reason
        becomes the event's (no second notification)."""
        user = await self.stranded(resources, sandbox, clock)
        clock.advance(700)
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        await assert_deauthorized(resources, user.user_id)
        assert sandbox.calls["athlete"] == 0
        assert await notifications(resources, user.user_id) == ["token.needs_reauth"]


class TestForgedEvents:
    async def test_a_forged_event_keeps_healthy_tokens_and_says_so_in_the_audit(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The athlete did not revoke: Strava still serves the token, so nothing changes but an audit row."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        (event,) = await events(resources)
        assert event.state == "unconfirmed"
        status = await resources.service.status(user.user_id)
        assert (status.status, status.reauth_reason) == (Status.VALID, None)
        token = await resources.service.access_token(user.user_id, min_ttl=0)
        assert token.access_token == user.access_token
        assert sandbox.calls["athlete"] == 1
        assert (await audit(resources, user.user_id))[-1][0] == "deauthorization_unconfirmed"
        assert await notifications(resources, user.user_id) == []

    async def test_an_event_for_an_unknown_athlete_is_dropped_and_calls_nobody(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """No user has the athlete: nothing stored, no Strava call."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        assert await resources.webhooks.receive(deauthorization(987_654)) is False
        assert await resources.webhooks.process_once() == 0
        assert await events(resources) == []
        assert sum(sandbox.calls.values()) == 0
        assert (await resources.service.status(user.user_id)).status is Status.VALID

    async def test_events_of_no_known_kind_are_acknowledged_but_not_stored(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """An athlete create, a club event, an activity event of an odd aspect: nothing stored or forwarded."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        odd: list[dict[str, Any]] = [
            {"aspect_type": "create"},
            {"object_type": "club"},
            {"object_type": "activity", "aspect_type": "x"},
        ]
        for changes in odd:
            assert await resources.webhooks.receive(deauthorization(user.athlete_id, **changes)) is False
        assert await events(resources) == []
        assert await notifications(resources, user.user_id) == []


class TestStravaUnavailable:
    async def test_a_failed_check_is_retried_later_and_then_applied(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava answers 503 to the check: tokens untouched, the check's refresh claim given back (a refresh
        meanwhile does not wait on it), the event waits out its backoff, then applies."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.revoke(user.athlete_id)
        sandbox.add_fault(FaultSpec(endpoint="athlete", kind="status", status=503))
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        (event,) = await events(resources)
        assert (event.state, event.attempts) == ("pending", 1)
        assert event.next_attempt_at > clock()
        assert (await resources.service.status(user.user_id)).reauth_reason is None
        async with resources.engine.connect() as conn:
            assert await claims.get(conn, user.user_id) is None
        assert await resources.webhooks.process_once() == 0  # not due yet
        clock.advance(event.next_attempt_at - clock())
        assert await resources.webhooks.process_once() == 1
        await assert_deauthorized(resources, user.user_id)
        assert sandbox.calls["athlete"] == 2

    async def test_a_rate_limited_check_waits_for_the_window(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava answers 429: the event is retried no sooner than Strava's Retry-After, tokens untouched."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.revoke(user.athlete_id)
        sandbox.add_fault(FaultSpec(endpoint="athlete", kind="status", status=429, retry_after=120))
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        (event,) = await events(resources)
        assert (event.state, event.next_attempt_at) == ("pending", int(clock()) + 120)
        assert (await resources.service.status(user.user_id)).reauth_reason is None

    async def test_checks_draw_on_the_background_share_so_callers_keep_theirs(
        self, database_url: str, sandbox: SandboxState, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """A flood of (unsigned) events may spend the background (backfill) share, 50 % of the window, never the
        rest (the service's reserve is already spent by those same calls): with that share spent, the check waits
        for the next window while a caller's refresh still gets its Strava call, and an interactive call its unit."""
        settings = make_settings(
            database_url,
            strava_webhook_verify_token=SecretStr(VERIFY_TOKEN),
            webhook_poll_interval_seconds=0,
            strava_rate_limit="8,100",  # the background share: 4 calls per 15 minutes
        )
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
            user = await seed_user(res, sandbox, clock, expires_in=20_000)
            for _ in range(4):
                await res.budget.acquire("sweep")
            with pytest.raises(ProviderRateLimited):
                await res.budget.acquire("sweep")
            await res.webhooks.receive(deauthorization(user.athlete_id))
            await res.webhooks.process_once()
            (event,) = await events(res)
            assert event.state == "pending"
            assert sandbox.calls["athlete"] == 0
            result = await res.service.refresh(user.user_id, force=True)
            assert result.refreshed
            assert sandbox.calls["refresh"] == 1
            await res.budget.acquire("interactive")


class TestRaceWithRefresh:
    async def test_a_refresh_in_flight_when_the_athlete_revokes_cannot_bring_tokens_back(
        self,
        settings: Settings,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> None:
        """Another replica's refresh is at Strava (held) when the athlete revokes and the event arrives; our
        processor waits on that refresh's claim. On release the refresh is rejected, and the deauthorization
        applies: tokens NULL, and no later refresh or access-token call revives them."""
        user = await seed_user(resources, sandbox, clock, expires_in=-60)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as other:
            sandbox.gate.hold("refresh")
            refreshing = asyncio.create_task(other.service.access_token(user.user_id, min_ttl=300))
            await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=10)
            sandbox.revoke(user.athlete_id)

            async def deliver_and_process() -> None:
                await resources.webhooks.receive(deauthorization(user.athlete_id))
                await resources.webhooks.process_once()

            # The refresh holds a claim, not a lock: the processor finds the user's token expired and claimed
            # elsewhere, and waits on that claim (or finds its outcome) whichever goes first.
            processing = asyncio.create_task(deliver_and_process())
            sandbox.gate.release()
            with pytest.raises(ReauthRequired):
                await refreshing
            await asyncio.wait_for(processing, timeout=30)
            await assert_deauthorized(resources, user.user_id)
            refresh_calls = sandbox.calls["refresh"]
            with pytest.raises(ReauthRequired):
                await other.service.refresh(user.user_id, force=True)
            with pytest.raises(ReauthRequired):
                await other.service.access_token(user.user_id, min_ttl=0)
            assert sandbox.calls["refresh"] == refresh_calls
        await assert_deauthorized(resources, user.user_id)
        assert (await events(resources))[0].state == "confirmed"

    async def test_a_forced_refresh_during_the_check_does_not_rotate_under_it(
        self,
        settings: Settings,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> None:
        """Our check is at Strava (held) when another replica is asked for a forced refresh: the check holds the
        user's refresh claim (the refresh's own path, no lock), so the forced refresh waits for it, without calling
        Strava. The athlete revokes; the check's answer is about the row as it still is, and applies at once; the
        waiting caller shares that result (reauth required): one check, no refresh call."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as other:
            sandbox.gate.hold("athlete")

            async def deliver_and_process() -> None:
                await resources.webhooks.receive(deauthorization(user.athlete_id))
                await resources.webhooks.process_once()

            processing = asyncio.create_task(deliver_and_process())
            await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=10)
            forced = asyncio.create_task(other.service.refresh(user.user_id, force=True))
            done, _pending = await asyncio.wait([forced], timeout=0.3)
            assert not done  # it waits on the check's claim rather than answer or call Strava
            sandbox.revoke(user.athlete_id)
            sandbox.gate.release()
            await asyncio.wait_for(processing, timeout=30)
            with pytest.raises(ReauthRequired):
                await asyncio.wait_for(forced, timeout=30)
        await assert_deauthorized(resources, user.user_id)
        assert (sandbox.calls["athlete"], sandbox.calls["refresh"]) == (1, 0)
        assert sandbox.stats()["ledger_violations"] == []

    async def test_an_import_that_commits_during_the_check_is_checked_again_and_still_loses(
        self,
        settings: Settings,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> None:
        """Our check is at Strava (held) while another replica imports a newer pair (another client rotated);
        then the athlete revokes. The check's answer was about a row that no longer exists: its fenced store
        changes nothing, the newer row is checked again, and its tokens are discarded."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as other:
            sandbox.gate.hold("athlete")

            async def deliver_and_process() -> None:
                await resources.webhooks.receive(deauthorization(user.athlete_id))
                await resources.webhooks.process_once()

            processing = asyncio.create_task(deliver_and_process())
            await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=10)
            rotated = user.with_pair(sandbox.rotate_athlete(user.athlete_id))
            await other.service.import_tokens(user.user_id, import_body(rotated))
            sandbox.revoke(user.athlete_id)
            sandbox.gate.release()
            await asyncio.wait_for(processing, timeout=30)
        await assert_deauthorized(resources, user.user_id)
        assert sandbox.calls["athlete"] == 2  # the first answer was about a row that no longer existed
        assert sandbox.stats()["ledger_violations"] == []


class TestEventDuringACheck:
    async def test_an_event_that_comes_while_the_check_runs_makes_it_run_again(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The check was claimed (its Strava call may already have been answered) when a (real) deauthorization
        comes: the event is not lost in it; the check stays pending and runs again after the re-check delay."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        assert await resources.webhooks.receive(deauthorization(user.athlete_id))
        now = int(clock())
        async with resources.engine.begin() as conn:
            (claimed,) = await webhook_events.claim_pending(conn, now=now, limit=10, lease_until=now + 300)
        clock.advance(1)
        assert await resources.webhooks.receive(deauthorization(user.athlete_id, event_time=EVENT_TIME + 1))
        assert not await resources.webhooks.receive(deauthorization(user.athlete_id, event_time=EVENT_TIME + 2))
        async with resources.engine.begin() as conn:
            finished = await webhook_events.finish(
                conn,
                claimed,
                state="unconfirmed",
                result="r",
                processed_at=datetime.now(UTC),
                recheck_at=now + 600,
            )
        assert finished is False
        (event,) = await events(resources)
        assert (event.state, event.next_attempt_at) == ("pending", now + 600)
        sandbox.revoke(user.athlete_id)
        clock.advance(600)
        assert await resources.webhooks.process_once() == 1
        await assert_deauthorized(resources, user.user_id)


class TestTheCheckIsARead:
    async def test_the_check_takes_an_overall_and_a_read_unit_and_stravas_headers_correct_both(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """GET /api/v3/athlete is rate-counted and a read: one unit of each window. Strava's X-ReadRateLimit-* lift
        our read count to its own (other clients of the app read too) and lower our read limit to its own."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.rate.configure(read_limit_15min=50, read_limit_daily=500)
        for _ in range(9):  # another client of the same app spends reads
            sandbox.rate.hit(clock(), read=True)
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        assert sandbox.calls["athlete"] == 1
        state = await resources.budget.state()
        assert (state.read_used_15min, state.read_used_daily) == (10, 10)  # max(ours 1, Strava's 10)
        assert (state.used_15min, state.used_daily) == (10, 10)  # Strava counts reads in the overall window too
        assert (state.read_limit_15min, state.read_limit_daily) == (50, 500)  # min(configured 100, Strava's 50)
        assert (state.limit_15min, state.limit_daily) == (200, 2000)

    async def test_a_429_on_the_check_with_only_the_read_window_spent_pauses_reads_alone(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        sandbox.rate.configure(read_limit_15min=3)
        for _ in range(3):
            sandbox.rate.hit(clock(), read=True)
        await resources.webhooks.receive(deauthorization(user.athlete_id))
        await resources.webhooks.process_once()
        (event,) = await events(resources)
        assert event.state == "pending"  # retried after the pause
        state = await resources.budget.state()
        assert state.read_paused_until > clock()
        assert (state.paused_until, state.token_paused_until) == (0, 0)
        await resources.service.delete(user.user_id)  # a rate-counted call that is not a read still goes
        assert sandbox.calls["revoke"] == 1
