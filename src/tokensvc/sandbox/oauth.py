"""Strava's OAuth and athlete endpoints, wrapped in the hold gate and the fault queue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from http import HTTPStatus

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from . import errors
from .consent import check_redirect_uri, parse_scopes, render_consent, with_query
from .faults import Endpoint, FaultSpec
from .state import SandboxState

Handler = Callable[[], Response]

_GRANTS: dict[str, Endpoint] = {"authorization_code": "exchange", "refresh_token": "refresh"}


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


def _strava_errors(handler: Handler) -> Response:
    try:
        return handler()
    except errors.StravaError as exc:
        return exc.response()


async def _serve(state: SandboxState, endpoint: Endpoint, handler: Handler) -> Response:
    """Count, maybe hold, maybe fault, then process: the order every API request goes through."""
    state.count_call(endpoint)
    await state.gate.pass_through(endpoint)
    fault = state.faults.take(endpoint)
    if fault is not None and fault.kind in ("status", "malformed"):
        return fault_response(fault)
    if fault is not None and fault.kind == "latency":
        await asyncio.sleep(fault.latency_ms / 1000)
    response = _strava_errors(handler)
    if fault is not None and fault.kind == "lost_answer":
        # The work is done (a refresh has rotated); the client should give up before it sees the answer.
        await asyncio.sleep(fault.hang_seconds)
    return response


def _rated(state: SandboxState, handler: Handler, *, read: bool) -> Handler:
    """Wrap a rate-counted handler: count it, refuse it over the limit, and always send the headers."""

    def run() -> Response:
        allowed, headers = state.rate.hit(state.clock(), read=read)
        response = _strava_errors(handler) if allowed else errors.rate_limited().response()
        response.headers.update(headers)
        return response

    return run


async def request_params(request: Request) -> dict[str, str]:
    """Parameters from the query string and the body (form or JSON), as Strava accepts all of them."""
    params = dict(request.query_params)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = await request.json()
        except ValueError:
            data = None
        if isinstance(data, dict):
            params.update({str(k): str(v) for k, v in data.items() if v is not None})
    else:
        form = await request.form()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


def _access_token(request: Request, params: dict[str, str]) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return params.get("access_token")


def strava_router(state: SandboxState) -> APIRouter:
    router = APIRouter()

    @router.get("/oauth/authorize", response_model=None)
    async def authorize_page(request: Request) -> Response:
        """The consent page; its form posts back to this same path, wherever the app is mounted."""
        state.count_call("authorize")
        query = request.query_params
        try:
            state.check_client_id(query.get("client_id"))
            redirect_uri = check_redirect_uri(query.get("redirect_uri"))
            if query.get("response_type") != "code":
                raise errors.bad_request("Application", "response_type")
            scopes = parse_scopes(query.get("scope"))
        except errors.StravaError as exc:
            return exc.response()
        approval_prompt = query.get("approval_prompt", "auto")
        page = render_consent(
            app_name=state.client_id,
            action=request.url.path,
            client_id=state.client_id,
            redirect_uri=redirect_uri,
            approval_prompt=approval_prompt if approval_prompt in ("auto", "force") else "auto",
            state=query.get("state"),
            scopes=scopes,
            athlete_id=state.new_athlete_id(),
        )
        return HTMLResponse(page)

    @router.post("/oauth/authorize", response_model=None)
    async def authorize_decision(request: Request) -> Response:
        """The athlete's answer: 303 back to the client with a code, or with `error=access_denied`."""
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            state.check_client_id(fields.get("client_id"))
            redirect_uri = check_redirect_uri(fields.get("redirect_uri"))
            decision = fields.get("decision")
            if decision not in ("approve", "deny"):
                raise errors.bad_request("Authorize", "decision")
            oauth_state = [("state", fields["state"])] if "state" in fields else []
            if decision == "deny":
                target = with_query(redirect_uri, [("error", "access_denied"), *oauth_state])
                return RedirectResponse(target, status_code=303)
            checked = {s.strip() for v in form.getlist("scope") if isinstance(v, str) for s in v.split(",")}
            offered = parse_scopes(fields.get("requested_scope") or ",".join(sorted(checked)) or None)
            granted = [scope for scope in offered if scope in checked]
            raw_id = fields.get("athlete_id", "").strip()
            if raw_id and not (raw_id.isdigit() and int(raw_id) > 0):
                raise errors.bad_request("Athlete", "athlete_id")
            athlete_id = int(raw_id) if raw_id else state.new_athlete_id()
        except errors.StravaError as exc:
            return exc.response()
        code = state.issue_code(athlete_id, ",".join(granted))
        target = with_query(redirect_uri, [*oauth_state, ("code", code), ("scope", ",".join(granted))])
        return RedirectResponse(target, status_code=303)

    async def token(request: Request) -> Response:
        """Code exchange and refresh; no rate-limit headers, as Strava reportedly does not count these."""
        params = await request_params(request)
        endpoint = _GRANTS.get(params.get("grant_type") or "", "token")

        def handle() -> Response:
            state.check_client(params.get("client_id"), params.get("client_secret"))
            if endpoint == "exchange":
                return JSONResponse(dict(state.exchange(params.get("code"))))
            if endpoint == "refresh":
                return JSONResponse(dict(state.refresh(params.get("refresh_token"))))
            raise errors.bad_request("Application", "grant_type")

        return await _serve(state, endpoint, handle)

    router.add_api_route("/oauth/token", token, methods=["POST"], response_model=None)
    router.add_api_route("/api/v3/oauth/token", token, methods=["POST"], response_model=None)

    @router.post("/oauth/deauthorize", response_model=None)
    async def deauthorize(request: Request) -> Response:
        """Revoke the athlete's whole grant; rate-counted like any API call."""
        access_token = _access_token(request, await request_params(request))
        handler = _rated(state, lambda: JSONResponse(state.deauthorize(access_token)), read=False)
        return await _serve(state, "deauthorize", handler)

    @router.get("/api/v3/athlete", response_model=None)
    async def athlete(request: Request) -> Response:
        access_token = _access_token(request, dict(request.query_params))
        handler = _rated(state, lambda: JSONResponse(state.athlete_profile(access_token)), read=True)
        return await _serve(state, "athlete", handler)

    return router
