"""A request id on every log line of a request, echoed in `X-Request-ID`, and one `request.completed` line each.

Every answer echoes the id, probes included (they are only not logged); the access-token fast path, which runs
outside this middleware, echoes it the same way (`api/fastpath.py`).

Pure ASGI (no BaseHTTPMiddleware task hop): the id is bound with `structlog.contextvars` for exactly the request's
duration, in the task that serves it, and unbound afterwards. Tasks that outlive the request (background refreshes)
carry it as `parent_request_id` instead (`logging.detached_context`).
"""

from __future__ import annotations

import re
import secrets
import time

import structlog
from starlette.types import Message, Receive, Scope, Send

from tokensvc.api.asgi import HttpMiddleware

log = structlog.get_logger(__name__)

HEADER = b"x-request-id"
# What we accept from a caller: short and plain, so it can never forge JSON, a new log line, or a header.
_VALID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
# Probes (load balancers, Prometheus) call these every few seconds: a line each would drown the log.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestId(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = request_id_of(scope)
        raw_id = request_id.encode("ascii")
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (HEADER, raw_id)]
            await send(message)

        if scope["path"] in PROBES:  # echoed, but neither bound nor logged
            await self.app(scope, receive, send_with_id)
            return
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log.info(
                    "request.completed",
                    method=scope["method"],
                    path=_route_path(scope),
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                )


def request_id_of(scope: Scope) -> str:
    """The caller's `X-Request-ID` when it is one we accept, else a new one."""
    for name, value in scope["headers"]:
        if name == HEADER:
            return valid_or_new(value)
    return new_id()


def new_id() -> str:
    """32 random hex characters (a quarter of uuid4's cost, which the access-token fast path pays per call)."""
    return secrets.token_hex(16)


def valid_or_new(value: bytes | None) -> str:
    """`value` (a caller's X-Request-ID) if it is 1..64 of [A-Za-z0-9._-], else a new id."""
    return value.decode("ascii") if value is not None and _VALID.fullmatch(value) else new_id()


def _route_path(scope: Scope) -> str:
    """The route's template (`/v1/users/{user_id}/events`) when one matched, so lines group by endpoint and carry
    no query string; else the bare path."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str) and template and not hasattr(route, "routes"):  # a Mount's path is only a prefix
        return str(scope.get("root_path", "")) + template
    path: str = scope["path"]
    return path
