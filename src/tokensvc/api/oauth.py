"""Connect with Strava: the service API's connect and session calls, and the browser's OAuth redirects."""

from __future__ import annotations

import html
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from tokensvc.api.deps import LinksDep, OAuthServiceDep, RequiredSession, SessionsDep, UserId, require_api_key
from tokensvc.api.problems import problem_responses
from tokensvc.schemas import ConnectRequest, ConnectResponse, SessionResponse
from tokensvc.service.oauth import with_query
from tokensvc.service.sessions import COOKIE_NAME, Sessions

service_router = APIRouter(
    prefix="/v1", tags=["connect"], dependencies=[Depends(require_api_key)], responses=problem_responses(401)
)
browser_router = APIRouter(tags=["browser"])

_NO_STORE = {"Cache-Control": "no-store"}


@service_router.post("/users/{user_id}/connect", response_model=ConnectResponse)
async def create_connect_link(user_id: UserId, links: LinksDep, body: ConnectRequest | None = None) -> ConnectResponse:
    """Strava's authorize URL for this user, with a signed, single-use state that lives ten minutes."""
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


@browser_router.get(
    "/v1/oauth/strava/callback",
    response_class=HTMLResponse,
    status_code=303,
    responses={200: {"description": "Connected page (no redirect_to)"}, **problem_responses(400, 503)},
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
    """Where Strava sends the user back: checks the state, exchanges the code, stores tokens, sets the session."""
    result = await oauth.callback(state=state, code=code, scope=scope, error=error)
    if result.outcome == "denied":
        if result.redirect_to:
            return RedirectResponse(with_query(result.redirect_to, strava="denied"), status_code=303)
        return _page(400, "Not connected", "You declined to connect Strava. You can close this page and try again.")
    if result.redirect_to:
        response: Response = RedirectResponse(with_query(result.redirect_to, strava="connected"), status_code=303)
    else:
        response = _page(200, "Connected", "Strava is connected. You can close this page.")
    _set_session_cookie(response, sessions, result.user_id, secure=request.app.state.settings.public_url)
    return response


@browser_router.get(
    "/v1/oauth/strava/authorize", status_code=303, response_class=RedirectResponse, responses=problem_responses(401)
)
async def oauth_authorize(
    session: RequiredSession,
    links: LinksDep,
    redirect_to: Annotated[str | None, Query(max_length=2048)] = None,
) -> RedirectResponse:
    """Send the session's user straight to Strava's consent page (the reconnect button)."""
    url, _expires_at = links.authorize_url(session.user_id, redirect_to=redirect_to, approval_prompt="force")
    return RedirectResponse(url, status_code=303, headers=_NO_STORE)


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
