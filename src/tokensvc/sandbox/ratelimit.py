"""Strava's per-application request windows (quarter hours and UTC days), driven by the injected clock."""

from __future__ import annotations

from dataclasses import dataclass

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


class RateLimiter:
    """Counts rate-counted calls; rejects only once limits are configured (off by default).

    Every call counts, rejected ones included, as Strava counts rejected calls toward the daily total.
    Epoch multiples of 900 s and 86400 s are exactly the :00/:15/:30/:45 and midnight UTC boundaries.
    """

    def __init__(self) -> None:
        self.limit_15min: int | None = None
        self.limit_daily: int | None = None
        self.reset()

    def reset(self) -> None:
        self.limit_15min = self.limit_daily = None
        self._quarter, self._day = _Window(QUARTER_HOUR), _Window(DAY)
        self._read_quarter, self._read_day = _Window(QUARTER_HOUR), _Window(DAY)

    def configure(self, limit_15min: int | None, limit_daily: int | None) -> None:
        self.limit_15min, self.limit_daily = limit_15min, limit_daily

    def hit(self, now: float, *, read: bool) -> tuple[bool, dict[str, str]]:
        """Count one call; return whether it is allowed and the X-RateLimit headers to send."""
        quarter, day = self._quarter.hit(now), self._day.hit(now)
        if read:
            self._read_quarter.hit(now)
            self._read_day.hit(now)
        allowed = not (
            (self.limit_15min is not None and quarter > self.limit_15min)
            or (self.limit_daily is not None and day > self.limit_daily)
        )
        return allowed, self.headers(now)

    def headers(self, now: float) -> dict[str, str]:
        limit_15 = self.limit_15min if self.limit_15min is not None else DEFAULT_LIMITS[0]
        limit_day = self.limit_daily if self.limit_daily is not None else DEFAULT_LIMITS[1]
        read_15 = self.limit_15min if self.limit_15min is not None else DEFAULT_READ_LIMITS[0]
        read_day = self.limit_daily if self.limit_daily is not None else DEFAULT_READ_LIMITS[1]
        return {
            "X-RateLimit-Limit": f"{limit_15},{limit_day}",
            "X-RateLimit-Usage": f"{self._quarter.usage(now)},{self._day.usage(now)}",
            "X-ReadRateLimit-Limit": f"{read_15},{read_day}",
            "X-ReadRateLimit-Usage": f"{self._read_quarter.usage(now)},{self._read_day.usage(now)}",
        }
