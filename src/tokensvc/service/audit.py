"""Reading the audit trail: a user's history, newest first, in pages. Reads only (autocommit, no transaction)."""

from __future__ import annotations

import base64
import binascii

from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.db import Autocommit
from tokensvc.errors import ValidationFailed
from tokensvc.schemas import MAX_BIGINT, EventPage, TokenEventOut
from tokensvc.store import journal as store

_CURSOR_PREFIX = "ev1:"


class Audit:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = Autocommit(engine)

    async def events(self, user_id: str, *, limit: int, cursor: str | None) -> EventPage:
        """A page of the user's events, newest first (a user with none gets an empty page).

        Raises ValidationFailed for a cursor this service did not issue."""
        before_id = decode_cursor(cursor) if cursor else None
        async with self._engine.connect() as conn:
            rows = await store.list_for_user(conn, user_id, limit=limit, before_id=before_id)
        items = [TokenEventOut.model_validate(row, from_attributes=True) for row in rows]
        return EventPage(items=items, next_cursor=encode_cursor(rows[-1].id) if len(rows) == limit else None)


def encode_cursor(event_id: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{event_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        event_id = int(raw.removeprefix(_CURSOR_PREFIX)) if raw.startswith(_CURSOR_PREFIX) else 0
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValidationFailed("`cursor` is not a cursor this service issued") from exc
    if not 1 <= event_id <= MAX_BIGINT:  # past BIGINT the database itself would fail (a 500, not a 422)
        raise ValidationFailed("`cursor` is not a cursor this service issued")
    return event_id
