"""Migrations on both databases, and the query plan that makes "who is due" a range scan."""

from __future__ import annotations

import sqlalchemy as sa

from tests.conftest import make_settings
from tokensvc.db import downgrade, make_engine, migrate


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
    async def test_who_is_due_is_an_index_range_scan_on_postgres(self, pg_url: str) -> None:
        """With many users, the due query reads ix_user_tokens_due, not the whole table."""
        settings = make_settings(pg_url)
        engine = make_engine(settings.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text(
                        "INSERT INTO user_tokens (user_id, expires_at, scopes, created_at, updated_at, version) "
                        "SELECT 'u' || g, 1800000000 + g, '', now(), now(), 1 FROM generate_series(1, 20000) g"
                    )
                )
                await conn.execute(sa.text("ANALYZE user_tokens"))
                plan = (
                    (
                        await conn.execute(
                            sa.text(
                                "EXPLAIN SELECT user_id FROM user_tokens WHERE reauth_reason IS NULL "
                                "AND expires_at <= 1800000100 ORDER BY expires_at LIMIT 100"
                            )
                        )
                    )
                    .scalars()
                    .all()
                )
        finally:
            await engine.dispose()
        text = "\n".join(plan)
        assert "ix_user_tokens_due" in text, text
        assert "Seq Scan" not in text, text
