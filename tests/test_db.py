"""Migrations on both databases, and the query plan that makes "who is due" a range scan."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from tests.conftest import make_settings
from tokensvc.db import _upgrade, alembic_config, alembic_dir, downgrade, make_engine, migrate
from tokensvc.models import refresh_counts, token_events, token_usage, user_tokens

pytestmark = pytest.mark.dialects("sqlite", "postgres")


async def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


class TestMigrations:
    async def test_downgrade_to_base_and_upgrade_again(self, database_url: str) -> None:
        """The migrations run both ways on SQLite and Postgres, and twice in a row is a no-op."""
        engine = make_engine(database_url)
        try:
            await downgrade(engine, "base")
            assert "user_tokens" not in await table_names(database_url)
            await migrate(engine)
            await migrate(engine)
            assert {"user_tokens", "alembic_version"} <= await table_names(database_url)
        finally:
            await engine.dispose()

    async def test_the_models_match_the_migrations(self, database_url: str) -> None:
        """Autogenerate finds nothing to add: the SQLModel tables and the Alembic scripts agree."""
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext
        from sqlmodel import SQLModel

        import tokensvc.models  # noqa: F401 - registers the tables on the metadata

        engine = make_engine(database_url)
        try:
            async with engine.connect() as conn:
                diff = await conn.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata)
                )
        finally:
            await engine.dispose()
        assert diff == []


class TestDueQueryPlan:
    async def plan(self, pg_url: str, query: str | sa.Select[str]) -> str:
        """EXPLAIN `query` over 20,000 users of whom a few are due."""
        engine = make_engine(make_settings(pg_url).database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text(
                        "INSERT INTO user_tokens (user_id, expires_at, sweep_at, failure_count, scopes, created_at, "
                        "updated_at, version) SELECT 'u' || g, 1800000000 + g, 1800000000 + g - 1800, 0, '', now(), "
                        "now(), 1 FROM generate_series(1, 20000) g"
                    )
                )
                await conn.execute(sa.text("ANALYZE user_tokens"))
                if not isinstance(query, str):
                    query = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
                return "\n".join((await conn.execute(sa.text("EXPLAIN " + query))).scalars().all())
        finally:
            await engine.dispose()

    async def test_listing_by_expiry_is_an_index_range_scan_on_postgres(self, pg_url: str) -> None:
        """The expiry listing reads ix_user_tokens_due, not the whole table."""
        plan = await self.plan(
            pg_url,
            "SELECT user_id FROM user_tokens WHERE reauth_reason IS NULL AND expires_at <= 1800000100 "
            "ORDER BY expires_at LIMIT 100",
        )
        assert "ix_user_tokens_due" in plan, plan
        assert "Seq Scan" not in plan, plan

    async def test_the_sweepers_claim_is_an_index_range_scan_on_postgres(self, pg_url: str) -> None:
        """The sweeper's claim (the statement `store.claim_due` sends) reads ix_user_tokens_sweep."""
        from tokensvc.store.tokens import due_statement

        plan = await self.plan(pg_url, due_statement(now=1798200100, limit=100))
        assert "ix_user_tokens_sweep" in plan, plan
        assert "Seq Scan" not in plan, plan


@pytest.mark.postgres
class TestPoolPing:
    async def test_a_pooled_connection_whose_backend_died_is_replaced_at_checkout(self, pg_url: str) -> None:
        """The engine's one-round-trip ping (db.py) still tells a dead pooled connection: the checkout after its
        backend was terminated gets a new one, and the transaction on it succeeds."""
        engine = make_engine(make_settings(pg_url).database_url, pool_size=1)
        other = make_engine(make_settings(pg_url).database_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                first = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            async with other.connect() as conn:
                terminate = sa.text("SELECT pg_terminate_backend(:pid, 5000)")  # waits until it is gone
                killed = (await conn.execute(terminate, {"pid": first})).scalar()
            assert killed is True
            async with engine.begin() as conn:
                second = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            assert second != first
        finally:
            await engine.dispose()
            await other.dispose()


class TestRollupBackfill:
    async def test_upgrading_to_0008_counts_the_last_two_days_of_refresh_rows(self, database_url: str) -> None:
        """Refresh rows of the last two days become hourly counts (so the chart and /v1/stats stay truthful across
        the upgrade); older rows and other kinds are not counted."""
        engine = make_engine(database_url)
        now = datetime.now(UTC)
        rows = [
            (now - timedelta(minutes=5), "refresh", "succeeded"),
            (now - timedelta(minutes=6), "refresh", "succeeded"),
            (now - timedelta(minutes=7), "refresh", "transient"),
            (now - timedelta(days=3), "refresh", "succeeded"),
            (now - timedelta(minutes=8), "imported", None),
        ]
        try:
            await downgrade(engine, "0005")
            async with engine.begin() as conn:
                for occurred_at, kind, outcome in rows:
                    await conn.execute(
                        sa.insert(token_events).values(occurred_at=occurred_at, user_id="u", kind=kind, outcome=outcome)
                    )
            await migrate(engine)
            async with engine.connect() as conn:
                counts = (
                    await conn.execute(
                        sa.select(refresh_counts.c.hour, refresh_counts.c.outcome, refresh_counts.c.count)
                    )
                ).all()
        finally:
            await engine.dispose()
        hour = int(now.timestamp()) - int(now.timestamp()) % 3600
        expected = {"succeeded": 2, "transient": 1}
        # the three recent rows may straddle an hour boundary: compare per outcome, and every hour is recent
        totals: dict[str, int] = {}
        for row_hour, outcome, count in counts:
            assert hour - 3600 <= row_hour <= hour
            totals[outcome] = totals.get(outcome, 0) + count
        assert totals == expected


class TestUpgradingToRefreshClaims:
    async def test_code_from_before_0010_fails_at_start_on_a_migrated_database(
        self, database_url: str, tmp_path: Path
    ) -> None:
        """The fleet stops for 0010 (docs/operations.md): once migrated, an old replica's start-up migration (its
        scripts are 0010's ancestors, exactly what the code before 0010 shipped) fails at once instead of running
        beside new replicas with another refresh guard. Downgrading to 0010's parent, as the notes say, drops the
        claims and keeps every table the old code knows."""
        scripts = ScriptDirectory.from_config(alembic_config(database_url))
        parent = scripts.get_revision("0010").down_revision
        assert isinstance(parent, str)
        known_before = {rev.revision for rev in scripts.iterate_revisions(parent, "base")}
        old_scripts = tmp_path / "alembic"
        shutil.copytree(alembic_dir(), old_scripts)
        for script in (old_scripts / "versions").glob("*.py"):
            if script.name[:4].isdigit() and script.name[:4] not in known_before:
                script.unlink()
        engine = make_engine(database_url)
        try:
            await migrate(engine)
            assert "refresh_claims" in await table_names(database_url)
            cfg = alembic_config(database_url)
            cfg.set_main_option("script_location", str(old_scripts))
            with pytest.raises(CommandError, match="Can't locate revision"):
                async with engine.begin() as conn:
                    await conn.run_sync(_upgrade, cfg, "head")
            await downgrade(engine, parent)
            tables = await table_names(database_url)
            assert "refresh_claims" not in tables
            async with engine.begin() as conn:  # the old code's own start-up migration now finds its head
                await conn.run_sync(_upgrade, cfg, "head")
            await migrate(engine)
            assert "refresh_claims" in await table_names(database_url)
        finally:
            await engine.dispose()


class TestUsageBackfill:
    async def test_upgrading_to_0009_marks_every_existing_user_used_now(self, database_url: str) -> None:
        """Issue 10: after the upgrade every user is active for TOKENSVC_SWEEP_ACTIVE_DAYS, so nobody stops being
        swept because the service did not note uses before."""
        engine = make_engine(database_url)
        now = datetime.now(UTC)
        try:
            await downgrade(engine, "0008")
            async with engine.begin() as conn:
                for user_id in ("a", "b"):
                    await conn.execute(
                        sa.insert(user_tokens).values(
                            user_id=user_id, expires_at=1, created_at=now, updated_at=now, sweep_at=1
                        )
                    )
            await migrate(engine)
            async with engine.connect() as conn:
                rows = (await conn.execute(sa.select(token_usage.c.user_id, token_usage.c.last_used_at))).all()
        finally:
            await engine.dispose()
        assert sorted(user_id for user_id, _ in rows) == ["a", "b"]
        assert all(abs(at - now.timestamp()) < 120 for _, at in rows)
