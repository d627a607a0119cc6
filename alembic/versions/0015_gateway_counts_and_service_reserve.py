"""The gateway's calls by outcome, and the service's own reserve in the Strava windows (issue 13, item 3).

- `gateway_counts`: gateway calls per hour and outcome, like `refresh_counts` (a few `slot` rows per hour and
  outcome, added to in batches by each replica): what `/v1/stats` and the dashboard read for the sync success rate.
- `strava_rate_budget` gains the service's own rate-counted calls in the current 15-minute and daily windows
  (`service_window_used`, `service_day_used`, the same window starts), so those calls keep a small reserve that the
  app's sync and backfill calls cannot spend.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gateway_counts",
        sa.Column("hour", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "outcome", "slot", name=op.f("pk_gateway_counts")),
    )
    with op.batch_alter_table("strava_rate_budget") as batch:
        batch.add_column(sa.Column("service_window_used", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("service_day_used", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("strava_rate_budget") as batch:
        batch.drop_column("service_day_used")
        batch.drop_column("service_window_used")
    op.drop_table("gateway_counts")
