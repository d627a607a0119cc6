"""What every emulated Strava request goes through: count, maybe hold, maybe fault, rate-count, then process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response

from .. import errors
from ..faults import Endpoint, FaultSpec
from ..state import SandboxState

Handler = Callable[[], Response]


def sandbox_state(request: Request) -> SandboxState:
    """The world of the sandbox app serving this request (mounted or standalone)."""
    state: SandboxState = request.app.state.sandbox
    return state


Sandbox = Annotated[SandboxState, Depends(sandbox_state)]


def fault_response(fault: FaultSpec) -> Response:
    """The answer a `status` or `malformed` fault gives instead of processing the request."""
    status = fault.status if fault.kind == "status" else 200
    if fault.body is not None:
        body = fault.body
    elif fault.kind == "malformed":
        body = '{"unexpected": true}'
    elif status == 429:
        body = json.dumps(errors.RATE_LIMIT_BODY)
    else:
        body = json.dumps({"message": HTTPStatus(status).phrase, "errors": []})
    try:
        json.loads(body)
        media_type = "application/json"
    except ValueError:
        media_type = "text/plain"
    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def strava_errors(handler: Handler) -> Response:
    try:
        return handler()
    except errors.StravaError as exc:
        return exc.response()


async def serve(state: SandboxState, endpoint: Endpoint, handler: Handler) -> Response:
    """Count, maybe hold, maybe fault, then process: the order every API request goes through."""
    state.count_call(endpoint)
    await state.gate.pass_through(endpoint)
    fault = state.faults.take(endpoint)
    if fault is not None and fault.kind in ("status", "malformed"):
        return fault_response(fault)
    if fault is not None and fault.kind == "latency":
        await asyncio.sleep(fault.latency_ms / 1000)
    response = strava_errors(handler)
    if fault is not None and fault.kind == "lost_answer":
        # The work is done (a refresh has rotated); the client should give up before it sees the answer.
        await asyncio.sleep(fault.hang_seconds)
    return response


async def serve_async(state: SandboxState, endpoint: Endpoint, handle: Callable[[], Awaitable[Response]]) -> Response:
    """`serve` for a handler that awaits (a subscription's challenge): count, maybe hold, maybe fault, process."""
    state.count_call(endpoint)
    await state.gate.pass_through(endpoint)
    fault = state.faults.take(endpoint)
    if fault is not None and fault.kind in ("status", "malformed"):
        return fault_response(fault)
    try:
        return await handle()
    except errors.StravaError as exc:
        return exc.response()


def rated(state: SandboxState, handler: Handler, *, read: bool) -> Handler:
    """Wrap a rate-counted handler: count it, refuse it over the limit (429), and always send the headers."""

    def run() -> Response:
        allowed, headers = state.rate.hit(state.clock(), read=read)
        response = strava_errors(handler) if allowed else errors.rate_limited().response()
        response.headers.update(headers)
        return response

    return run


async def request_params(request: Request) -> dict[str, str]:
    """Parameters from the query string and the body (form or JSON), as Strava accepts all of them."""
    params = dict(request.query_params)
    data = await request_body(request)
    params.update({str(k): _text(v) for k, v in data.items() if v is not None})
    return params


async def request_body(request: Request) -> dict[str, object]:
    """The body as a mapping: JSON (an object; anything else is empty) or a form."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = await request.json()
        except ValueError:
            data = None
        return {str(k): v for k, v in data.items()} if isinstance(data, dict) else {}
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def access_token(request: Request, params: dict[str, str] | None = None) -> str | None:
    """The Bearer token, else an `access_token` parameter (Strava's deauthorize takes either)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (params if params is not None else dict(request.query_params)).get("access_token")
