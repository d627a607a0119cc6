"""oauth_state_uses: single-use OAuth state nonces.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tokensvc.models import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "oauth_state_uses",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_oauth_state_uses")),
    )
    op.create_index(op.f("ix_oauth_state_uses_expires_at"), "oauth_state_uses", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_oauth_state_uses_expires_at"), table_name="oauth_state_uses")
    op.drop_table("oauth_state_uses")
