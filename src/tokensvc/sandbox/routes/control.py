"""The `/_control` knobs: reset, counters, the ledger, faults, holds, rate limits, capacity and token lifetimes.

No auth: the sandbox is for tests and offline trials. `control_world` changes the world itself (athletes,
activities, pushes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..consent import parse_scopes
from ..errors import StravaError
from ..faults import FaultSpec, Target
from .pipeline import Sandbox

router = APIRouter(prefix="/_control", tags=["control"])


class NextGrant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in: int | None = Field(default=None, description="the next code exchange's access token lifetime")
    scope: str | None = Field(default=None, description="the most the next consent approval grants (comma-separated)")

    @model_validator(mode="after")
    def _something(self) -> NextGrant:
        if self.expires_in is None and self.scope is None:
            raise ValueError("give expires_in, scope or both")
        return self


class AccessLifetime(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in: int = Field(ge=1)


class Hold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: Target


class RateLimits(BaseModel):
    """Any subset of the four limits; the others keep their values (Strava's defaults unless changed)."""

    model_config = ConfigDict(extra="forbid")

    limit_15min: int | None = Field(default=None, ge=0)
    limit_daily: int | None = Field(default=None, ge=0)
    read_limit_15min: int | None = Field(default=None, ge=0)
    read_limit_daily: int | None = Field(default=None, ge=0)


class Capacity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    athlete_capacity: int | None = Field(ge=0, description="connected athletes allowed; null: unlimited")


@router.post("/reset")
async def reset(state: Sandbox) -> dict[str, bool]:
    """Forget everything: athletes, activities, counters, faults, subscription; knobs back to the start's."""
    state.reset()
    return {"reset": True}


@router.get("/stats")
async def stats(state: Sandbox) -> dict[str, Any]:
    """`calls` counts requests that reached a handler, including failed and faulted ones; `calls_by_athlete` per
    athlete and endpoint."""
    return state.stats()


@router.get("/ledger")
async def ledger(state: Sandbox) -> dict[str, list[dict[str, Any]]]:
    """Per athlete id, every refresh token issued (oldest first) with its sha256 and how it was used."""
    return state.ledger_json()


@router.get("/faults")
async def faults(state: Sandbox) -> dict[str, list[dict[str, object]]]:
    return {"pending": state.faults.pending()}


@router.post("/faults")
async def add_fault(spec: FaultSpec, state: Sandbox) -> dict[str, list[dict[str, object]]]:
    state.add_fault(spec)
    return {"pending": state.faults.pending()}


@router.delete("/faults")
async def clear_faults(state: Sandbox) -> dict[str, list[dict[str, object]]]:
    state.faults.clear()
    return {"pending": []}


@router.post("/hold")
async def hold(body: Hold, state: Sandbox) -> dict[str, list[Target]]:
    state.gate.hold(body.endpoint)
    return {"holding": state.gate.holding}


@router.post("/release")
async def release(state: Sandbox) -> dict[str, int]:
    return {"released": state.gate.release()}


WaitSeconds = Annotated[float, Query(alias="timeout", ge=0, le=300)]


async def answer_when(done: Awaitable[None], wait_seconds: float, body: Callable[[], dict[str, Any]]) -> JSONResponse:
    """`body()` once `done` has happened; the same with a 408 if `wait_seconds` pass first."""
    try:
        async with asyncio.timeout(wait_seconds):
            await done
    except TimeoutError:
        return JSONResponse(body(), status_code=408)
    return JSONResponse(body())


@router.get("/held", response_model=None)
async def held(state: Sandbox, count: Annotated[int, Query(ge=0)] = 1, wait_seconds: WaitSeconds = 5.0) -> JSONResponse:
    """Wait (on an event, not by polling) until `count` requests are parked; 408 if that takes too long."""
    return await answer_when(state.gate.wait_held(count), wait_seconds, lambda: {"held": state.gate.held})


@router.get("/rate-limit")
async def rate_limit(state: Sandbox) -> dict[str, int]:
    """The four limits in force."""
    return state.rate.limits()


@router.post("/rate-limit")
async def set_rate_limit(body: RateLimits, state: Sandbox) -> dict[str, int]:
    """Change any of the limits (15-minute and daily, overall and read); the windows keep their counts."""
    state.rate.configure(**body.model_dump())
    return state.rate.limits()


@router.get("/capacity")
async def capacity(state: Sandbox) -> dict[str, int | None]:
    return {"athlete_capacity": state.athlete_capacity, "connected": state.grants.connected()}


@router.post("/capacity")
async def set_capacity(body: Capacity, state: Sandbox) -> dict[str, int | None]:
    """Once this many athletes are connected, a code exchange for another answers 403 (null: unlimited)."""
    state.set_capacity(body.athlete_capacity)
    return {"athlete_capacity": state.athlete_capacity, "connected": state.grants.connected()}


@router.post("/next-grant", response_model=None)
async def next_grant(body: NextGrant, state: Sandbox) -> JSONResponse:
    """One-shot: the next code exchange's access token lives `expires_in` seconds; the next consent approval grants
    at most `scope` (as if the athlete unticked the rest)."""
    try:
        scope = frozenset(parse_scopes(body.scope)) if body.scope is not None else None
    except StravaError:
        return JSONResponse({"detail": f"unknown scope in {body.scope!r}"}, status_code=422)
    state.set_next_grant(body.expires_in, scope)
    return JSONResponse(body.model_dump(exclude_none=True))


@router.post("/access-lifetime")
async def access_lifetime(body: AccessLifetime, state: Sandbox) -> AccessLifetime:
    """Every later refresh issues access tokens living `expires_in` seconds (until reset), not Strava's 6 h."""
    state.set_access_lifetime(body.expires_in)
    return body
