"""revocation_tombstones: a deleted user's grant waits here, still encrypted, until Strava confirms its revoke
(`POST /oauth/revoke`, or `/oauth/deauthorize`), so a Strava outage never leaves a grant alive after the row is gone.

Revision ID: 0014
Revises: 0009
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "revocation_tombstones",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("athlete_id", sa.BigInteger(), nullable=True),
        sa.Column("refresh_token_enc", sa.String(), nullable=False),
        sa.Column("access_token_enc", sa.String(), nullable=True),
        sa.Column("access_expires_at", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=True),
        sa.Column("due_at", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revocation_tombstones")),
    )
    op.create_index(op.f("ix_revocation_tombstones_due_at"), "revocation_tombstones", ["due_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_revocation_tombstones_due_at"), table_name="revocation_tombstones")
    op.drop_table("revocation_tombstones")
