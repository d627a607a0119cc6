"""Charge what Strava counts, and note which users are used (issue 10).

- `strava_rate_budget` gains the read window's counts (the same window starts as the overall ones) and a pause per
  kind of call: `paused_until` stays the overall (rate-counted) pause, `read_paused_until` the read one and
  `token_paused_until` the one for `/oauth/token`, which Strava does not count but may still answer 429 for.
- `token_usage`: when something last asked for a user's token, a narrow table of its own so that noting a use never
  bumps the token row's version or fires the token cache's NOTIFY. Every existing user is backfilled with "now", so
  the upgrade leaves every user active for `TOKENSVC_SWEEP_ACTIVE_DAYS`.

Revision ID: 0009
Revises: 0010
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("strava_rate_budget") as batch:
        batch.add_column(sa.Column("read_window_used", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("read_day_used", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("read_paused_until", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("token_paused_until", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "token_usage",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("last_used_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_token_usage")),
    )
    op.create_index(op.f("ix_token_usage_last_used_at"), "token_usage", ["last_used_at"])
    now = sa.text("CAST(strftime('%s','now') AS INTEGER)")
    if op.get_bind().dialect.name == "postgresql":
        now = sa.text("CAST(extract(epoch FROM now()) AS BIGINT)")
    op.execute(sa.text(f"INSERT INTO token_usage (user_id, last_used_at) SELECT user_id, {now.text} FROM user_tokens"))


def downgrade() -> None:
    op.drop_index(op.f("ix_token_usage_last_used_at"), table_name="token_usage")
    op.drop_table("token_usage")
    with op.batch_alter_table("strava_rate_budget") as batch:
        batch.drop_column("token_paused_until")
        batch.drop_column("read_paused_until")
        batch.drop_column("read_day_used")
        batch.drop_column("read_window_used")
