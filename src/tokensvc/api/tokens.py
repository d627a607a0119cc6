"""The service API (Bearer): thin routers that parse, call one service method, and shape the response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from pydantic import WithJsonSchema

from tokensvc.api.deps import TokenServiceDep, UserId, require_api_key
from tokensvc.api.problems import problem_responses
from tokensvc.errors import ValidationFailed
from tokensvc.schemas import AccessToken, RefreshResult, TokenImport, TokenPage, TokenStatus
from tokensvc.status import Status

router = APIRouter(
    prefix="/v1", tags=["tokens"], dependencies=[Depends(require_api_key)], responses=problem_responses(401)
)

_NO_STORE = {"Cache-Control": "no-store"}
_STORED_STATUSES: list[Status] = [s for s in Status if s is not Status.MISSING]
_FILTERS = [s.value for s in _STORED_STATUSES]  # `missing` users have no row to list


@router.put("/users/{user_id}/tokens", response_model=TokenStatus, responses=problem_responses(409, 503))
async def put_tokens(
    user_id: UserId,
    body: TokenImport,
    service: TokenServiceDep,
    replace: Annotated[
        bool,
        Query(
            description="Store the pair even if it is older than the stored one (else 409 stale_import), and move "
            "the athlete from another user who holds it (else 409 athlete_in_use; that user becomes `missing`)"
        ),
    ] = False,
) -> TokenStatus:
    """Import or replace a user's tokens (clears `needs_reauth`). A pair older than the stored one, or an athlete
    another user holds, is refused unless `replace=true`."""
    return await service.import_tokens(user_id, body, replace=replace)


@router.get("/users/{user_id}/token-status", response_model=TokenStatus, responses=problem_responses(503))
async def get_token_status(user_id: UserId, service: TokenServiceDep) -> TokenStatus:
    """A user's token status, `missing` included. Never calls Strava."""
    return await service.status(user_id)


@router.post("/users/{user_id}/refresh", response_model=RefreshResult, responses=problem_responses(409, 503))
async def refresh_tokens(
    user_id: UserId,
    service: TokenServiceDep,
    force: Annotated[bool, Query(description="Refresh even a valid token")] = False,
) -> RefreshResult:
    """Refresh now if `expiring_soon` or `expired` (or `force`); a valid token is left alone."""
    return await service.refresh(user_id, force=force, trigger="api")


@router.get(
    "/users/{user_id}/access-token",
    response_model=AccessToken,
    responses=problem_responses(409, 503),
)
async def get_access_token(
    user_id: UserId,
    service: TokenServiceDep,
    min_ttl: Annotated[
        int, Query(ge=0, le=3600, description="Seconds the token must still live (Strava mints at <= 3600 s left)")
    ] = 300,
) -> Response:
    """A usable access token with `expires_in >= min_ttl`, refreshed first when needed."""
    token = await service.access_token(user_id, min_ttl=min_ttl)
    return Response(token.model_dump_json(), media_type="application/json", headers=_NO_STORE)


@router.delete("/users/{user_id}/tokens", status_code=204, responses=problem_responses(503))
async def delete_tokens(user_id: UserId, service: TokenServiceDep) -> Response:
    """Delete the user's tokens at once and revoke the grant at Strava (retried until Strava confirms). Idempotent."""
    await service.delete(user_id)
    return Response(status_code=204)


@router.get("/tokens", response_model=TokenPage, responses=problem_responses(503))
async def list_tokens(
    service: TokenServiceDep,
    status: Annotated[
        list[str] | None,
        WithJsonSchema(
            {
                "type": "array",
                "items": {"type": "string", "enum": _FILTERS},
                "examples": [["expired", "expiring_soon"]],
            }
        ),
        Query(description="Statuses to list, comma-separated (or the parameter repeated); default every stored user"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TokenPage:
    """Users by status, oldest expiry first, with cursor pagination."""
    return await service.list_tokens(_parse_statuses(status), limit=limit, cursor=cursor)


def _parse_statuses(raw: list[str] | None) -> list[Status]:
    if raw is None:
        return _STORED_STATUSES
    parts = [part.strip() for value in raw for part in value.split(",") if part.strip()]
    if not parts:  # `status=` names none: leave the parameter out to list every stored user
        raise ValidationFailed(f"`status` is empty: name one or more of {', '.join(_FILTERS)}, or leave it out")
    try:
        return [Status(part) for part in parts]
    except ValueError as exc:
        raise ValidationFailed(f"`status` takes a comma-separated list of {', '.join(_FILTERS)}") from exc
