"""The audit trail and the DB-wide stats on the service API (Bearer): thin routers over service/audit.py and
service/stats.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from tokensvc.api.deps import UserId, from_app_state, require_api_key
from tokensvc.api.problems import problem_responses
from tokensvc.schemas import EventPage, Stats
from tokensvc.service.audit import Audit
from tokensvc.service.stats import StatsService

router = APIRouter(
    prefix="/v1", tags=["audit"], dependencies=[Depends(require_api_key)], responses=problem_responses(401)
)


get_audit = from_app_state("audit", Audit)
stats_service = from_app_state("stats", StatsService)


@router.get("/users/{user_id}/events", response_model=EventPage, responses=problem_responses(503))
async def list_user_events(
    user_id: UserId,
    audit: Annotated[Audit, Depends(get_audit)],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page")] = None,
) -> EventPage:
    """A user's audit trail (refresh attempts and changes of state), newest first, with cursor pagination."""
    return await audit.events(user_id, limit=limit, cursor=cursor)


@router.get("/stats", response_model=Stats, responses=problem_responses(503))
async def get_stats(service: Annotated[StatsService, Depends(stats_service)]) -> Stats:
    """Users by token status, and refresh attempts at Strava in the last 24 hours (DB-wide)."""
    return await service.stats()
