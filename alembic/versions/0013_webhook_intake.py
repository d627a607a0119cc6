"""A webhook intake that costs an attacker more than it costs us: the service's own push subscription id (events
naming another are dropped), and a per-athlete hourly count of forwarded Strava events (a burst beyond the cap is
dropped). Deauthorization checks become one row per athlete (`dedupe_key` `deauth:<athlete>`), so the rows of
earlier events, one per event, are left to the retention purge.

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "strava_subscription",
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("subscription_id", sa.BigInteger(), nullable=False),
        sa.Column("learned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("slot", name=op.f("pk_strava_subscription")),
    )
    op.create_table(
        "strava_event_windows",
        sa.Column("athlete_id", sa.BigInteger(), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("athlete_id", name=op.f("pk_strava_event_windows")),
    )


def downgrade() -> None:
    op.drop_table("strava_event_windows")
    op.drop_table("strava_subscription")
