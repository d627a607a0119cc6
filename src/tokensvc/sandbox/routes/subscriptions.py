"""Strava's push subscription endpoints (`/api/v3/push_subscriptions`), over the sandbox's `Push`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..activities import iso
from ..push import subscription_error
from .pipeline import Sandbox, request_params, serve_async

router = APIRouter(prefix="/api/v3/push_subscriptions")


@router.post("", response_model=None)
async def create(request: Request, state: Sandbox) -> Response:
    """Subscribe (client_id, client_secret, callback_url, verify_token) once the callback answers the challenge."""
    params = await request_params(request)

    async def handle() -> Response:
        state.check_client(params.get("client_id"), params.get("client_secret"))
        callback_url, verify_token = params.get("callback_url"), params.get("verify_token")
        if not callback_url:
            raise subscription_error(400, "callback_url", "missing")
        if not verify_token:
            raise subscription_error(400, "verify_token", "missing")
        subscription = await state.push.subscribe(
            application_id=state.client_id, callback_url=callback_url, verify_token=verify_token, now=state.now()
        )
        return JSONResponse({"id": subscription.id}, status_code=201)

    return await serve_async(state, "subscriptions", handle)


@router.get("", response_model=None)
async def listing(request: Request, state: Sandbox) -> Response:
    """The application's subscription, as a list of zero or one."""
    query = request.query_params

    async def handle() -> Response:
        state.check_client(query.get("client_id"), query.get("client_secret"))
        subscription = state.push.subscription
        return JSONResponse([subscription.as_json(iso)] if subscription is not None else [])

    return await serve_async(state, "subscriptions", handle)


@router.delete("/{subscription_id}", response_model=None)
async def delete(subscription_id: int, request: Request, state: Sandbox) -> Response:
    """Delete the subscription (204), 404 for another id."""
    query = request.query_params

    async def handle() -> Response:
        state.check_client(query.get("client_id"), query.get("client_secret"))
        state.push.unsubscribe(subscription_id)
        return Response(status_code=204)

    return await serve_async(state, "subscriptions", handle)
