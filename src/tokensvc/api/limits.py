"""Request body limit (64 KiB), enforced as pure ASGI so a large or endless body is never buffered."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokensvc.api.problems import service_problem
from tokensvc.errors import PayloadTooLarge

MAX_BODY_BYTES = 64 * 1024
# The Strava gateway streams its bodies within its own, larger bound (api/gateway.py enforces it).
GATEWAY_PATH = re.compile(r"^/v1/users/[^/]+/strava/")


def is_gateway(scope: Scope) -> bool:
    return bool(GATEWAY_PATH.match(scope.get("path", "")))


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_gateway(scope):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send)
            return
        # Read the (small) body here, so an oversized stream is refused before the app sees any of it.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = service_problem(PayloadTooLarge(f"request bodies are limited to {self.max_bytes} bytes"))
        await problem(scope, receive, send)
