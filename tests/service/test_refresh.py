"""The refresh decision and its exactly-once guarantee, on SQLite and Postgres, against the sandbox over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from tests.conftest import FakeClock, Seeded, import_body, make_settings, seed_user, tasks_finished
from tokensvc.app import Resources, open_resources
from tokensvc.config import Settings
from tokensvc.crypto import TokenCipher
from tokensvc.errors import (
    ProviderMisconfigured,
    ProviderRateLimited,
    ProviderUnavailable,
    ReauthRequired,
    TokensMissing,
)
from tokensvc.sandbox import FaultSpec, SandboxState, create_sandbox_app
from tokensvc.status import Status

pytestmark = pytest.mark.dialects("sqlite", "postgres")

BUFFER = 1800


def refresh_calls(sandbox: SandboxState) -> int:
    return int(sandbox.calls["refresh"])


async def stored_refresh_token(res: Resources, settings: Settings, user_id: str) -> str:
    """The refresh token the database holds for the user, decrypted with the service's keys."""
    async with res.engine.connect() as conn:
        ciphertext = (
            await conn.execute(sa.text("SELECT refresh_token_enc FROM user_tokens WHERE user_id = :u"), {"u": user_id})
        ).scalar_one()
    return TokenCipher(settings.all_encryption_keys).decrypt(ciphertext, user_id=user_id, field="refresh")


class TestWhenToRefresh:
    async def test_a_valid_token_is_not_refreshed(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A token with more than the buffer left makes no Strava call without force."""
        user = await seed_user(resources, sandbox, clock, expires_in=BUFFER + 60)
        result = await resources.service.refresh(user.user_id)
        assert result.refreshed is False
        assert result.message == "Tokens are still valid - no refresh needed"
        assert result.token_status.status is Status.VALID
        assert refresh_calls(sandbox) == 0

    @pytest.mark.parametrize("expires_in", [BUFFER, 1, 0, -3600])
    async def test_an_expiring_or_expired_token_is_refreshed_and_the_rotation_stored(
        self, resources: Resources, settings: Settings, sandbox: SandboxState, clock: FakeClock, expires_in: int
    ) -> None:
        """Inside the buffer or past expiry: one Strava call, and the newest refresh token is what is stored."""
        user = await seed_user(resources, sandbox, clock, expires_in=expires_in)
        result = await resources.service.refresh(user.user_id)
        assert result.refreshed is True
        assert result.token_status.status is Status.VALID
        assert result.token_status.last_refreshed_at is not None
        assert refresh_calls(sandbox) == 1
        newest = sandbox.snapshot(user.athlete_id)
        assert await stored_refresh_token(resources, settings, user.user_id) == newest["refresh_token"]
        assert newest["refresh_token"] != user.refresh_token

    async def test_force_refreshes_a_valid_token(
        self, resources: Resources, settings: Settings, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """`force` calls Strava even for a valid token (the one-hour rule then returns the same access token)."""
        user = await seed_user(resources, sandbox, clock, expires_in=20_000)
        result = await resources.service.refresh(user.user_id, force=True)
        assert result.refreshed is True
        assert result.token_status.expires_at == user.expires_at
        assert (
            await stored_refresh_token(resources, settings, user.user_id)
            == sandbox.snapshot(user.athlete_id)["refresh_token"]
        )

    async def test_a_user_without_tokens_is_told_to_connect(self, resources: Resources, sandbox: SandboxState) -> None:
        """No row: TokensMissing, which carries needs_reauth, and no Strava call."""
        with pytest.raises(TokensMissing) as caught:
            await resources.service.refresh("nobody")
        assert caught.value.extra["needs_reauth"] is True
        assert refresh_calls(sandbox) == 0


class TestExactlyOnce:
    async def test_concurrent_callers_in_one_process_share_one_refresh(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """100 concurrent refreshes for one expired user: one Strava call, one result for all."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="latency", latency_ms=100))
        results = await asyncio.gather(*(resources.service.refresh(user.user_id) for _ in range(100)))
        assert refresh_calls(sandbox) == 1
        assert {r.token_status.expires_at for r in results} == {sandbox.snapshot(user.athlete_id)["expires_at"]}
        assert sum(r.refreshed for r in results) == 100  # everyone shared the one refresh that happened

    async def test_two_replicas_on_one_database_refresh_once(
        self,
        settings: Settings,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> None:
        """Two services with their own engines (as two processes would be) and one due user: one Strava call."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="latency", latency_ms=200))
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as other:
            first, second = await asyncio.gather(
                resources.service.access_token(user.user_id, min_ttl=300),
                other.service.access_token(user.user_id, min_ttl=300),
            )
        assert refresh_calls(sandbox) == 1
        assert first.access_token == second.access_token == sandbox.snapshot(user.athlete_id)["access_token"]
        assert sandbox.stats()["ledger_violations"] == []


class TestRejectedRefreshToken:
    async def test_a_revoked_athlete_needs_reauth_and_is_never_retried(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava rejects the newest refresh token: needs_reauth (refresh_token_invalid), then no more calls."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        sandbox.revoke(user.athlete_id)
        with pytest.raises(ReauthRequired):
            await resources.service.refresh(user.user_id)
        status = await resources.service.status(user.user_id)
        assert (status.status, status.reauth_reason, status.needs_reauth) == (
            Status.NEEDS_REAUTH,
            "refresh_token_invalid",
            True,
        )
        calls = refresh_calls(sandbox)
        with pytest.raises(ReauthRequired):
            await resources.service.refresh(user.user_id, force=True)
        with pytest.raises(ReauthRequired):
            await resources.service.access_token(user.user_id, min_ttl=0)
        assert refresh_calls(sandbox) == calls == 1

    async def test_reconnecting_clears_needs_reauth(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """New tokens for a user in needs_reauth make them valid again."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        sandbox.revoke(user.athlete_id)
        with pytest.raises(ReauthRequired):
            await resources.service.refresh(user.user_id)
        fresh = sandbox.create_athlete(user.athlete_id)
        status = await resources.service.import_tokens(
            user.user_id,
            import_body(
                Seeded(
                    user.user_id, user.athlete_id, fresh["access_token"], fresh["refresh_token"], fresh["expires_at"]
                )
            ),
        )
        assert status.status is Status.VALID
        assert status.reauth_reason is None


@pytest.mark.postgres
class TestSeededRotationRace:
    async def test_a_newer_token_stored_while_strava_rejected_ours_is_used_not_flagged(
        self,
        pg_url: str,
        sandbox: SandboxState,
        clock: FakeClock,
        strava_transport: httpx.AsyncBaseTransport,
    ) -> None:
        """Another client rotates and imports the new pair while our refresh is at Strava: no false needs_reauth.

        Sequence, made deterministic by the sandbox's hold gate: our refresh claims the user and is held at
        Strava (holding no lock: the import does not wait for it); the other client rotates (our token dies) and
        imports the new pair; Strava rejects our token, and the re-read finds the newer token.
        """
        settings = make_settings(pg_url)
        async with (
            open_resources(settings, clock=clock, strava_transport=strava_transport) as ours,
            open_resources(settings, clock=clock, strava_transport=strava_transport) as theirs,
        ):
            user = await seed_user(ours, sandbox, clock, expires_in=-10)
            sandbox.gate.hold("refresh")
            refresh = asyncio.create_task(ours.service.refresh(user.user_id))
            await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=10)
            rotated = sandbox.rotate_athlete(user.athlete_id)
            newer = user.with_pair(rotated)
            await asyncio.wait_for(theirs.service.import_tokens(user.user_id, import_body(newer)), timeout=5)
            sandbox.gate.release()
            result = await refresh
            status = await ours.service.status(user.user_id)
            stored = await stored_refresh_token(ours, settings, user.user_id)
        assert result.refreshed is False
        assert result.message == "Tokens were refreshed by another request"
        assert status.status is Status.VALID
        assert stored == rotated["refresh_token"]


class TestTransientFailures:
    @pytest.mark.parametrize(
        ("fault", "error"),
        [
            (FaultSpec(endpoint="refresh", kind="status", status=500), ProviderUnavailable),
            (FaultSpec(endpoint="refresh", kind="status", status=503, body="<html>down</html>"), ProviderUnavailable),
            (FaultSpec(endpoint="refresh", kind="status", status=429), ProviderRateLimited),
            (FaultSpec(endpoint="refresh", kind="status", status=429, retry_after=42), ProviderRateLimited),
            (FaultSpec(endpoint="refresh", kind="malformed"), ProviderUnavailable),
            (FaultSpec(endpoint="refresh", kind="malformed", body="not json"), ProviderUnavailable),
        ],
        ids=["500", "503-html", "429", "429-retry-after", "200-not-a-token", "200-not-json"],
    )
    async def test_a_transient_failure_changes_nothing_stored(
        self,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        fault: FaultSpec,
        error: type[ProviderUnavailable],
    ) -> None:
        """5xx, 429 and a 200 that is not a token: 503 error with Retry-After; tokens, status and version unchanged."""
        user = await seed_user(resources, sandbox, clock, expires_in=100)
        stored = sa.text(
            "SELECT access_token_enc, refresh_token_enc, expires_at, reauth_reason, last_refreshed_at, version "
            "FROM user_tokens"
        )
        async with resources.engine.connect() as conn:
            before = (await conn.execute(stored)).all()
        sandbox.add_fault(fault)
        with pytest.raises(error) as caught:
            await resources.service.refresh(user.user_id)
        assert type(caught.value) is error
        assert caught.value.retry_after >= 1
        if fault.retry_after is not None:
            assert caught.value.retry_after == fault.retry_after
        async with resources.engine.connect() as conn:
            assert (await conn.execute(stored)).all() == before
            failures = (await conn.execute(sa.text("SELECT failure_count FROM user_tokens"))).scalar_one()
        assert failures == 1  # only the backoff bookkeeping moved
        assert (await resources.service.status(user.user_id)).status is Status.EXPIRING_SOON
        if error is ProviderRateLimited:
            # every refresh call pauses until the window resets (or Retry-After): none reaches Strava meanwhile
            calls = refresh_calls(sandbox)
            with pytest.raises(ProviderRateLimited):
                await resources.service.refresh(user.user_id)
            assert refresh_calls(sandbox) == calls
            clock.advance(caught.value.retry_after)
        # and the next attempt, with Strava back, works with the same stored refresh token
        assert (await resources.service.refresh(user.user_id)).refreshed is True


class TestStravaVariants:
    @pytest.fixture
    async def non_rotating(self, settings: Settings, clock: FakeClock) -> AsyncIterator[tuple[Resources, SandboxState]]:
        app = create_sandbox_app(clock=clock, rotate=False)
        async with open_resources(settings, clock=clock, strava_transport=httpx.ASGITransport(app=app)) as res:
            yield res, app.state.sandbox

    async def test_a_response_without_a_new_refresh_token_keeps_the_old_one(
        self, non_rotating: tuple[Resources, SandboxState], settings: Settings, clock: FakeClock
    ) -> None:
        """Strava may omit or repeat the refresh token: the stored one stays usable."""
        res, sandbox = non_rotating
        user = await seed_user(res, sandbox, clock, expires_in=-10)
        assert (await res.service.refresh(user.user_id)).refreshed is True
        assert await stored_refresh_token(res, settings, user.user_id) == user.refresh_token
        clock.advance(30_000)
        assert (await res.service.refresh(user.user_id)).refreshed is True

    async def test_strava_rejecting_our_application_is_an_operator_problem_not_the_users(
        self, database_url: str, sandbox: SandboxState, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """A wrong client secret: 503 misconfigured, and the user is not flagged."""
        settings = make_settings(database_url, strava_client_secret=SecretStr("wrong"))
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
            user = await seed_user(res, sandbox, clock, expires_in=-10)
            with pytest.raises(ProviderMisconfigured):
                await res.service.refresh(user.user_id)
            assert (await res.service.status(user.user_id)).status is Status.EXPIRED


class TestAccessToken:
    async def test_a_valid_token_is_served_from_the_database_without_calling_strava(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """valid → the stored token, no Strava call."""
        user = await seed_user(resources, sandbox, clock, expires_in=10_000)
        token = await resources.service.access_token(user.user_id, min_ttl=300)
        assert token.access_token == user.access_token
        assert token.expires_in == 10_000
        assert refresh_calls(sandbox) == 0

    async def test_a_due_token_with_enough_life_is_served_at_once_and_refreshed_once_in_the_background(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """expiring_soon with remaining >= min_ttl: the stored token now, and one background refresh for all."""
        user = await seed_user(resources, sandbox, clock, expires_in=1000)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="latency", latency_ms=50))
        async with tasks_finished():
            calls = (resources.service.access_token(user.user_id, min_ttl=300) for _ in range(20))
            tokens = await asyncio.gather(*calls)
            assert {t.access_token for t in tokens} == {user.access_token}
        assert refresh_calls(sandbox) == 1
        assert (await resources.service.status(user.user_id)).status is Status.VALID

    @pytest.mark.parametrize(("expires_in", "min_ttl"), [(200, 300), (0, 0), (-50, 0), (2000, 3600)])
    async def test_a_token_short_of_min_ttl_is_refreshed_before_it_is_handed_out(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock, expires_in: int, min_ttl: int
    ) -> None:
        """Never an expired token, never one with less life than asked: the caller waits for the refresh."""
        user = await seed_user(resources, sandbox, clock, expires_in=expires_in)
        token = await resources.service.access_token(user.user_id, min_ttl=min_ttl)
        assert token.access_token == sandbox.snapshot(user.athlete_id)["access_token"] != user.access_token
        assert token.expires_in >= max(min_ttl, 1)
        assert refresh_calls(sandbox) == 1

    async def test_a_failed_refresh_does_not_hand_out_the_short_token(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """Strava down and the stored token too short: 503, not a token that will not last."""
        user = await seed_user(resources, sandbox, clock, expires_in=100)
        sandbox.add_fault(FaultSpec(endpoint="refresh", kind="status", status=502))
        with pytest.raises(ProviderUnavailable):
            await resources.service.access_token(user.user_id, min_ttl=300)


class TestDelete:
    async def test_delete_revokes_at_strava_and_forgets_the_user(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The row is gone and Strava revokes every token; a second delete is a no-op."""
        user = await seed_user(resources, sandbox, clock, expires_in=10_000)
        await resources.service.delete(user.user_id)
        assert sandbox.snapshot(user.athlete_id)["revoked"] is True
        assert (await resources.service.status(user.user_id)).status is Status.MISSING
        await resources.service.delete(user.user_id)
        assert (sandbox.calls["revoke"], sandbox.calls["deauthorize"]) == (1, 0)

    async def test_delete_still_deletes_when_strava_fails(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A Strava 500 on the revoke does not keep the tokens (the grant waits in a tombstone instead)."""
        user = await seed_user(resources, sandbox, clock, expires_in=10_000)
        sandbox.add_fault(FaultSpec(endpoint="revoke", kind="status", status=500))
        await resources.service.delete(user.user_id)
        assert (await resources.service.status(user.user_id)).status is Status.MISSING
