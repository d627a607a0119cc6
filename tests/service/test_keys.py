"""Key rotation (`service/keys.py`, `store/keys.py`) on SQLite and Postgres: old rows move to the newest key, rows
already there are untouched, a second run does nothing, unreadable rows are reported, locked rows are waited for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.crypto import TokenCipher, generate_key
from tokensvc.db import make_engine
from tokensvc.models import revocation_tombstones, user_tokens
from tokensvc.service.keys import BatchDone, KeyRotator
from tokensvc.store import keys as store

pytestmark = pytest.mark.dialects("sqlite", "postgres")

NEW, OLD, LOST = generate_key(), generate_key(), generate_key()
EXPIRES_AT = 4_000_000_000
NOW = datetime(2027, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Stored:
    access_token_enc: str | None
    refresh_token_enc: str | None
    key_id: str | None
    version: int


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    yield engine
    await engine.dispose()


def plaintexts(user_id: str) -> tuple[str, str]:
    return f"access-of-{user_id}", f"refresh-of-{user_id}"


async def insert(engine: AsyncEngine, user_id: str, key: str, *, refresh_key: str | None = None) -> None:
    """A row as the service writes it, both tokens under `key` (the refresh token under `refresh_key` if given)."""
    access, refresh = plaintexts(user_id)
    cipher = TokenCipher([key])
    refresh_cipher = TokenCipher([refresh_key or key])
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(user_tokens).values(
                user_id=user_id,
                access_token_enc=cipher.encrypt(access, user_id=user_id, field="access"),
                refresh_token_enc=refresh_cipher.encrypt(refresh, user_id=user_id, field="refresh"),
                key_id=cipher.current_key_id,
                expires_at=EXPIRES_AT,
                scopes="",
                created_at=NOW,
                updated_at=NOW,
                version=1,
                sweep_at=EXPIRES_AT,
                failure_count=0,
            )
        )


async def stored(engine: AsyncEngine, user_id: str) -> Stored:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT access_token_enc, refresh_token_enc, key_id, version FROM user_tokens WHERE user_id = :u"
                ),
                {"u": user_id},
            )
        ).one()
    return Stored(*row)


def assert_readable_with_new_key_only(row: Stored, user_id: str) -> None:
    new_only = TokenCipher([NEW])
    assert row.key_id == new_only.current_key_id
    assert row.access_token_enc is not None
    assert row.refresh_token_enc is not None
    assert new_only.decrypt(row.access_token_enc, user_id=user_id, field="access") == plaintexts(user_id)[0]
    assert new_only.decrypt(row.refresh_token_enc, user_id=user_id, field="refresh") == plaintexts(user_id)[1]


def rotator(engine: AsyncEngine, *, batch_size: int = 500, locked_wait_seconds: float = 30.0) -> KeyRotator:
    return KeyRotator(
        engine=engine,
        cipher=TokenCipher([NEW, OLD]),
        batch_size=batch_size,
        locked_wait_seconds=locked_wait_seconds,
        retry_delay_seconds=0.05,
    )


class TestRotation:
    async def test_old_key_rows_move_to_the_new_key_and_new_key_rows_are_untouched(self, engine: AsyncEngine) -> None:
        """Every old-key row is re-encrypted (same tokens, same version); rows on the new key keep their bytes."""
        old_users = [f"old-{i}" for i in range(7)]
        new_users = [f"new-{i}" for i in range(3)]
        for user_id in old_users:
            await insert(engine, user_id, OLD)
        for user_id in new_users:
            await insert(engine, user_id, NEW)
        before = {u: await stored(engine, u) for u in new_users}

        batches: list[BatchDone] = []
        report = await rotator(engine, batch_size=3).rotate(on_batch=batches.append)

        assert report.ok
        assert report.reencrypted == len(old_users)
        assert [b.reencrypted for b in batches] == [3, 3, 1]
        assert batches[-1].total == len(old_users)
        for user_id in old_users:
            row = await stored(engine, user_id)
            assert_readable_with_new_key_only(row, user_id)
            assert row.version == 1
        for user_id in new_users:
            assert await stored(engine, user_id) == before[user_id]

    async def test_a_second_run_re_encrypts_nothing(self, engine: AsyncEngine) -> None:
        """Idempotent: once every row is on the newest key, a run finds nothing and changes nothing."""
        for i in range(4):
            await insert(engine, f"user-{i}", OLD)
        assert (await rotator(engine).rotate()).reencrypted == 4
        after_first = [await stored(engine, f"user-{i}") for i in range(4)]

        second = await rotator(engine).rotate()

        assert second.ok
        assert second.reencrypted == 0
        assert [await stored(engine, f"user-{i}") for i in range(4)] == after_first

    async def test_a_refresh_token_left_under_the_old_key_is_found_despite_a_new_key_id(
        self, engine: AsyncEngine
    ) -> None:
        """A refresh without a rotated refresh token leaves the old refresh ciphertext next to a new access one and
        the new `key_id`: rotation looks at the ciphertexts, so this row is moved too."""
        await insert(engine, "mixed", NEW, refresh_key=OLD)

        report = await rotator(engine).rotate()

        assert report.reencrypted == 1
        assert_readable_with_new_key_only(await stored(engine, "mixed"), "mixed")

    async def test_a_row_with_no_tokens_is_not_counted(self, engine: AsyncEngine) -> None:
        """A deauthorized user's row keeps no ciphertext: there is nothing to rotate, and it is not an error."""
        await insert(engine, "revoked", OLD)
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "UPDATE user_tokens SET access_token_enc = NULL, refresh_token_enc = NULL WHERE user_id = 'revoked'"
                )
            )

        report = await rotator(engine).rotate()

        assert report.ok
        assert report.reencrypted == 0


class TestUnreadableRows:
    async def test_a_row_under_an_unconfigured_key_is_reported_and_left_alone(self, engine: AsyncEngine) -> None:
        """A row no configured key opens is reported by user id and not written; the others are still rotated."""
        await insert(engine, "a-fine", OLD)
        await insert(engine, "b-lost", LOST)
        await insert(engine, "c-fine", OLD)
        lost_before = await stored(engine, "b-lost")

        report = await rotator(engine, batch_size=2).rotate()

        assert not report.ok
        assert report.unreadable == {"b-lost": "access"}
        assert report.reencrypted == 2
        assert report.still_locked == 0
        assert await stored(engine, "b-lost") == lost_before
        assert_readable_with_new_key_only(await stored(engine, "a-fine"), "a-fine")
        assert_readable_with_new_key_only(await stored(engine, "c-fine"), "c-fine")

    async def test_a_ciphertext_swapped_in_from_another_user_is_reported(self, engine: AsyncEngine) -> None:
        """A ciphertext moved into another user's row fails authentication: reported, never re-encrypted for B."""
        await insert(engine, "alice", OLD)
        await insert(engine, "bob", OLD)
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "UPDATE user_tokens SET refresh_token_enc = "
                    "(SELECT refresh_token_enc FROM user_tokens WHERE user_id = 'alice') WHERE user_id = 'bob'"
                )
            )
        bob_before = await stored(engine, "bob")

        report = await rotator(engine).rotate()

        assert report.unreadable == {"bob": "refresh"}
        assert await stored(engine, "bob") == bob_before
        assert_readable_with_new_key_only(await stored(engine, "alice"), "alice")


class TestConcurrentWriters:
    async def test_a_row_changed_since_it_was_read_is_not_overwritten(self, engine: AsyncEngine) -> None:
        """The write checks the version it read: a refresh that wrote in between keeps its newer tokens."""
        await insert(engine, "racer", OLD)
        current = TokenCipher([NEW]).current_key_id
        async with engine.begin() as conn:
            (row,) = await store.lock_batch(conn, current_key_id=current, after="", limit=10)
        async with engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE user_tokens SET access_token_enc = 'newer', version = version + 1 WHERE user_id = :u"),
                {"u": "racer"},
            )
        async with engine.begin() as conn:
            written = await store.write_sealed(
                conn, row, access_token_enc="stale", refresh_token_enc="stale", key_id=current
            )

        assert written is False
        after = await stored(engine, "racer")
        assert after.access_token_enc == "newer"
        assert after.version == 2


@pytest.mark.postgres
class TestLockedRows:
    async def test_a_row_locked_by_a_refresh_is_skipped_then_rotated_once_released(self, pg_url: str) -> None:
        """SKIP LOCKED: the batch passes over a row a refresh holds (without waiting for it) and a later pass takes
        it once the refresh's transaction ends."""
        engine = make_engine(pg_url)
        try:
            for user_id in ("a-locked", "b-free"):
                await insert(engine, user_id, OLD)
            first_batch = asyncio.Event()
            batches: list[BatchDone] = []

            def on_batch(batch: BatchDone) -> None:
                batches.append(batch)
                first_batch.set()

            async with engine.connect() as holder:
                transaction = await holder.begin()
                await holder.execute(sa.text("SELECT 1 FROM user_tokens WHERE user_id = 'a-locked' FOR UPDATE"))
                rotation = asyncio.create_task(rotator(engine).rotate(on_batch=on_batch))
                async with asyncio.timeout(30):
                    await first_batch.wait()
                assert batches[0].reencrypted == 1  # only b-free: the locked row was passed over, not waited for
                assert (await stored(engine, "a-locked")).key_id == TokenCipher([OLD]).current_key_id
                await transaction.commit()
            async with asyncio.timeout(30):
                report = await rotation

            assert report.ok
            assert report.reencrypted == 2
            assert report.passes >= 2
            assert_readable_with_new_key_only(await stored(engine, "a-locked"), "a-locked")
        finally:
            await engine.dispose()

    async def test_a_row_locked_for_longer_than_the_wait_is_reported_as_still_locked(self, pg_url: str) -> None:
        """A row held past `locked_wait_seconds` is counted as still locked (run again), not silently dropped."""
        engine = make_engine(pg_url)
        try:
            await insert(engine, "held", OLD)
            async with engine.connect() as holder, holder.begin():
                await holder.execute(sa.text("SELECT 1 FROM user_tokens WHERE user_id = 'held' FOR UPDATE"))
                report = await rotator(engine, locked_wait_seconds=0).rotate()
            assert not report.ok
            assert report.still_locked == 1
            assert report.reencrypted == 0
        finally:
            await engine.dispose()


async def bury(engine: AsyncEngine, user_id: str, key: str, *, access: bool = True) -> int:
    """A revocation tombstone as a DELETE leaves it: the row's ciphertexts under `key`, bound to the user id."""
    access_plain, refresh_plain = plaintexts(user_id)
    cipher = TokenCipher([key])
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.insert(revocation_tombstones)
            .values(
                user_id=user_id,
                athlete_id=None,
                refresh_token_enc=cipher.encrypt(refresh_plain, user_id=user_id, field="refresh"),
                access_token_enc=cipher.encrypt(access_plain, user_id=user_id, field="access") if access else None,
                access_expires_at=EXPIRES_AT,
                key_id=cipher.current_key_id,
                due_at=EXPIRES_AT,
                attempts=0,
                created_at=NOW,
            )
            .returning(revocation_tombstones.c.id)
        )
        return int(result.scalar_one())


async def buried(engine: AsyncEngine, tombstone_id: int) -> tuple[str, str | None, str | None]:
    g = revocation_tombstones.c
    async with engine.connect() as conn:
        row = (
            await conn.execute(sa.select(g.refresh_token_enc, g.access_token_enc, g.key_id).where(g.id == tombstone_id))
        ).one()
    return row.refresh_token_enc, row.access_token_enc, row.key_id


class TestTombstones:
    async def test_tombstones_move_to_the_new_key_too(self, engine: AsyncEngine) -> None:
        """A deleted user's grant waiting for Strava is re-encrypted like a row: readable with the new key alone,
        still bound to its user id; one on the new key already keeps its bytes; a second run does nothing."""
        old = [await bury(engine, "gone-1", OLD), await bury(engine, "gone-2", OLD, access=False)]
        current = await bury(engine, "gone-3", NEW)
        untouched = await buried(engine, current)
        await insert(engine, "row-1", OLD)

        report = await rotator(engine, batch_size=1).rotate()

        assert report.ok
        assert report.reencrypted == 3
        new_only = TokenCipher([NEW])
        for tombstone_id, user_id in zip(old, ["gone-1", "gone-2"], strict=True):
            refresh, access, key_id = await buried(engine, tombstone_id)
            assert key_id == new_only.current_key_id
            assert new_only.decrypt(refresh, user_id=user_id, field="refresh") == plaintexts(user_id)[1]
            if access is not None:
                assert new_only.decrypt(access, user_id=user_id, field="access") == plaintexts(user_id)[0]
        assert (await buried(engine, old[1]))[1] is None
        assert await buried(engine, current) == untouched
        assert (await rotator(engine).rotate()).reencrypted == 0

    async def test_an_unreadable_tombstone_is_reported_and_left_alone(self, engine: AsyncEngine) -> None:
        """A tombstone under a key no longer configured: named (user id and tombstone id), untouched, exit not ok."""
        tombstone_id = await bury(engine, "gone-lost", LOST)
        before = await buried(engine, tombstone_id)

        report = await rotator(engine).rotate()

        assert not report.ok
        assert report.unreadable == {f"gone-lost (tombstone {tombstone_id})": "refresh"}
        assert report.still_locked == 0
        assert await buried(engine, tombstone_id) == before
