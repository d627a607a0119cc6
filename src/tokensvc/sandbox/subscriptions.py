"""Strava's push subscription endpoints (`/api/v3/push_subscriptions`), over the sandbox's `Push`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from . import errors
from .oauth import fault_response, request_params
from .push import subscription_error
from .state import SandboxState, iso


def push_router(state: SandboxState) -> APIRouter:
    """`/api/v3/push_subscriptions`: create (form), list and delete, with the app's client id and secret."""
    router = APIRouter()

    @router.post("/api/v3/push_subscriptions", response_model=None)
    async def create(request: Request) -> Response:
        params = await request_params(request)

        async def handle() -> Response:
            try:
                state.check_client(params.get("client_id"), params.get("client_secret"))
                callback_url, verify_token = params.get("callback_url"), params.get("verify_token")
                if not callback_url:
                    raise subscription_error(400, "callback_url", "missing")
                if not verify_token:
                    raise subscription_error(400, "verify_token", "missing")
                subscription = await state.push.subscribe(
                    application_id=state.client_id,
                    callback_url=callback_url,
                    verify_token=verify_token,
                    now=state.now(),
                )
            except errors.StravaError as exc:
                return exc.response()
            return JSONResponse({"id": subscription.id}, status_code=201)

        return await _serve_async(state, handle)

    @router.get("/api/v3/push_subscriptions", response_model=None)
    async def listing(request: Request) -> Response:
        query = request.query_params

        async def handle() -> Response:
            try:
                state.check_client(query.get("client_id"), query.get("client_secret"))
            except errors.StravaError as exc:
                return exc.response()
            subscription = state.push.subscription
            return JSONResponse([subscription.as_json(iso)] if subscription is not None else [])

        return await _serve_async(state, handle)

    @router.delete("/api/v3/push_subscriptions/{subscription_id}", response_model=None)
    async def delete(subscription_id: int, request: Request) -> Response:
        query = request.query_params

        async def handle() -> Response:
            try:
                state.check_client(query.get("client_id"), query.get("client_secret"))
                state.push.unsubscribe(subscription_id)
            except errors.StravaError as exc:
                return exc.response()
            return Response(status_code=204)

        return await _serve_async(state, handle)

    return router


async def _serve_async(state: SandboxState, handle: Callable[[], Awaitable[Response]]) -> Response:
    """Count, maybe hold, maybe fault, then process (the order of `oauth._serve`, for an async handler)."""
    state.count_call("subscriptions")
    await state.gate.pass_through("subscriptions")
    fault = state.faults.take("subscriptions")
    if fault is not None and fault.kind in ("status", "malformed"):
        return fault_response(fault)
    return await handle()
