"""Growth to a million athletes: indexes for the dashboard's reads and the retention purge, and an hourly rollup of
refresh attempts (`refresh_counts`) so that successes need no audit row each.

The rollup is filled from the last two days of the audit trail, so the dashboard's chart and `/v1/stats` stay
truthful across the upgrade; older success rows leave the audit trail with the retention purge.

Revision ID: 0008
Revises: 0005
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FAILED_REFRESH = "kind = 'refresh' AND outcome <> 'succeeded'"
PROCESSED_EVENT = "state <> 'pending'"


def upgrade() -> None:
    op.create_table(
        "refresh_counts",
        sa.Column("hour", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "outcome", "slot", name=op.f("pk_refresh_counts")),
    )
    op.create_index(
        "ix_user_tokens_needs_reauth",
        "user_tokens",
        [sa.text("updated_at DESC"), "user_id"],
        postgresql_where=sa.text("reauth_reason IS NOT NULL"),
        sqlite_where=sa.text("reauth_reason IS NOT NULL"),
    )
    op.create_index(
        "ix_token_events_failures",
        "token_events",
        ["id"],
        postgresql_where=sa.text(FAILED_REFRESH),
        sqlite_where=sa.text(FAILED_REFRESH),
    )
    op.create_index(
        "ix_notifications_delivered",
        "notifications",
        ["delivered_at"],
        postgresql_where=sa.text("delivered_at IS NOT NULL"),
        sqlite_where=sa.text("delivered_at IS NOT NULL"),
    )
    op.create_index(
        "ix_strava_webhook_events_processed",
        "strava_webhook_events",
        ["processed_at"],
        postgresql_where=sa.text(PROCESSED_EVENT),
        sqlite_where=sa.text(PROCESSED_EVENT),
    )
    if op.get_bind().dialect.name == "postgresql":
        hour = "(floor(extract(epoch FROM occurred_at) / 3600) * 3600)::bigint"
        recent = "occurred_at >= now() - interval '2 days'"
    else:  # SQLite keeps UTC times as text
        hour = "(CAST(strftime('%s', occurred_at) AS INTEGER) / 3600) * 3600"
        recent = "occurred_at >= datetime('now', '-2 days')"
    op.execute(
        f"INSERT INTO refresh_counts (hour, outcome, slot, count) "
        f"SELECT {hour}, outcome, 0, count(*) FROM token_events "
        f"WHERE kind = 'refresh' AND outcome IS NOT NULL AND {recent} GROUP BY {hour}, outcome"
    )


def downgrade() -> None:
    op.drop_index("ix_strava_webhook_events_processed", table_name="strava_webhook_events")
    op.drop_index("ix_notifications_delivered", table_name="notifications")
    op.drop_index("ix_token_events_failures", table_name="token_events")
    op.drop_index("ix_user_tokens_needs_reauth", table_name="user_tokens")
    op.drop_table("refresh_counts")
