"""The Strava API gateway (Bearer): `GET | POST | PUT | DELETE /v1/users/{user_id}/strava/{path}`. Thin: parse,
spool the body within TOKENSVC_GATEWAY_MAX_BODY_BYTES, call the gateway service, stream Strava's answer back."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse

from tokensvc.api.deps import UserId, from_app_state, require_api_key
from tokensvc.api.problems import problem_responses
from tokensvc.errors import PayloadTooLarge
from tokensvc.service.gateway import Gateway, GatewayCall, GatewayPriority, Spool, forwarded_headers

router = APIRouter(
    prefix="/v1", tags=["gateway"], dependencies=[Depends(require_api_key)], responses=problem_responses(401)
)

GATEWAY_ROUTE = "/users/{user_id}/strava/{path:path}"
_METHODS = ("GET", "POST", "PUT", "DELETE")
_NO_BODY = (204, 304)
_STRAVAS: dict[str, Any] = {"application/json": {"schema": {}}, "*/*": {"schema": {}}}
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    **problem_responses(
        403,
        404,
        409,
        413,
        429,
        503,
        described={
            403: "Strava refused for a scope the user has not granted (`insufficient_scope`, with `missing_scope` "
            "and `authorize_url`)",
            404: "A path that climbs (`..`) or names `oauth`",
            413: "Request body over TOKENSVC_GATEWAY_MAX_BODY_BYTES (`payload_too_large`)",
            429: "The app's Strava window is spent for this priority, or Strava answered 429 "
            "(`strava_rate_limited`, with `Retry-After`); nothing was sent",
        },
    ),
}
# Strava may answer any status itself (a 404 for an unknown activity): each status also carries Strava's body.
_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {
        "description": "Strava's answer, passed through: its status, body and `Content-Type`, with "
        "`X-RateLimit-*`, `X-ReadRateLimit-*` and `ETag` when Strava sent them",
        "content": _STRAVAS,
    },
    **{status: {**r, "content": {**r["content"], **_STRAVAS}} for status, r in _PROBLEMS.items()},
}


get_gateway = from_app_state("gateway", Gateway)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
Priority = Annotated[
    GatewayPriority,
    Header(
        alias="Tokensvc-Priority",
        description="`interactive` may spend the whole Strava window, `sync` 80 % of it, `backfill` 50 %",
    ),
]


async def strava_gateway(
    user_id: UserId, path: str, request: Request, gateway: GatewayDep, priority: Priority = "sync"
) -> Response:
    """Call Strava's `/api/v3/{path}` for the user, with their access token (refreshed as needed)."""
    body = await _spool(request)
    call = GatewayCall(
        user_id=user_id,
        method=request.method,
        path=path,
        query=request.url.query,
        headers=forwarded_headers(request.headers.items()),
        priority=priority,
        body=body,
    )
    try:
        answer = await gateway.call(call)
    finally:
        if body is not None:
            body.close()  # a streamed answer no longer needs it: the retry, if any, is over
    if answer.status_code in _NO_BODY or request.method == "HEAD":
        await answer.aclose()
        return Response(status_code=answer.status_code, headers=answer.headers)
    return StreamingResponse(answer.chunks(), status_code=answer.status_code, headers=answer.headers)


async def _spool(request: Request) -> Spool | None:
    """The caller's body, bounded (a declared length over the bound is refused before any of it is read)."""
    limit: int = request.app.state.gateway_max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise PayloadTooLarge(f"gateway request bodies are limited to {limit} bytes")
    if request.method == "GET" or (declared in (None, "0") and "transfer-encoding" not in request.headers):
        return None
    return await Spool.take(request.stream(), max_bytes=limit)


for _method in _METHODS:
    router.add_api_route(
        GATEWAY_ROUTE,
        strava_gateway,
        methods=[_method],
        name=f"strava_gateway_{_method.lower()}",
        operation_id=f"strava_gateway_{_method.lower()}",
        summary=f"{_method} through the Strava API gateway",
        responses=_RESPONSES,
        response_class=Response,
    )
