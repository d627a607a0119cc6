"""Operator calls on the service API: refresh everything that is due now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from tokensvc.api.deps import from_app_state, require_api_key
from tokensvc.api.problems import problem_responses
from tokensvc.service.sweeper import Sweeper

router = APIRouter(
    prefix="/v1", tags=["operations"], dependencies=[Depends(require_api_key)], responses=problem_responses(401)
)


class SweepResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"checked": 57, "refreshed": 55, "failed": 1, "needs_reauth": 1}]}
    )

    checked: int
    refreshed: int
    failed: int
    needs_reauth: int


get_sweeper = from_app_state("sweeper", Sweeper)


@router.post("/refresh-sweep", response_model=SweepResult, responses=problem_responses(503))
async def refresh_sweep(sweeper: Annotated[Sweeper, Depends(get_sweeper)]) -> SweepResult:
    """Refresh every due user now (bounded concurrency; the same exactly-once rules as any refresh)."""
    report = await sweeper.sweep_once()
    return SweepResult(
        checked=report.checked, refreshed=report.refreshed, failed=report.failed, needs_reauth=report.needs_reauth
    )
