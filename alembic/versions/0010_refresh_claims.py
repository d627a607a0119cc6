"""Refresh claims: a replica claims a user's refresh in a short committed transaction and calls Strava holding
no connection, instead of holding the token row's lock through the call.

Upgrade: the fleet stops for this migration (docs/operations.md, "Upgrading to refresh claims"). Code from before
it guards a refresh with the row lock alone and does not see claims, so an old and a new replica running together
could both refresh one user. Old code that starts after it refuses to run (its `migrate` knows no revision 0010).

Revision ID: 0010
Revises: 0012
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "refresh_claims",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("version_read", sa.Integer(), nullable=False),
        sa.Column("until", sa.BigInteger(), nullable=False),
        sa.Column("write_until", sa.BigInteger(), nullable=False),
        sa.Column("pending_until", sa.BigInteger(), nullable=False),
        sa.Column("rejected_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_refresh_claims")),
    )


def downgrade() -> None:
    op.drop_table("refresh_claims")
