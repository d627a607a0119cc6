"""A bound on the requests one process works on at once: above it, 503 `overloaded` with `Retry-After`.

Pure ASGI and outermost, so a refused request costs a counter and one small answer. The probes (/healthz,
/readyz) are never refused: a process that is busy is alive, and its orchestrator must not restart it for that.
"""

from __future__ import annotations

import json

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from tokensvc.api.asgi import HttpMiddleware
from tokensvc.schemas import PROBLEM_TYPE, ProblemCode

log = structlog.get_logger(__name__)

EXEMPT_PATHS = frozenset({"/healthz", "/readyz"})
RETRY_AFTER_SECONDS = 1


class InFlightLimit(HttpMiddleware):
    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        super().__init__(app)
        self.limit = limit
        self.in_flight = 0
        self._answer = json.dumps(
            {
                "type": PROBLEM_TYPE + ProblemCode.OVERLOADED,
                "title": "Overloaded",
                "status": 503,
                "detail": f"this process is working on its limit of {limit} requests; retry shortly",
                "code": ProblemCode.OVERLOADED,
            }
        ).encode()

    def applies_to(self, scope: Scope) -> bool:
        return scope["path"] not in EXEMPT_PATHS

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.in_flight >= self.limit:
            await self._refuse(send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _refuse(self, send: Send) -> None:
        log.warning("request.refused.overloaded", limit=self.limit)
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(self._answer)).encode()),
                    (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                    (b"x-content-type-options", b"nosniff"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._answer})
