"""user_tokens: one row per user, tokens encrypted, a partial index for "who is due".

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tokensvc.models import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_tokens",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("access_token_enc", sa.String(), nullable=True),
        sa.Column("refresh_token_enc", sa.String(), nullable=True),
        sa.Column("key_id", sa.String(length=16), nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("athlete_id", sa.BigInteger(), nullable=True),
        sa.Column("scopes", sa.String(length=512), nullable=False),
        sa.Column("reauth_reason", sa.String(length=32), nullable=True),
        sa.Column("last_refreshed_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_tokens")),
    )
    op.create_index(op.f("ix_user_tokens_athlete_id"), "user_tokens", ["athlete_id"])
    op.create_index(op.f("ix_user_tokens_key_id"), "user_tokens", ["key_id"])
    op.create_index(
        "ix_user_tokens_due",
        "user_tokens",
        ["expires_at"],
        postgresql_where=sa.text("reauth_reason IS NULL"),
        sqlite_where=sa.text("reauth_reason IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_user_tokens_due", table_name="user_tokens")
    op.drop_index(op.f("ix_user_tokens_key_id"), table_name="user_tokens")
    op.drop_index(op.f("ix_user_tokens_athlete_id"), table_name="user_tokens")
    op.drop_table("user_tokens")
