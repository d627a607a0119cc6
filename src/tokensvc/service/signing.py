"""Signed, timestamped tokens (itsdangerous) on the injected clock: OAuth state and browser sessions."""

from __future__ import annotations

from typing import Any

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from tokensvc.clock import Clock


class SignedTokens:
    """Sign a small JSON payload for one purpose (the salt), and read it back within `max_age` seconds."""

    def __init__(self, secret: str, *, purpose: str, max_age: int, clock: Clock) -> None:
        class _ClockSigner(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(clock())

        self._serializer = URLSafeTimedSerializer(secret, salt=f"tokensvc.{purpose}", signer=_ClockSigner)
        self._clock = clock
        self.max_age = max_age

    def dumps(self, payload: dict[str, Any]) -> tuple[str, int]:
        """The token and the epoch second it expires at."""
        return str(self._serializer.dumps(payload)), int(self._clock()) + self.max_age

    def loads(self, token: str) -> dict[str, Any] | None:
        """The payload, or None when the token is forged, tampered with, expired or not a dict."""
        try:
            payload, signed_at = self._serializer.loads(token, max_age=self.max_age, return_timestamp=True)
        except (BadSignature, SignatureExpired, ValueError):
            return None
        if not isinstance(payload, dict):
            return None
        payload["_expires_at"] = int(signed_at.timestamp()) + self.max_age
        return payload
