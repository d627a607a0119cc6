"""Browser sessions: a signed, expiring token bound to one user, carried in the `tokensvc_session` cookie."""

from __future__ import annotations

from dataclasses import dataclass

from tokensvc.clock import Clock
from tokensvc.schemas import USER_ID_RE
from tokensvc.service.signing import SignedTokens

COOKIE_NAME = "tokensvc_session"


@dataclass(frozen=True, slots=True)
class Session:
    user_id: str
    expires_at: int
    issued_ms: int = 0  # when it was minted (epoch ms): sessions issued before a revocation are void


class Sessions:
    """Mints and verifies sessions. The user id comes only from a verified session, never from the browser."""

    def __init__(self, secret: str, *, ttl_seconds: int, clock: Clock) -> None:
        self._tokens = SignedTokens(secret, purpose="session", max_age=ttl_seconds, clock=clock)
        self._clock = clock
        self.ttl_seconds = ttl_seconds

    def mint(self, user_id: str) -> tuple[str, Session]:
        issued_ms = int(self._clock() * 1000)
        token, expires_at = self._tokens.dumps({"u": user_id, "i": issued_ms})
        return token, Session(user_id, expires_at, issued_ms)

    def verify(self, token: str | None) -> Session | None:
        """The session a token proves, or None (missing, forged, expired, or not a session)."""
        if not token:
            return None
        payload = self._tokens.loads(token)
        user_id = payload.get("u") if payload else None
        if payload is None or not isinstance(user_id, str) or not USER_ID_RE.fullmatch(user_id):
            return None
        issued_ms = payload.get("i")
        return Session(user_id, payload["_expires_at"], issued_ms if isinstance(issued_ms, int) else 0)
