"""Deliver the notification outbox to TOKENSVC_NOTIFY_URL, signed the Standard Webhooks way, in every replica.

Each pass claims due rows (`store.outbox.claim_due`: a lease, and `SKIP LOCKED` on Postgres, so replicas never send
one row at the same time), POSTs each stored payload byte for byte with `webhook-id` (the row id, the same on every
attempt), `webhook-timestamp` and `webhook-signature`, and records the result: 2xx is delivered; anything else,
a connection error or a timeout is retried with jittered exponential backoff (first delay doubling up to a cap),
for as long as it takes; nothing is ever dropped. A row is claimed only after the change that wrote it committed,
so a crash loses nothing: what was not marked delivered is sent by the next pass, here or in another replica.

Delivery is at least once: a process killed between the receiver's 2xx and the mark sends that one again once its
lease has run out. The loop polls every `poll_seconds` (one range scan of the partial index of undelivered rows),
which is what bounds the delay after a commit; `wake()` starts a pass at once.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import httpx
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook

from tokensvc.background import STOP_DEADLINE_SECONDS, PeriodicJob
from tokensvc.backoff import backoff_seconds
from tokensvc.clock import Clock
from tokensvc.metrics import NOTIFICATIONS_TOTAL
from tokensvc.store import outbox
from tokensvc.store.outbox import Claimed

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class DeliveryReport:
    delivered: int = 0
    failed: int = 0


class NotificationDeliverer:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        url: str,
        secret: str,
        clock: Clock,
        timeout_seconds: float = 10.0,
        poll_seconds: float = 1.0,
        concurrency: int = 4,
        backoff_seconds: float = 5.0,
        backoff_max_seconds: float = 3600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._engine = engine
        self.url = url
        self._webhook = Webhook(secret)
        self._clock = clock
        self.concurrency = concurrency
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        # Longer than any one attempt (the POST's timeout, then the write of its result), so a live attempt's row
        # is never claimed again; after a crash, the row waits this long before another delivery.
        self.lease_seconds = math.ceil(2 * timeout_seconds) + 5
        self._http = httpx.AsyncClient(timeout=timeout_seconds, transport=transport, follow_redirects=False)
        self._stopping = asyncio.Event()
        self._job = PeriodicJob("notifier", self.deliver_due, interval_seconds=poll_seconds, jitter=0)

    async def deliver_due(self) -> DeliveryReport:
        """Claim and deliver every notification due now, `concurrency` at a time; return how the attempts ended.
        Stops claiming once `stop` was asked, and lets the attempts in flight finish."""
        report = DeliveryReport()
        while not self._stopping.is_set():
            now = int(self._clock())
            async with self._engine.begin() as conn:
                batch = await outbox.claim_due(
                    conn, now=now, limit=self.concurrency, lease_until=now + self.lease_seconds
                )
            async with asyncio.TaskGroup() as group:
                for claimed in batch:
                    group.create_task(self._deliver(claimed, report))
            if len(batch) < self.concurrency:
                break
        return report

    async def _deliver(self, claimed: Claimed, report: DeliveryReport) -> None:
        attempt = claimed.attempts + 1
        status: int | None = None
        sent_at = self._clock()
        try:
            response = await self._http.post(
                self.url, content=claimed.payload.encode(), headers=self._headers(claimed, sent_at)
            )
            status = response.status_code
            error = None if response.is_success else f"HTTP {status}"
        except httpx.HTTPError as exc:  # connection refused, timeout, protocol error: all worth a retry
            error = type(exc).__name__
        retry_in = 0.0
        try:
            async with self._engine.begin() as conn:
                if error is None:
                    await outbox.mark_delivered(conn, claimed.id, at=datetime.fromtimestamp(self._clock(), UTC))
                else:
                    retry_in = backoff_seconds(attempt, first=self.backoff_seconds, cap=self.backoff_max_seconds)
                    retry_at = math.ceil(self._clock() + retry_in)
                    await outbox.mark_failed(conn, claimed.id, error=error, retry_at=retry_at)
        except (DBAPIError, OSError, asyncpg.PostgresError) as exc:
            # The lease runs out and the row is attempted again: a second delivery if this one had succeeded.
            log.error("notification.result_not_recorded", id=claimed.id, attempt=attempt, error=type(exc).__name__)
            return
        if error is None:
            report.delivered += 1
            NOTIFICATIONS_TOTAL.labels(claimed.event_type, "delivered").inc()
            log.info("notification.delivered", id=claimed.id, type=claimed.event_type, attempt=attempt, status=status)
        else:
            report.failed += 1
            NOTIFICATIONS_TOTAL.labels(claimed.event_type, "failed").inc()
            log.warning(
                "notification.delivery_failed",
                id=claimed.id,
                type=claimed.event_type,
                attempt=attempt,
                status=status,
                error=error,
                retry_in_seconds=round(retry_in, 1),
            )

    def _headers(self, claimed: Claimed, sent_at: float) -> dict[str, str]:
        timestamp = datetime.fromtimestamp(math.floor(sent_at), UTC)
        return {
            "content-type": "application/json",
            "webhook-id": claimed.id,
            "webhook-timestamp": str(math.floor(sent_at)),
            "webhook-signature": self._webhook.sign(claimed.id, timestamp, claimed.payload),
        }

    # -- the background loop ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Deliver every `poll_seconds` (and on `wake`) until `stop`."""
        self._job.start()

    def wake(self) -> None:
        """Start a pass now rather than at the next poll."""
        self._job.wake()

    async def stop(self, *, deadline_seconds: float = STOP_DEADLINE_SECONDS) -> None:
        """Claim nothing more, let the attempts in flight record their result (within `deadline_seconds`), end the
        loop, close the client. Whatever is still due is delivered after the next start, here or by another
        replica."""
        self._stopping.set()
        await self._job.stop(deadline_seconds=deadline_seconds)
        await self._http.aclose()
