"""One deadline for a replica's shutdown, from the moment SIGTERM arrives (or the lifespan ends) to exit."""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger(__name__)


class Shutdown:
    """Readiness fails from `begin` on; everything the drain does shares what is left of `timeout_seconds`."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self._started: float | None = None

    def begin(self) -> None:
        """Shutdown has begun (idempotent): from now on the replica says it is not ready."""
        if self._started is None:
            self._started = time.monotonic()
            log.info("service.shutdown_started", deadline_seconds=self.timeout_seconds)

    @property
    def draining(self) -> bool:
        return self._started is not None

    def remaining(self) -> float:
        """Seconds left of the deadline (begins the shutdown if it had not begun)."""
        self.begin()
        assert self._started is not None
        return max(0.0, self._started + self.timeout_seconds - time.monotonic())
