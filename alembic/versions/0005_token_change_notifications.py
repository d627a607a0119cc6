"""token_change_notifications: tell every replica's token cache when a user's token row changes.

Alembic prints the first paragraph of this docstring on every dialect, so it names none; what only Postgres gets is
logged from `upgrade()` on Postgres alone. There, every change of a user's token row NOTIFYs
`tokensvc_token_changes` with the user id, so each replica's in-process cache of valid tokens
(store/token_cache.py) drops that user. A trigger, not application code, so that every writer counts: refreshes,
imports, deauthorizations, rotate-keys, and an operator's SQL. Bookkeeping-only updates (sweep schedule, failure
counters) do not notify. SQLite serves one process, which has nobody to tell: nothing to do there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

import logging
from collections.abc import Sequence

from alembic import op

log = logging.getLogger("alembic.runtime.migration")  # where Alembic's own "Running upgrade" lines go

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHANGED = " OR ".join(
    f"OLD.{column} IS DISTINCT FROM NEW.{column}"
    for column in (
        "version",
        "access_token_enc",
        "refresh_token_enc",
        "key_id",
        "expires_at",
        "athlete_id",
        "scopes",
        "reauth_reason",
        "last_refreshed_at",
    )
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite serves one process: nothing to tell
    log.info("Postgres: a trigger NOTIFYs tokensvc_token_changes on every change of a user's token row")
    op.execute(
        """
        CREATE FUNCTION tokensvc_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('tokensvc_token_changes', OLD.user_id);
            ELSE
                PERFORM pg_notify('tokensvc_token_changes', NEW.user_id);
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER user_tokens_written AFTER INSERT OR DELETE ON user_tokens "
        "FOR EACH ROW EXECUTE FUNCTION tokensvc_token_changed()"
    )
    op.execute(
        f"CREATE TRIGGER user_tokens_changed AFTER UPDATE ON user_tokens "
        f"FOR EACH ROW WHEN ({_CHANGED}) EXECUTE FUNCTION tokensvc_token_changed()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS user_tokens_changed ON user_tokens")
    op.execute("DROP TRIGGER IF EXISTS user_tokens_written ON user_tokens")
    op.execute("DROP FUNCTION IF EXISTS tokensvc_token_changed()")
