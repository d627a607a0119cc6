"""Injected failures and the hold gate: the knobs tests turn to reproduce Strava's bad days deterministically."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Call = Literal[
    "exchange",
    "refresh",
    "token",
    "deauthorize",
    "revoke",
    "athlete",
    "activities",
    "activity",
    "activity_update",
    "streams",
    "upload",
    "subscriptions",
]
"""A request past the consent page; `token` is a /oauth/token call with a missing/unknown grant.

`activities` lists the athlete's activities, `activity` reads one, `activity_update` is its PUT, `streams` its streams.
`upload` is a file upload (`POST /uploads`).
"""

Endpoint = Literal["authorize", Call]
"""What a request is, for counting and matching: a call, or the consent page."""

Target = Literal[Call, "api", "any"]
"""What a fault or hold applies to: `token` covers every /oauth/token call, `api` every rate-counted `/api/v3` resource
call (athlete, activities, streams, uploads), `any` every call but the consent page."""

API_ENDPOINTS: frozenset[Endpoint] = frozenset(
    {"athlete", "activities", "activity", "activity_update", "streams", "upload"}
)

FaultKind = Literal["status", "latency", "lost_answer", "malformed"]


def matches(target: Target, endpoint: Endpoint) -> bool:
    if endpoint == "authorize":
        return False
    if target in ("any", endpoint):
        return True
    if target == "api":
        return endpoint in API_ENDPOINTS
    return target == "token" and endpoint in ("exchange", "refresh", "token")


class FaultSpec(BaseModel):
    """One queued fault; `count` matching requests each consume one occurrence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: Target
    kind: FaultKind
    count: int = Field(default=1, ge=1)
    status: int = Field(default=429, ge=100, le=599)
    retry_after: int | None = Field(default=None, ge=0)
    body: str | None = None
    latency_ms: int = Field(default=0, ge=0)
    hang_seconds: float = Field(default=30.0, ge=0)


@dataclass
class _Pending:
    spec: FaultSpec
    remaining: int


class FaultQueue:
    """Faults in arrival order; a request takes the first one that matches it."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def add(self, spec: FaultSpec) -> None:
        self._pending.append(_Pending(spec, spec.count))

    def take(self, endpoint: Endpoint) -> FaultSpec | None:
        for pending in self._pending:
            if matches(pending.spec.endpoint, endpoint):
                pending.remaining -= 1
                if pending.remaining == 0:
                    self._pending.remove(pending)
                return pending.spec
        return None

    def pending(self) -> list[dict[str, object]]:
        return [{**p.spec.model_dump(), "remaining": p.remaining} for p in self._pending]

    def clear(self) -> None:
        self._pending.clear()


class Gate:
    """Parks matching requests before processing until released, so tests can line up races exactly.

    Events are swapped rather than reused, which lets the sync `release()` wake waiters without a lock
    and lets `wait_held()` block on changes instead of polling.
    """

    def __init__(self) -> None:
        self._holding: set[Target] = set()
        self._held = 0
        self._released = asyncio.Event()
        self._changed = asyncio.Event()

    @property
    def held(self) -> int:
        """How many requests are parked right now."""
        return self._held

    @property
    def holding(self) -> list[Target]:
        return sorted(self._holding)

    def hold(self, target: Target) -> None:
        self._holding.add(target)

    def release(self) -> int:
        """Stop holding and let every parked request proceed; return how many were parked."""
        released, self._released = self._released, asyncio.Event()
        self._holding.clear()
        released.set()
        return self._held

    async def pass_through(self, endpoint: Endpoint) -> None:
        if not any(matches(target, endpoint) for target in self._holding):
            return
        released = self._released
        self._set_held(self._held + 1)
        try:
            await released.wait()
        finally:
            self._set_held(self._held - 1)

    async def wait_held(self, count: int) -> None:
        """Return once at least `count` requests are parked (callers bound it with `asyncio.timeout`)."""
        while self._held < count:
            await self._changed.wait()

    def _set_held(self, held: int) -> None:
        self._held = held
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
