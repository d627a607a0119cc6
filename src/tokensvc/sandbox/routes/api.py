"""The API that syncs use: the athlete, their activities, one activity (read and update), its streams, uploads.

Every answer, refusals included, carries the rate-limit headers; GETs count toward the read windows as well.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..activities import ListQuery, activity_json, parse_changes
from ..streams import render, selected
from .pipeline import Sandbox, access_token, rated, request_body, serve

router = APIRouter(prefix="/api/v3")

_TRUE = ("true", "1", "yes")


@router.get("/athlete", response_model=None)
async def athlete(request: Request, state: Sandbox) -> Response:
    """The token's athlete (any valid token may read it)."""
    token = access_token(request)
    handler = rated(state, lambda: JSONResponse(state.athlete_profile(token)), read=True)
    return await serve(state, "athlete", handler)


@router.get("/athlete/activities", response_model=None)
async def list_activities(request: Request, state: Sandbox) -> Response:
    """The athlete's activities: `before`, `after` (epoch seconds), `page`, `per_page` (30, at most 200)."""
    token = access_token(request)
    params = dict(request.query_params)

    def handle() -> Response:
        return JSONResponse(state.list_activities(token, ListQuery.parse(params)))

    return await serve(state, "activities", rated(state, handle, read=True))


@router.get("/activities/{activity_id}", response_model=None)
async def get_activity(activity_id: int, request: Request, state: Sandbox) -> Response:
    """One of the athlete's activities (DetailedActivity); private ones need `activity:read_all`."""
    token = access_token(request)

    def handle() -> Response:
        activity = state.readable_activity(token, activity_id, "activity")
        return JSONResponse(activity_json(activity, detailed=True))

    return await serve(state, "activity", rated(state, handle, read=True))


@router.put("/activities/{activity_id}", response_model=None)
async def update_activity(activity_id: int, request: Request, state: Sandbox) -> Response:
    """Update name, sport_type, description, commute, trainer, hide_from_home, gear_id; needs `activity:write`."""
    token = access_token(request)
    body = await request_body(request)

    def handle() -> Response:
        return JSONResponse(state.update_activity(token, activity_id, parse_changes(body)))

    return await serve(state, "activity_update", rated(state, handle, read=False))


@router.get("/activities/{activity_id}/streams", response_model=None)
async def streams(activity_id: int, request: Request, state: Sandbox) -> Response:
    """The activity's streams for `keys` (a list, or an object keyed by type with `key_by_type=true`), in chunks."""
    token = access_token(request)
    keys = request.query_params.get("keys")
    key_by_type = request.query_params.get("key_by_type", "").lower() in _TRUE

    def handle() -> Response:
        activity = state.readable_activity(token, activity_id, "streams")
        body = render(activity, selected(keys), key_by_type=key_by_type)
        return StreamingResponse(body, media_type="application/json")

    return await serve(state, "streams", rated(state, handle, read=True))


@router.post("/uploads", response_model=None)
async def upload(request: Request, state: Sandbox) -> Response:
    """Upload an activity file (multipart: `file`, `data_type` …); needs `activity:write`. The body is read as it
    arrives and only counted, so a body of any size passes without being held; 201 with the upload's status."""
    token = access_token(request)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)

    def handle() -> Response:
        return JSONResponse(state.receive_upload(token, size), status_code=201)

    return await serve(state, "upload", rated(state, handle, read=False))
