"""The base of the service's pure-ASGI middlewares (no BaseHTTPMiddleware task hop)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from starlette.types import ASGIApp, Receive, Scope, Send


class HttpMiddleware(ABC):
    """Handles the HTTP requests it `applies_to`; everything else (lifespan, other requests) goes straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def applies_to(self, scope: Scope) -> bool:
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.applies_to(scope):
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What the middleware does with a request it applies to (calling `self.app` to pass it on)."""
