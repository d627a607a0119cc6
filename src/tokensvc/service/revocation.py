"""Revocable sessions. Sessions are signed and stateless; what ends them early is a watermark per subject in the
database (`session_revocations`): a session minted before it is void, on every replica at once.

Sign-out of the dashboard ends every admin session (there is one admin); `DELETE /v1/users/{id}/tokens` ends every
browser session of that user (`TokenService.delete`, in its own transaction).
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.clock import Clock
from tokensvc.store import session_revocations as store

ADMIN = "admin"


def user_subject(user_id: str) -> str:
    return f"user:{user_id}"


class SessionRevocations:
    def __init__(self, engine: AsyncEngine, *, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock

    async def revoke(self, subject: str) -> None:
        """End every session of `subject` minted until now. One short transaction."""
        async with self._engine.begin() as conn:
            await store.revoke(conn, subject, now_ms=int(self._clock() * 1000))

    async def is_revoked(self, subject: str, *, issued_ms: int) -> bool:
        """Whether a session of `subject` minted at `issued_ms` was ended since. One primary-key read."""
        async with self._engine.connect() as conn:
            return issued_ms < await store.not_before_ms(conn, subject)
