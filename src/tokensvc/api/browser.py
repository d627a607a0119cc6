"""The browser endpoints: session-authenticated, never returning a token, answering in the dashboard's shapes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from tokensvc.api.deps import OptionalSession, RequiredSession, TokenServiceDep, browser_post_guard
from tokensvc.api.problems import problem_responses
from tokensvc.errors import NeedsReconnect, RetryLater, Unauthorized
from tokensvc.schemas import BrowserFailure, RefreshResult, TokenStatus
from tokensvc.service.tokens import TokenService

router = APIRouter(tags=["browser"])

REAUTH_MESSAGE = "Failed to refresh Strava tokens. Please re-authenticate with Strava."
UNAVAILABLE_MESSAGE = "Strava is unavailable right now; your connection is kept. Please try again shortly."


@router.post(
    "/proactive-token-refresh",
    response_model=RefreshResult,
    responses={
        401: {
            "model": BrowserFailure,
            "description": "No session, no tokens, or the refresh token is dead",
            "headers": problem_responses(401)[401]["headers"],
        },
        503: {
            "model": BrowserFailure,
            "description": "Transient failure; nothing changed",
            "headers": problem_responses(503)[503]["headers"],
        },
        **problem_responses(403, 413, 415),
    },
    # The dashboard posts JSON (the content type is what keeps cross-site forms out); the body itself is ignored.
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"description": "Ignored; send `{}`", "examples": [{}]}}},
        }
    },
)
async def proactive_token_refresh(
    _guard: Annotated[None, Depends(browser_post_guard)],
    request: Request,
    session: OptionalSession,
    service: TokenServiceDep,
) -> JSONResponse:
    """The dashboard's call when its components mount: refresh if due. Never returns a token."""
    if session is None:
        return _failure(401, REAUTH_MESSAGE, needs_reauth=True, token_status=None, authorize_url=None)
    reconnect_url = f"{request.app.state.settings.public_url}/v1/oauth/strava/authorize"
    try:
        result = await service.refresh(session.user_id, trigger="browser")
    except NeedsReconnect:
        status = await service.status(session.user_id)
        return _failure(401, REAUTH_MESSAGE, needs_reauth=True, token_status=status, authorize_url=reconnect_url)
    except RetryLater as exc:
        return _failure(
            503,
            UNAVAILABLE_MESSAGE,
            needs_reauth=False,
            token_status=await _status_if_possible(service, session.user_id),
            headers={"Retry-After": str(exc.retry_after)},
        )
    return JSONResponse(result.model_dump(mode="json"), headers={"Cache-Control": "no-store"})


@router.get("/v1/me/token-status", response_model=TokenStatus, responses=problem_responses(401))
async def get_my_token_status(session: RequiredSession, service: TokenServiceDep) -> TokenStatus:
    """The session user's token status. Never calls Strava, never returns a token."""
    return await service.status(session.user_id)


async def _status_if_possible(service: TokenService, user_id: str) -> TokenStatus | None:
    try:
        return await service.status(user_id)
    except Exception:
        return None


def _failure(
    status_code: int,
    message: str,
    *,
    needs_reauth: bool,
    token_status: TokenStatus | None,
    authorize_url: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = BrowserFailure(
        error=message, needs_reauth=needs_reauth, token_status=token_status, authorize_url=authorize_url
    ).model_dump(mode="json")
    challenge = {"WWW-Authenticate": Unauthorized.challenge} if status_code == 401 else {}
    return JSONResponse(
        body, status_code=status_code, headers={"Cache-Control": "no-store", **challenge, **(headers or {})}
    )
