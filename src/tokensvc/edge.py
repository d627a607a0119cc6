"""Limits at the edge: uvicorn's h11 protocol with a cap on the request head and deadlines for reading it.

uvicorn's default parser (httptools) reads a request head of any size and neither it nor uvicorn bounds the time
a client may take to send a head or a body. `EdgeProtocol` is uvicorn's h11 protocol with three additions:

- the request line and headers are capped at `max_header_bytes` (h11's own bound on an incomplete event): above
  it the answer is 431 problem+json and the connection is closed, having buffered at most the cap plus one read;
- the head must arrive within `header_timeout_seconds` of the connection opening, or of its first byte on a
  kept-alive connection (an idle kept-alive connection is uvicorn's keep-alive timeout's business): else 408;
- the body must arrive within `body_timeout_seconds` of the head: else 408 (when no answer has begun) and close.

The answers are written straight to the socket, which is closed right after: the client gave up its right to a
conversation. Keep-alive, the requests-in-flight limit (api/inflight.py) and forwarded-for trust stay uvicorn's
and the app's (cli.py sets them). docs/security.md says what a reverse proxy in front must still add.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tokensvc.schemas import PROBLEM_TYPE, ProblemCode


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_header_bytes: int = 16 * 1024
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 20.0


def problem_bytes(status: int, reason: str, code: str, detail: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 problem+json response that closes the connection, for answers given outside the app."""
    body = json.dumps(
        {"type": PROBLEM_TYPE + code, "title": reason, "status": status, "detail": detail, "code": code}
    ).encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/problem+json",
        f"content-length: {len(body)}",
        "x-content-type-options: nosniff",
        "connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class _Connection(h11.Connection):
    """h11's connection, remembering the status its last protocol error suggests (431: a head too large)."""

    error_status = 400

    def next_event(self) -> Any:  # h11's own return type is a union of its event classes and sentinels
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error_status = exc.error_status_hint
            raise


class EdgeProtocol(H11Protocol):
    """uvicorn's h11 protocol with the head cap and the head and body deadlines of `limits` (see the module)."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading: object = None  # h11's state of the client when the deadline was armed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn narrows it to Transport
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Arm the deadline for what the client is sending now: a head, a body, or nothing (disarmed)."""
        state: object = self.conn.their_state
        if state is h11.IDLE and self.cycle is not None and self.cycle.response_complete:
            state = None  # kept alive and quiet: the keep-alive timeout applies until a byte arrives
            if self.conn.trailing_data[0]:
                state = h11.IDLE
        if state is self._reading and self._deadline is not None:
            return
        self._disarm()
        if state is h11.IDLE:
            self._arm(h11.IDLE, self.limits.header_timeout_seconds, "request headers")
        elif state is h11.SEND_BODY:
            self._arm(h11.SEND_BODY, self.limits.body_timeout_seconds, "the request body")

    def _arm(self, state: object, seconds: float, what: str) -> None:
        self._reading = state
        self._deadline = self.loop.call_later(seconds, self._expired, seconds, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._reading = None

    def _expired(self, seconds: float, what: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            detail = f"{what} did not arrive within {seconds:g} seconds"
            self.transport.write(problem_bytes(408, "Request Timeout", ProblemCode.REQUEST_TIMEOUT, detail))
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app, if it still waits for the body, is told the client left
            self.cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A head h11 cannot parse: 431 when it was too large, otherwise 400, as problem+json."""
        if isinstance(self.conn, _Connection) and self.conn.error_status == 431:
            detail = f"the request line and headers are limited to {self.limits.max_header_bytes} bytes"
            answer = problem_bytes(431, "Request Header Fields Too Large", ProblemCode.HEADERS_TOO_LARGE, detail)
        else:
            answer = problem_bytes(400, "Bad Request", ProblemCode.HTTP_ERROR, "the request is not valid HTTP/1.1")
        self._disarm()
        self.transport.write(answer)
        self.transport.close()


def edge_protocol(limits: EdgeLimits) -> type[EdgeProtocol]:
    """An `EdgeProtocol` class bound to `limits`, for `uvicorn.Config(http=...)` (which instantiates it)."""
    return type("EdgeProtocol", (EdgeProtocol,), {"limits": limits})
