"""Strava's OAuth endpoints: the consent page, the token endpoint, deauthorize and revoke."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from .. import errors
from ..consent import check_redirect_uri, parse_scopes, render_consent, with_query
from ..faults import Endpoint
from .pipeline import Sandbox, access_token, rated, request_params, serve

router = APIRouter()

_GRANTS: dict[str, Endpoint] = {"authorization_code": "exchange", "refresh_token": "refresh"}
_TOKEN_TYPE_HINTS = ("refresh_token", "access_token")


@router.get("/oauth/authorize", response_model=None)
async def authorize_page(request: Request, state: Sandbox) -> Response:
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
        app_name="Sandbox app",
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
async def authorize_decision(request: Request, state: Sandbox) -> Response:
    """The athlete's answer: 303 back to the client with a code and the granted scopes, or `error=access_denied`."""
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
        raw_id = fields.get("athlete_id", "").strip()
        if raw_id and not (raw_id.isdigit() and int(raw_id) > 0):
            raise errors.bad_request("Athlete", "athlete_id")
        athlete_id = int(raw_id) if raw_id else state.new_athlete_id()
    except errors.StravaError as exc:
        return exc.response()
    granted = ",".join(state.granted(offered, checked))
    code = state.issue_code(athlete_id, granted)
    target = with_query(redirect_uri, [*oauth_state, ("code", code), ("scope", granted)])
    return RedirectResponse(target, status_code=303)


async def token(request: Request, state: Sandbox) -> Response:
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

    return await serve(state, endpoint, handle)


async def deauthorize(request: Request, state: Sandbox) -> Response:
    """Revoke the athlete's whole grant; rate-counted like any API call."""
    token_value = access_token(request, await request_params(request))
    handler = rated(state, lambda: JSONResponse(state.deauthorize(token_value)), read=False)
    return await serve(state, "deauthorize", handler)


@router.post("/oauth/revoke", response_model=None)
async def revoke(request: Request, state: Sandbox) -> Response:
    """RFC 7009 revocation (HTTP Basic client credentials, form `token`, `token_type_hint`): a live token revokes
    its athlete's grant; 200 `{}` whether or not there was anything left to revoke; rate-counted."""
    params = await request_params(request)

    def handle() -> Response:
        client_id, client_secret = _client_credentials(request, params)
        state.check_client(client_id, client_secret)
        hint = params.get("token_type_hint")
        if hint is not None and hint not in _TOKEN_TYPE_HINTS:
            raise errors.bad_request("Token", "token_type_hint")
        value = params.get("token")
        if not value:
            raise errors.bad_request("Token", "token", "missing")
        state.revoke_token(value)
        return JSONResponse({})

    return await serve(state, "revoke", rated(state, handle, read=False))


def _client_credentials(request: Request, params: dict[str, str]) -> tuple[str | None, str | None]:
    """HTTP Basic `client_id:client_secret` (what Strava documents), else the form's `client_id`/`client_secret`."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            client_id, sep, client_secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        return (client_id, client_secret) if sep else (None, None)
    return params.get("client_id"), params.get("client_secret")


# Strava serves both under the API prefix too; stravalib's deauthorize() posts to /api/v3/oauth/deauthorize.
for prefix in ("", "/api/v3"):
    router.add_api_route(f"{prefix}/oauth/token", token, methods=["POST"], response_model=None)
    router.add_api_route(f"{prefix}/oauth/deauthorize", deauthorize, methods=["POST"], response_model=None)
