"""The refresh claim: a short committed claim, the Strava call holding nothing, a second short store; lapsed
claims taken over; the newest pair wins over a rejection of the token it replaced."""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import UTC, datetime

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock, seed_user
from tokensvc.app import Resources, open_resources
from tokensvc.config import Settings
from tokensvc.crypto import TokenCipher
from tokensvc.errors import ProviderUnavailable, ReauthRequired
from tokensvc.models import refresh_claims
from tokensvc.providers.strava import TokenGrant
from tokensvc.sandbox import SandboxState
from tokensvc.schemas import TokenImport
from tokensvc.service.tokens import MSG_ELSEWHERE, MSG_SIBLING
from tokensvc.status import Status
from tokensvc.store import claims
from tokensvc.store import tokens as token_store
from tokensvc.store.tokens import NewTokens, TokenRow

pytestmark = pytest.mark.dialects("sqlite", "postgres")

HELD = 10  # seconds a test waits for the sandbox to park a request (a bound, not a synchronisation)


def calls(sandbox: SandboxState) -> int:
    return int(sandbox.calls["refresh"])


async def claim_rows(res: Resources) -> list[tuple[str, str]]:
    async with res.engine.connect() as conn:
        rows = (await conn.execute(sa.select(refresh_claims.c.user_id, refresh_claims.c.owner))).all()
    return [(r.user_id, r.owner) for r in rows]


async def stored(res: Resources, user_id: str) -> TokenRow | None:
    """The user's row as the database holds it now."""
    async with res.engine.connect() as conn:
        return await token_store.get(conn, user_id)


def at(clock: FakeClock) -> datetime:
    return datetime.fromtimestamp(int(clock()), UTC)


def encrypted(res: Resources, settings: Settings, user_id: str, grant: TokenGrant) -> NewTokens:
    """The columns a refresh stores for `grant`, encrypted with the service's keys."""
    cipher = TokenCipher(settings.all_encryption_keys)
    return NewTokens(
        access_token_enc=cipher.encrypt(grant.access_token, user_id=user_id, field="access"),
        refresh_token_enc=cipher.encrypt(grant.refresh_token, user_id=user_id, field="refresh")
        if grant.refresh_token
        else None,
        key_id=cipher.current_key_id,
        expires_at=grant.expires_at,
        sweep_at=res.service.sweep_at(user_id, grant.expires_at),
    )


async def plant_claim(res: Resources, user_id: str, *, owner: str, until: float, write_until: float) -> None:
    """Another replica's claim, as it left it (alive or dead)."""
    async with res.engine.begin() as conn:
        row = await token_store.get(conn, user_id)
        assert row is not None
        taken = await claims.take(
            conn,
            user_id,
            owner=owner,
            version_read=row.version,
            now=0,
            until=int(until * 1000),
            write_until=int(write_until * 1000),
        )
        assert taken is not None


class TestNothingIsHeldWhileStravaAnswers:
    async def test_other_users_writes_go_on_while_a_refresh_waits_at_strava(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A refresh held at Strava holds a claim row only: another user's import commits meanwhile (on SQLite
        too: no write lock is held), the token row's version is untouched, and the claim goes with the result."""
        slow = await seed_user(resources, sandbox, clock, expires_in=-10)
        sandbox.gate.hold("refresh")
        refresh = asyncio.create_task(resources.service.refresh(slow.user_id))
        await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=HELD)
        assert [user for user, _owner in await claim_rows(resources)] == [slow.user_id]
        version_while_claimed = (await stored(resources, slow.user_id)).version  # type: ignore[union-attr]
        other = await asyncio.wait_for(seed_user(resources, sandbox, clock, expires_in=3600), timeout=2)
        assert (await resources.service.status(other.user_id)).status is Status.VALID
        sandbox.gate.release()
        result = await refresh
        assert result.refreshed is True
        row = await stored(resources, slow.user_id)
        assert row is not None
        assert row.version == version_while_claimed + 1
        assert await claim_rows(resources) == []
        assert calls(sandbox) == 1


class TestAClaimHeldElsewhere:
    async def test_a_background_refresh_whose_stored_token_still_serves_does_not_wait(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A live claim of another replica and a token still usable: a background refresh (or the sweep) leaves
        the user to that replica, and access-token serves the stored token; no Strava call. (A caller who asked
        for a refresh waits for the owner's: the two-waiters test below.)"""
        user = await seed_user(resources, sandbox, clock, expires_in=600)
        await plant_claim(resources, user.user_id, owner="other", until=clock() + 30, write_until=clock() + 60)
        result = await resources.service.refresh(user.user_id, trigger="background")
        assert (result.refreshed, result.message) == (False, MSG_ELSEWHERE)
        token = await resources.service.access_token(user.user_id, min_ttl=60)
        assert token.access_token == user.access_token
        assert calls(sandbox) == 0

    async def test_two_waiters_share_the_owners_result_and_make_no_call(
        self, settings: Settings, sandbox: SandboxState, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """Replica A's refresh is at Strava; replica B's callers (an expired token) wait on A's claim, then
        take A's new pair: one Strava call in all."""
        async with (
            open_resources(settings, clock=clock, strava_transport=strava_transport) as a,
            open_resources(settings, clock=clock, strava_transport=strava_transport) as b,
        ):
            user = await seed_user(a, sandbox, clock, expires_in=-10)
            sandbox.gate.hold("refresh")
            owner = asyncio.create_task(a.service.access_token(user.user_id, min_ttl=300))
            await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=HELD)
            waiters = [asyncio.create_task(b.service.access_token(user.user_id, min_ttl=300)) for _ in range(2)]
            done, _pending = await asyncio.wait(waiters, timeout=0.3)
            assert not done  # they wait on the claim rather than call Strava or fail
            sandbox.gate.release()
            got = [await owner, *[await w for w in waiters]]
        assert len({t.access_token for t in got}) == 1
        assert got[0].access_token != user.access_token
        assert calls(sandbox) == 1

    async def test_an_asked_for_refresh_waits_for_the_owners_and_shares_its_result(
        self, settings: Settings, sandbox: SandboxState, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport
    ) -> None:
        """The contract's refresh rules: concurrent callers wait for the one refresh and share its result. Replica
        A refreshes an expiring-soon user (at Strava, held); `POST /refresh` on replica B waits on A's claim, though
        the stored token is still usable, and answers with A's new pair: one Strava call."""
        async with (
            open_resources(settings, clock=clock, strava_transport=strava_transport) as a,
            open_resources(settings, clock=clock, strava_transport=strava_transport) as b,
        ):
            user = await seed_user(a, sandbox, clock, expires_in=600)
            sandbox.gate.hold("refresh")
            owner = asyncio.create_task(a.service.refresh(user.user_id))
            await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=HELD)
            asked = asyncio.create_task(b.service.refresh(user.user_id))
            done, _pending = await asyncio.wait([asked], timeout=0.3)
            assert not done  # it waits on the claim rather than answer with the stored token
            sandbox.gate.release()
            first, second = await owner, await asked
        assert first.refreshed is True
        assert (second.refreshed, second.message) == (False, MSG_SIBLING)
        new_expiry = first.token_status.expires_at
        assert new_expiry is not None
        assert new_expiry > user.expires_at
        assert second.token_status.expires_at == new_expiry
        assert calls(sandbox) == 1

    async def test_a_lapsed_claim_is_taken_over(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The owner died before Strava answered (its claim lapsed, its write budget spent): the next caller
        takes the claim over and refreshes, once."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        await plant_claim(resources, user.user_id, owner="dead", until=clock() - 1, write_until=clock() - 1)
        result = await resources.service.refresh(user.user_id)
        assert result.refreshed is True
        assert calls(sandbox) == 1
        assert await claim_rows(resources) == []


class TestTheNewestPairWins:
    async def test_a_taker_over_rejected_while_the_lapsed_owner_may_write_flags_nobody(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The lapsed owner rotated at Strava and may still store its pair: the taker-over's rejection is a 503,
        not `needs_reauth`; once the owner's write budget has passed, a rejection flags the user."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        await plant_claim(resources, user.user_id, owner="frozen", until=clock() - 1, write_until=clock() + 30)
        sandbox.rotate_athlete(user.athlete_id)  # what the frozen owner's call did
        with pytest.raises(ProviderUnavailable) as caught:
            await resources.service.refresh(user.user_id)
        assert type(caught.value) is ProviderUnavailable
        assert 1 <= caught.value.retry_after <= 32
        status = await resources.service.status(user.user_id)
        assert (status.status, status.needs_reauth) == (Status.EXPIRED, False)
        # the taker-over keeps the claim until then: nobody presents the dead token again meanwhile
        owners = [owner for _user, owner in await claim_rows(resources)]
        assert len(owners) == 1
        assert owners[0].startswith(f"{socket.gethostname()[:40]}:{os.getpid()}:")  # this process's service
        clock.advance(31)
        with pytest.raises(ReauthRequired):  # and the dead token is not presented again
            await resources.service.refresh(user.user_id)
        assert calls(sandbox) == 1

    async def test_a_late_pair_clears_a_flag_set_over_the_token_it_replaced(
        self, resources: Resources, settings: Settings, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """The owner's write arrives after a taker-over flagged the user over the same refresh token: the pair is
        stored and the flag cleared. A deauthorization (tokens discarded) is not overwritten."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        service = resources.service
        read = await stored(resources, user.user_id)
        assert read is not None
        rotated = sandbox.rotate_athlete(user.athlete_id)
        tokens = encrypted(
            resources,
            settings,
            user.user_id,
            _grant(rotated["access_token"], rotated["refresh_token"], rotated["expires_at"]),
        )
        async with resources.engine.begin() as conn:
            await token_store.mark_needs_reauth(
                conn, user.user_id, reason="refresh_token_invalid", now=at(clock), expected_version=read.version
            )
            written = await token_store.write_refresh(
                conn,
                user.user_id,
                tokens,
                expected_version=read.version,
                now=at(clock),
                read_refresh_enc=read.refresh_token_enc,
            )
            assert written is not None
            assert written.reauth_reason is None
            await token_store.mark_needs_reauth(
                conn, user.user_id, reason="deauthorized", now=at(clock), discard_tokens=True
            )
            again = await token_store.write_refresh(
                conn,
                user.user_id,
                tokens,
                expected_version=read.version,
                now=at(clock),
                read_refresh_enc=read.refresh_token_enc,
            )
        assert again is None
        service.row_changed(user.user_id)
        assert (await service.status(user.user_id)).reauth_reason == "deauthorized"

    async def test_a_newer_pair_stored_while_we_waited_is_used(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """A claim race lost to a sibling's write: the caller decides again on the new row, no Strava call.

        The claim at the stale version goes through `under_claim`, the refresh's own claim step: refused (nothing
        run under it, no claim row kept) because the row moved on."""
        user = await seed_user(resources, sandbox, clock, expires_in=-10)
        stale = await stored(resources, user.user_id)
        assert stale is not None
        fresh = sandbox.rotate_athlete(user.athlete_id)
        await resources.service.import_tokens(
            user.user_id,
            _import(user.athlete_id, fresh["access_token"], fresh["refresh_token"], fresh["expires_at"]),
        )
        ran: list[str] = []

        async def call() -> str:
            ran.append("call")
            return "called"

        async def store_result(conn: object, result: str) -> str:
            ran.append("store")
            return result

        assert await resources.service.under_claim(stale, call, store_result) is None
        assert ran == []
        current = await stored(resources, user.user_id)
        assert current is not None
        assert current.version == stale.version + 1
        assert await claim_rows(resources) == []
        result = await resources.service.refresh(user.user_id)
        assert result.refreshed is False
        assert result.message != MSG_SIBLING
        assert calls(sandbox) == 0


class TestShutdown:
    async def test_a_refresh_held_at_strava_finishes_and_new_ones_are_refused(
        self, resources: Resources, sandbox: SandboxState, clock: FakeClock
    ) -> None:
        """`aclose` refuses new refreshes but waits for the one at Strava, which stores its pair."""
        held = await seed_user(resources, sandbox, clock, expires_in=-10)
        later = await seed_user(resources, sandbox, clock, expires_in=-10)
        sandbox.gate.hold("refresh")
        refresh = asyncio.create_task(resources.service.refresh(held.user_id))
        await asyncio.wait_for(sandbox.gate.wait_held(1), timeout=HELD)
        resources.service.begin_close()
        closing = asyncio.create_task(resources.service.aclose(grace_seconds=10))
        with pytest.raises(ProviderUnavailable):
            await resources.service.refresh(later.user_id)
        assert not closing.done()
        sandbox.gate.release()
        await closing
        assert (await refresh).refreshed is True
        assert (await resources.service.status(held.user_id)).status is Status.VALID
        assert calls(sandbox) == 1


def _grant(access: str, refresh: str, expires_at: int) -> TokenGrant:
    return TokenGrant(access_token=access, refresh_token=refresh, expires_at=expires_at)


def _import(athlete_id: int, access: str, refresh: str, expires_at: int) -> TokenImport:
    return TokenImport(
        access_token=access, refresh_token=refresh, expires_at=expires_at, athlete_id=athlete_id, scopes=["read"]
    )
