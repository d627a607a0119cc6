"""connect_confirmations: callbacks waiting for the app's `connect/complete` (one-time connect ids, hashed).

Revision ID: 0011
Revises: 0008
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "connect_confirmations",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=512), nullable=False),
        sa.Column("code_sealed", sa.String(length=2048), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_connect_confirmations")),
    )
    op.create_index(op.f("ix_connect_confirmations_expires_at"), "connect_confirmations", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_connect_confirmations_expires_at"), table_name="connect_confirmations")
    op.drop_table("connect_confirmations")
