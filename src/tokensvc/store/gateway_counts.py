"""All SQL about the gateway's hourly counts by outcome (`gateway_counts`): batched adds, the 24-hour totals, and
the purge at the audit retention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from tokensvc.models import gateway_counts as g
from tokensvc.store import rollup


@dataclass(frozen=True, slots=True)
class Tally:
    """`count` calls that ended in `outcome` within the hour starting at `hour` (epoch seconds), added to `slot`."""

    hour: int
    outcome: str
    slot: int
    count: int


async def add(conn: AsyncConnection, tallies: Sequence[Tally]) -> None:
    """Add each tally to its (hour, outcome, slot) row: one upsert statement per tally, in the caller's
    transaction."""
    for tally in tallies:
        await rollup.add(conn, g, hour=tally.hour, outcome=tally.outcome, slot=tally.slot, count=tally.count)


async def totals(conn: AsyncConnection, *, since_hour: int, hours: int = 24) -> dict[str, int]:
    """Calls per outcome in the `hours` hourly buckets from `since_hour` (every replica's, as flushed)."""
    return await rollup.totals(conn, g, since_hour=since_hour, hours=hours)
