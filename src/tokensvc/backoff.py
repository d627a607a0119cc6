"""The one retry delay: jittered exponential backoff, for refreshes, deauthorization events and notifications."""

from __future__ import annotations

import random


def backoff_seconds(attempt: int, *, first: float, cap: float) -> float:
    """The wait after failed attempt number `attempt` (1-based): first, 2 x first, 4 x first, … up to `cap`, each
    drawn from 50 to 100% of that so that callers failing together do not retry together."""
    return min(cap, first * 2.0 ** min(max(attempt, 1) - 1, 62)) * random.uniform(0.5, 1.0)
