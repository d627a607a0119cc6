"""JSON bodies holding a lone UTF-16 surrogate (`"\\ud800"`) are refused with 422 before any route sees them.

Python's `json` accepts such an escape and yields a string that cannot be encoded as UTF-8, so it failed later,
wherever the string met the database or a log line (an unauthenticated 500 on the webhook intake, issue 14). The
check costs nothing for the bodies without a `\\uD8..` to `\\uDF..` escape: only those are parsed here.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokensvc.api.limits import is_gateway
from tokensvc.schemas import PROBLEM_TYPE, ProblemCode

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
DETAIL = "the body holds a lone UTF-16 surrogate (such as \\ud800), which is no Unicode character"


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


class RefuseLoneSurrogates:
    """Pure ASGI, inside the body size limit (the body it buffers is at most 64 KiB)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or is_gateway(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        message: Message = {"type": "http.request", "more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        if has_lone_surrogate(body):
            await _refuse(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send) -> None:
    issue = {"loc": ["body"], "msg": DETAIL, "type": "string_unicode"}
    problem = {
        "type": PROBLEM_TYPE + ProblemCode.VALIDATION_ERROR,
        "title": "Validation error",
        "status": 422,
        "detail": DETAIL,
        "code": ProblemCode.VALIDATION_ERROR,
        "errors": [issue],
    }
    body = json.dumps(problem).encode()
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 422, "headers": headers})
    await send({"type": "http.response.body", "body": body})
