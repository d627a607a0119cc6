"""Liveness, readiness and metrics: no auth, so orchestrators and scrapers can reach them."""

from __future__ import annotations

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
            "description": "The database does not answer (a probe's answer, not a problem)",
            "content": {"application/json": {"example": {"status": "unavailable"}}},
            "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
        }
    },
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database answers a query."""
    engine: AsyncEngine = request.app.state.engine
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except (DBAPIError, OSError):
        return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok"})


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    """Prometheus text exposition. No database read: the DB-wide gauges are refreshed by each replica's own
    background job (TOKENSVC_GAUGE_INTERVAL_SECONDS), so scrapes cost the database nothing, however many."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
