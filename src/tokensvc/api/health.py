"""Liveness, readiness and metrics: no auth, so orchestrators and scrapers can reach them."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.schemas import Health

log = structlog.get_logger(__name__)

router = APIRouter(tags=["operations"])

_OK = b'{"status":"ok"}'


@router.get("/healthz", response_model=Health)
async def healthz() -> Response:
    """Liveness: the process answers. No I/O."""
    return Response(_OK, media_type="application/json")


@router.get(
    "/readyz",
    response_model=Health,
    responses={
        503: {
            "model": Health,
            "description": "The database does not answer within a second, or the replica is shutting down "
            "(a probe's answer, not a problem)",
            "content": {"application/json": {"example": {"status": "unavailable"}}},
            "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
        }
    },
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database answers a query within a second, and the replica is not shutting down."""
    if request.app.state.shutdown.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503, headers={"Retry-After": "5"})
    # Its own one-connection pool: a main pool drained by slow work cannot make a healthy replica look dead.
    engine: AsyncEngine = request.app.state.probe_engine
    try:
        async with asyncio.timeout(READY_DEADLINE_SECONDS), engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except (DBAPIError, OSError, TimeoutError):
        return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok"})


READY_DEADLINE_SECONDS = 0.9


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    """Prometheus text exposition. No database read: the DB-wide gauges are refreshed by each replica's own
    background job (TOKENSVC_GAUGE_INTERVAL_SECONDS), so scrapes cost the database nothing, however many."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
