"""Request bodies, checked once as pure ASGI before any route sees them: at most 64 KiB (a large or endless body is
never buffered), and no lone UTF-16 surrogate in JSON.

Python's `json` accepts an escape such as `"\\ud800"` and yields a string that cannot be encoded as UTF-8, so it failed
later, wherever the string met the database or a log line (an unauthenticated 500 on the webhook intake, issue 14).
The check costs nothing for bodies without a `\\uD8..` to `\\uDF..` escape: only those are parsed here.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokensvc.api.asgi import HttpMiddleware
from tokensvc.api.problems import service_problem
from tokensvc.errors import PayloadTooLarge, ValidationFailed

MAX_BODY_BYTES = 64 * 1024
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
SURROGATE_DETAIL = "the body holds a lone UTF-16 surrogate (such as \\ud800), which is no Unicode character"
# The Strava gateway streams its bodies within its own, larger bound (api/gateway.py enforces it).
GATEWAY_PATH = re.compile(r"^/v1/users/[^/]+/strava/")


def is_gateway(scope: Scope) -> bool:
    return bool(GATEWAY_PATH.match(scope.get("path", "")))


def has_lone_surrogate(body: bytes) -> bool:
    """True when `body` is JSON whose strings (or keys) hold a surrogate not paired as UTF-16 demands."""
    if _SURROGATE_ESCAPE.search(body) is None:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:  # not JSON at all: the route's own parsing says so (422) or the type is refused (415)
        return False
    try:
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class BodySizeLimit(HttpMiddleware):
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    def applies_to(self, scope: Scope) -> bool:
        return not is_gateway(scope)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        if has_lone_surrogate(body):
            issue = {"loc": ["body"], "msg": SURROGATE_DETAIL, "type": "string_unicode"}
            await service_problem(ValidationFailed(SURROGATE_DETAIL, errors=[issue]))(scope, receive, send)
            return
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
