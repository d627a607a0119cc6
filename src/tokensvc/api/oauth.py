"""Connect with Strava: the service API's connect and session calls, and the browser's OAuth redirects."""

from __future__ import annotations

import html
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from tokensvc.api.deps import LinksDep, OAuthServiceDep, RequiredSession, SessionsDep, UserId, require_api_key
from tokensvc.api.problems import problem_responses
from tokensvc.errors import AthleteCapacity
from tokensvc.schemas import (
    ConnectCompleteRequest,
    ConnectCompleteResponse,
    ConnectRequest,
    ConnectResponse,
    SessionResponse,
)
from tokensvc.service.oauth import BROWSER_COOKIE, STATE_TTL_SECONDS, CallbackBrowser, ConnectLinks, with_query
from tokensvc.service.sessions import COOKIE_NAME, Sessions

service_router = APIRouter(
    prefix="/v1", tags=["connect"], dependencies=[Depends(require_api_key)], responses=problem_responses(401)
)
browser_router = APIRouter(tags=["browser"])

_NO_STORE = {"Cache-Control": "no-store"}
_CALLBACK_PROBLEMS = problem_responses(
    400,
    409,
    503,
    described={
        409: "A browser signed in as another user (`connect_mismatch`) or an athlete another user holds "
        "(`athlete_in_use`); or, as an HTML page, Strava refused the connect for the app's athlete capacity "
        "(nothing stored)"
    },
)
_CALLBACK_PROBLEMS[409]["content"]["text/html"] = {"schema": {"type": "string"}}
_BROWSER_COOKIE_PATH = "/v1/oauth/strava"


@service_router.post("/users/{user_id}/connect", response_model=ConnectResponse)
async def create_connect_link(user_id: UserId, links: LinksDep, body: ConnectRequest | None = None) -> ConnectResponse:
    """The URL to send this user to, with a signed, single-use state that lives ten minutes. With `redirect_to`,
    Strava's consent page, and the app confirms the result (`connect/complete`); without, a link to this service
    that binds the flow to the browser opening it, then goes on to Strava."""
    body = body or ConnectRequest()
    url, expires_at = links.authorize_url(
        user_id, redirect_to=body.redirect_to, scopes=body.scopes, approval_prompt=body.approval_prompt
    )
    return ConnectResponse(authorize_url=url, state_expires_at=expires_at)


@service_router.post("/users/{user_id}/session", response_model=SessionResponse)
async def create_session(user_id: UserId, sessions: SessionsDep) -> Response:
    """A browser session for this user, for apps whose own login comes first."""
    token, session = sessions.mint(user_id)
    body = SessionResponse(session_token=token, expires_at=session.expires_at, cookie_name=COOKIE_NAME)
    return Response(body.model_dump_json(), media_type="application/json", headers=_NO_STORE)


@service_router.post(
    "/users/{user_id}/connect/complete",
    response_model=ConnectCompleteResponse,
    responses=problem_responses(
        400,
        409,
        503,
        described={
            409: "`connect_mismatch` (another user's flow), `athlete_in_use` (another user holds the athlete) or "
            "`athlete_capacity` (Strava refused: the app is at its limit of connected athletes; nothing stored)"
        },
    ),
)
async def complete_connect(
    user_id: UserId, body: ConnectCompleteRequest, oauth: OAuthServiceDep, sessions: SessionsDep
) -> Response:
    """The app's backend confirms a connect (the `connect_id` of the redirect) for the user signed in there: the
    code is exchanged and the tokens stored only now. Another user's `connect_id` is 409 `connect_mismatch`; an
    unknown, used or expired one is 400 `invalid_state`; an athlete another user holds is 409 `athlete_in_use`
    unless `replace`; a connect Strava refuses because the app is at its athlete capacity is 409
    `athlete_capacity` (nothing stored: the app shows its own `strava=capacity` note)."""
    status = await oauth.complete(user_id, body.connect_id, replace=body.replace)
    token, session = sessions.mint(user_id)
    result = ConnectCompleteResponse(token_status=status, session_token=token, session_expires_at=session.expires_at)
    return Response(result.model_dump_json(), media_type="application/json", headers=_NO_STORE)


@browser_router.get(
    "/v1/oauth/strava/start", status_code=303, response_class=RedirectResponse, responses=problem_responses(400)
)
async def oauth_start(
    request: Request, links: LinksDep, ticket: Annotated[str | None, Query(max_length=2048)] = None
) -> RedirectResponse:
    """The link `connect` hands out without `redirect_to`: binds the flow to this browser (a short-lived cookie
    whose hash is in the state) and sends it on to Strava's consent page, always shown."""
    user_id, scopes = links.read_ticket(ticket)
    return _to_strava_bound(request, links, user_id, scopes)


@browser_router.get(
    "/v1/oauth/strava/callback",
    response_class=HTMLResponse,
    status_code=303,
    responses={200: {"description": "Connected page (no redirect_to)"}, **_CALLBACK_PROBLEMS},
)
async def oauth_callback(
    request: Request,
    oauth: OAuthServiceDep,
    sessions: SessionsDep,
    state: Annotated[str | None, Query(max_length=2048)] = None,
    code: Annotated[str | None, Query(max_length=512)] = None,
    scope: Annotated[str | None, Query(max_length=512)] = None,
    error: Annotated[str | None, Query(max_length=256)] = None,
) -> Response:
    """Where Strava sends the user back. With `redirect_to`: nothing stored, no cookie, a 303 to the app with a
    one-time `connect_id` for its backend to complete. Without: only in the browser that started the flow, the
    code is exchanged, the tokens stored and the session set."""
    session = sessions.verify(request.cookies.get(COOKIE_NAME))
    browser = CallbackBrowser(
        binding=request.cookies.get(BROWSER_COOKIE), session_user=session.user_id if session else None
    )
    try:
        result = await oauth.callback(state=state, code=code, scope=scope, error=error, browser=browser)
    except AthleteCapacity:
        return _page(
            409,
            "Not connected: the app is full",
            "Strava refused this connection: the app has reached Strava's limit of connected athletes, so nothing "
            "was stored. Please contact the app's support; you can try again once they have made room.",
        )
    if result.outcome == "denied":
        if result.redirect_to:
            return RedirectResponse(with_query(result.redirect_to, strava="denied"), status_code=303)
        return _page(400, "Not connected", "You declined to connect Strava. You can close this page and try again.")
    if result.outcome == "confirm" and result.redirect_to and result.connect_id:
        target = with_query(result.redirect_to, strava="confirm", connect_id=result.connect_id)
        return RedirectResponse(target, status_code=303, headers={**_NO_STORE, "Referrer-Policy": "no-referrer"})
    response = _page(200, "Connected", "Strava is connected. You can close this page.")
    _set_session_cookie(response, sessions, result.user_id, secure=request.app.state.settings.public_url)
    response.delete_cookie(BROWSER_COOKIE, path=_BROWSER_COOKIE_PATH)
    return response


@browser_router.get(
    "/v1/oauth/strava/authorize", status_code=303, response_class=RedirectResponse, responses=problem_responses(401)
)
async def oauth_authorize(
    request: Request,
    session: RequiredSession,
    links: LinksDep,
    redirect_to: Annotated[str | None, Query(max_length=2048)] = None,
) -> RedirectResponse:
    """Send the session's user straight to Strava's consent page (the reconnect button). With `redirect_to` the
    app confirms the result (`connect_id`); without, the flow is bound to this browser."""
    if redirect_to is None:
        return _to_strava_bound(request, links, session.user_id, links.default_scopes)
    url, _expires_at = links.authorize_url(session.user_id, redirect_to=redirect_to, approval_prompt="force")
    return RedirectResponse(url, status_code=303, headers=_NO_STORE)


def _to_strava_bound(request: Request, links: ConnectLinks, user_id: str, scopes: list[str]) -> RedirectResponse:
    binding = secrets.token_urlsafe(32)
    url = links.browser_authorize_url(user_id, scopes=scopes, browser_secret=binding)
    response = RedirectResponse(url, status_code=303, headers=_NO_STORE)
    response.set_cookie(
        BROWSER_COOKIE,
        binding,
        max_age=STATE_TTL_SECONDS,
        httponly=True,
        samesite="lax",
        secure=request.app.state.settings.public_url.startswith("https://"),
        path=_BROWSER_COOKIE_PATH,
    )
    return response


def _set_session_cookie(response: Response, sessions: Sessions, user_id: str, *, secure: str) -> None:
    token, _session = sessions.mint(user_id)
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=sessions.ttl_seconds,
        httponly=True,
        samesite="lax",
        secure=secure.startswith("https://"),
        path="/",
    )


def _page(status: int, title: str, message: str) -> HTMLResponse:
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>"
        f"<title>{html.escape(title)} · tokensvc</title>"
        "<body style='font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto'>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>"
    )
    return HTMLResponse(body, status_code=status, headers=_NO_STORE)
