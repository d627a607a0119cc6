"""Strava's per-application request windows (quarter hours and UTC days), driven by the injected clock.

Two pairs of windows, as Strava keeps them: the overall limit, charged for every rate-counted call, and the read
limit, charged as well for every rate-counted GET. Both are enforced at Strava's defaults unless configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUARTER_HOUR = 900
DAY = 86400
DEFAULT_LIMITS = (200, 2000)
DEFAULT_READ_LIMITS = (100, 1000)


@dataclass
class _Window:
    """A counter that restarts whenever the window key (epoch seconds // length) changes."""

    length: int
    key: int = -1
    count: int = 0

    def hit(self, now: float) -> int:
        self._roll(now)
        self.count += 1
        return self.count

    def usage(self, now: float) -> int:
        self._roll(now)
        return self.count

    def _roll(self, now: float) -> None:
        key = int(now // self.length)
        if key != self.key:
            self.key, self.count = key, 0


@dataclass
class _Pair:
    """A 15-minute and a daily window with their limits."""

    limit_15min: int
    limit_daily: int

    def __post_init__(self) -> None:
        self.quarter, self.day = _Window(QUARTER_HOUR), _Window(DAY)

    def hit(self, now: float) -> bool:
        """Count one call (refused ones too); return whether it was within both limits."""
        quarter, day = self.quarter.hit(now), self.day.hit(now)
        return quarter <= self.limit_15min and day <= self.limit_daily

    def limit_header(self) -> str:
        return f"{self.limit_15min},{self.limit_daily}"

    def usage_header(self, now: float) -> str:
        return f"{self.quarter.usage(now)},{self.day.usage(now)}"

    def dump(self) -> dict[str, int]:
        return {
            "limit_15min": self.limit_15min,
            "limit_daily": self.limit_daily,
            "quarter_key": self.quarter.key,
            "quarter_count": self.quarter.count,
            "day_key": self.day.key,
            "day_count": self.day.count,
        }

    def load(self, data: dict[str, int]) -> None:
        self.limit_15min, self.limit_daily = data["limit_15min"], data["limit_daily"]
        self.quarter.key, self.quarter.count = data["quarter_key"], data["quarter_count"]
        self.day.key, self.day.count = data["day_key"], data["day_count"]


class RateLimiter:
    """Counts rate-counted calls and refuses those over a limit, as Strava does.

    Every call counts, rejected ones included, as Strava counts rejected calls toward the daily total.
    Epoch multiples of 900 s and 86400 s are exactly the :00/:15/:30/:45 and midnight UTC boundaries.
    """

    def __init__(
        self, limits: tuple[int, int] = DEFAULT_LIMITS, read_limits: tuple[int, int] = DEFAULT_READ_LIMITS
    ) -> None:
        self._initial = (limits, read_limits)
        self.reset()

    def reset(self) -> None:
        """Back to the limits the sandbox started with, and empty windows."""
        limits, read_limits = self._initial
        self.overall, self.read = _Pair(*limits), _Pair(*read_limits)

    def configure(
        self,
        *,
        limit_15min: int | None = None,
        limit_daily: int | None = None,
        read_limit_15min: int | None = None,
        read_limit_daily: int | None = None,
    ) -> None:
        """Change the limits given (None keeps one); the windows' counts stay."""
        self.overall.limit_15min = self.overall.limit_15min if limit_15min is None else limit_15min
        self.overall.limit_daily = self.overall.limit_daily if limit_daily is None else limit_daily
        self.read.limit_15min = self.read.limit_15min if read_limit_15min is None else read_limit_15min
        self.read.limit_daily = self.read.limit_daily if read_limit_daily is None else read_limit_daily

    def limits(self) -> dict[str, int]:
        return {
            "limit_15min": self.overall.limit_15min,
            "limit_daily": self.overall.limit_daily,
            "read_limit_15min": self.read.limit_15min,
            "read_limit_daily": self.read.limit_daily,
        }

    def hit(self, now: float, *, read: bool) -> tuple[bool, dict[str, str]]:
        """Count one call; return whether it is allowed and the X-RateLimit headers to send."""
        allowed = self.overall.hit(now)
        if read:
            allowed = self.read.hit(now) and allowed
        return allowed, self.headers(now)

    def headers(self, now: float) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": self.overall.limit_header(),
            "X-RateLimit-Usage": self.overall.usage_header(now),
            "X-ReadRateLimit-Limit": self.read.limit_header(),
            "X-ReadRateLimit-Usage": self.read.usage_header(now),
        }

    def dump(self) -> dict[str, Any]:
        return {"overall": self.overall.dump(), "read": self.read.dump()}

    def load(self, data: dict[str, Any]) -> None:
        self.overall.load(data["overall"])
        self.read.load(data["read"])


def parse_pair(text: str) -> tuple[int, int]:
    """`"200,2000"` → (200, 2000), for the command line. Raises ValueError for anything else."""
    first, _, second = text.partition(",")
    try:
        pair = (int(first), int(second))
    except ValueError:
        pair = (-1, -1)
    if min(pair) < 0:
        raise ValueError(f"expected two non-negative integers like 200,2000, not {text!r}")
    return pair
