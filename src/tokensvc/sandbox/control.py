"""The `/_control` API: seed, inspect and sabotage the world from tests in other processes (no auth)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .faults import FaultSpec, Target
from .state import (
    ACCESS_TOKEN_LIFETIME,
    DEFAULT_SCOPE,
    AthleteSnapshot,
    SandboxState,
    SeededAthlete,
    UnknownAthleteError,
)


class SeedAthlete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    athlete_id: int | None = Field(default=None, ge=1)
    expires_in: int = ACCESS_TOKEN_LIFETIME
    scope: str = DEFAULT_SCOPE


class Expiry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_at: int


class NextGrant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in: int


class AccessLifetime(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in: int = Field(ge=1)


class Hold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: Target


class RateLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit_15min: int | None = Field(default=None, ge=0)
    limit_daily: int | None = Field(default=None, ge=0)


def control_router(state: SandboxState) -> APIRouter:
    router = APIRouter(prefix="/_control", tags=["control"])

    def known(athlete_id: int) -> None:
        try:
            state.snapshot(athlete_id)
        except UnknownAthleteError:
            raise HTTPException(404, f"athlete {athlete_id} is unknown") from None

    @router.post("/reset")
    async def reset() -> dict[str, bool]:
        state.reset()
        return {"reset": True}

    @router.post("/athletes")
    async def create_athlete(body: SeedAthlete | None = None) -> SeededAthlete:
        body = body or SeedAthlete()
        return state.create_athlete(body.athlete_id, expires_in=body.expires_in, scope=body.scope)

    @router.get("/athletes/{athlete_id}")
    async def athlete(athlete_id: int) -> AthleteSnapshot:
        known(athlete_id)
        return state.snapshot(athlete_id)

    @router.post("/athletes/{athlete_id}/expire")
    async def expire(athlete_id: int, body: Expiry) -> AthleteSnapshot:
        known(athlete_id)
        return state.expire(athlete_id, body.expires_at)

    @router.post("/athletes/{athlete_id}/rotate")
    async def rotate(athlete_id: int) -> AthleteSnapshot:
        known(athlete_id)
        try:
            return state.rotate_athlete(athlete_id)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None

    @router.post("/athletes/{athlete_id}/revoke")
    async def revoke(athlete_id: int) -> AthleteSnapshot:
        """The athlete revokes access on strava.com; with a push subscription, Strava then sends the
        deauthorization event to its callback (in the background; `GET /_control/deliveries` waits for it)."""
        known(athlete_id)
        snapshot = state.revoke(athlete_id)
        event = state.push.deauthorization(athlete_id, state.now())
        if event is not None:
            state.push.send_in_background(event)
        return snapshot

    @router.post("/push", response_model=None)
    async def push(event: dict[str, Any]) -> JSONResponse:
        """Send any event (a forged or repeated one, say) to the subscription's callback, as Strava would;
        answers with the callback's statuses. 409 without a subscription."""
        if state.push.subscription is None:
            return JSONResponse({"detail": "no push subscription"}, status_code=409)
        delivery = await state.push.send(event)
        return JSONResponse(delivery.as_json())

    @router.get("/deliveries", response_model=None)
    async def deliveries(
        count: Annotated[int, Query(ge=0)] = 0,
        wait_seconds: Annotated[float, Query(alias="timeout", ge=0, le=300)] = 5.0,
    ) -> JSONResponse:
        """Every event sent so far; waits (on an event) until `count` have finished, 408 if that takes too long."""
        try:
            async with asyncio.timeout(wait_seconds):
                await state.push.wait_delivered(count)
        except TimeoutError:
            return JSONResponse({"deliveries": [d.as_json() for d in state.push.deliveries]}, status_code=408)
        return JSONResponse({"deliveries": [d.as_json() for d in state.push.deliveries]})

    @router.post("/next-grant")
    async def next_grant(body: NextGrant) -> NextGrant:
        """The next code exchange (one-shot) issues an access token expiring in `expires_in` seconds."""
        state.set_next_grant(body.expires_in)
        return body

    @router.post("/access-lifetime")
    async def access_lifetime(body: AccessLifetime) -> AccessLifetime:
        """Every later refresh issues access tokens living `expires_in` seconds (until reset), not Strava's 6 h."""
        state.set_access_lifetime(body.expires_in)
        return body

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        """`calls` counts requests that reached a handler, including failed and faulted ones."""
        return state.stats()

    @router.get("/ledger")
    async def ledger() -> dict[str, list[dict[str, Any]]]:
        """Per athlete id, every refresh token issued (oldest first) with its sha256 and how it was used."""
        return state.ledger_json()

    @router.get("/faults")
    async def faults() -> dict[str, list[dict[str, object]]]:
        return {"pending": state.faults.pending()}

    @router.post("/faults")
    async def add_fault(spec: FaultSpec) -> dict[str, list[dict[str, object]]]:
        state.add_fault(spec)
        return {"pending": state.faults.pending()}

    @router.delete("/faults")
    async def clear_faults() -> dict[str, list[dict[str, object]]]:
        state.faults.clear()
        return {"pending": []}

    @router.post("/hold")
    async def hold(body: Hold) -> dict[str, list[Target]]:
        state.gate.hold(body.endpoint)
        return {"holding": state.gate.holding}

    @router.post("/release")
    async def release() -> dict[str, int]:
        return {"released": state.gate.release()}

    @router.get("/held", response_model=None)
    async def held(
        count: Annotated[int, Query(ge=0)] = 1,
        wait_seconds: Annotated[float, Query(alias="timeout", ge=0, le=300)] = 5.0,
    ) -> JSONResponse:
        """Wait (on an event, not by polling) until `count` requests are parked; 408 if that takes too long."""
        try:
            async with asyncio.timeout(wait_seconds):
                await state.gate.wait_held(count)
        except TimeoutError:
            return JSONResponse({"held": state.gate.held}, status_code=408)
        return JSONResponse({"held": state.gate.held})

    @router.post("/rate-limit")
    async def rate_limit(body: RateLimits) -> RateLimits:
        state.rate.configure(body.limit_15min, body.limit_daily)
        return body

    return router
