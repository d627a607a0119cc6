"""Sweeper scheduling (sweep_at, failure backoff) and the shared Strava rate budget.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user_tokens") as batch:
        batch.add_column(sa.Column("sweep_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("failure_count", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_error", sa.String(length=64), nullable=True))
    # Existing rows: due when the default 30-minute buffer starts; the next write sets the jittered time.
    op.execute("UPDATE user_tokens SET sweep_at = expires_at - 1800")
    with op.batch_alter_table("user_tokens") as batch:
        batch.alter_column("sweep_at", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("failure_count", existing_type=sa.Integer(), server_default=None)
    op.create_index(
        "ix_user_tokens_sweep",
        "user_tokens",
        ["sweep_at"],
        postgresql_where=sa.text("reauth_reason IS NULL"),
        sqlite_where=sa.text("reauth_reason IS NULL"),
    )
    budget = op.create_table(
        "strava_rate_budget",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("window_used", sa.Integer(), nullable=False),
        sa.Column("day_start", sa.BigInteger(), nullable=False),
        sa.Column("day_used", sa.Integer(), nullable=False),
        sa.Column("paused_until", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_strava_rate_budget")),
    )
    op.bulk_insert(
        budget, [{"id": 1, "window_start": 0, "window_used": 0, "day_start": 0, "day_used": 0, "paused_until": 0}]
    )


def downgrade() -> None:
    op.drop_table("strava_rate_budget")
    op.drop_index("ix_user_tokens_sweep", table_name="user_tokens")
    with op.batch_alter_table("user_tokens") as batch:
        batch.drop_column("last_error")
        batch.drop_column("failure_count")
        batch.drop_column("sweep_at")
