"""The `/_control` calls that change the world as people on strava.com would: athletes connecting, revoking and
being invalidated, activities uploaded, edited and deleted (each pushing its event), and any event pushed at will."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..activities import ControlChanges, NewActivity, check_sport
from ..state import ACCESS_TOKEN_LIFETIME, DEFAULT_SCOPE, AthleteSnapshot, SeededAthlete
from .control import WaitSeconds, answer_when
from .pipeline import Sandbox

router = APIRouter(prefix="/_control", tags=["control"])

Copies = Annotated[int, Query(ge=1, le=10, description="deliveries of the event (Strava sends duplicates)")]


class SeedAthlete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    athlete_id: int | None = Field(default=None, ge=1)
    expires_in: int = ACCESS_TOKEN_LIFETIME
    scope: str = DEFAULT_SCOPE


class Expiry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_at: int


@router.post("/athletes")
async def create_athlete(state: Sandbox, body: SeedAthlete | None = None) -> SeededAthlete:
    """Connect an athlete without the browser flow (an existing id reconnects: a new pair, the old one dies)."""
    body = body or SeedAthlete()
    return state.create_athlete(body.athlete_id, expires_in=body.expires_in, scope=body.scope)


@router.get("/athletes/{athlete_id}")
async def athlete(athlete_id: int, state: Sandbox) -> AthleteSnapshot:
    """The athlete's newest pair, scopes and whether they revoked access."""
    return state.snapshot(athlete_id)


@router.post("/athletes/{athlete_id}/expire")
async def expire(athlete_id: int, body: Expiry, state: Sandbox) -> AthleteSnapshot:
    """Move the current access token's expiry."""
    return state.expire(athlete_id, body.expires_at)


@router.post("/athletes/{athlete_id}/rotate")
async def rotate(athlete_id: int, state: Sandbox) -> AthleteSnapshot:
    """Another client refreshes behind the app's back: a new pair, the old refresh token dies (409 if revoked)."""
    try:
        return state.rotate_athlete(athlete_id)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None


@router.post("/athletes/{athlete_id}/invalidate")
async def invalidate(athlete_id: int, state: Sandbox) -> AthleteSnapshot:
    """Strava invalidates the athlete's access tokens early: API calls get 401; the next refresh mints a new one."""
    return state.invalidate_access(athlete_id)


@router.post("/athletes/{athlete_id}/revoke")
async def revoke(athlete_id: int, state: Sandbox) -> AthleteSnapshot:
    """The athlete revokes access on strava.com; with a push subscription, Strava then sends the
    deauthorization event to its callback (in the background; `GET /_control/deliveries` waits for it)."""
    snapshot = state.revoke(athlete_id)
    event = state.push.deauthorization(athlete_id, state.now())
    if event is not None:
        state.push.send_in_background(event)
    return snapshot


@router.post("/athletes/{athlete_id}/activities")
async def upload(
    athlete_id: int, state: Sandbox, copies: Copies = 1, body: NewActivity | None = None
) -> dict[str, Any]:
    """The athlete uploads an activity (`points` stream samples); the `create` event goes to the subscription if the
    grant may read it (`activity:read`, or `activity:read_all` for a private one), `copies` times."""
    spec = body or NewActivity()
    check_sport(spec)
    return state.upload_activity(athlete_id, spec, copies=copies)


@router.patch("/activities/{activity_id}")
async def change(activity_id: int, body: ControlChanges, state: Sandbox, copies: Copies = 1) -> dict[str, Any]:
    """The athlete edits the activity on strava.com (privacy included); an `update` event follows."""
    return state.change_activity(activity_id, body, copies=copies)


@router.delete("/activities/{activity_id}")
async def delete(activity_id: int, state: Sandbox, copies: Copies = 1) -> dict[str, Any]:
    """The athlete deletes the activity; a `delete` event follows."""
    return state.delete_activity(activity_id, copies=copies)


@router.post("/push", response_model=None)
async def push(event: dict[str, Any], state: Sandbox, copies: Copies = 1) -> JSONResponse:
    """Send any event (a forged or repeated one, say) to the subscription's callback, as Strava would; answers with
    the callback's statuses (of the last copy). 409 without a subscription."""
    if state.push.subscription is None:
        return JSONResponse({"detail": "no push subscription"}, status_code=409)
    deliveries = [await state.push.send(event) for _ in range(copies)]
    return JSONResponse(deliveries[-1].as_json())


@router.get("/deliveries", response_model=None)
async def deliveries(
    state: Sandbox, count: Annotated[int, Query(ge=0)] = 0, wait_seconds: WaitSeconds = 5.0
) -> JSONResponse:
    """Every event sent so far; waits (on an event) until `count` have finished, 408 if that takes too long."""
    return await answer_when(
        state.push.wait_delivered(count),
        wait_seconds,
        lambda: {"deliveries": [d.as_json() for d in state.push.deliveries]},
    )
