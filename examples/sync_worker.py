"""A sync worker that starts from tokensvc's forwarded Strava events and reads Strava through tokensvc's gateway.

    python examples/sync_worker.py --tokensvc-url http://127.0.0.1:8000 --api-key KEY \\
        --notify-secret whsec_... --port 8080 [--record synced.jsonl]

then set tokensvc's `TOKENSVC_NOTIFY_URL=http://<this host>:8080/hooks/tokensvc` (and `TOKENSVC_NOTIFY_SECRET` to
the same secret). Needs `httpx`, `standardwebhooks`, `starlette` and `uvicorn` (all in tokensvc's environment).

The pattern:
1. Verify each delivery's signature (Standard Webhooks) on the raw body; anything else is a 401.
2. Drop a `webhook-id` already handled (tokensvc delivers at least once), queue the event, answer 204 at once:
   a receiver slower than `TOKENSVC_NOTIFY_TIMEOUT_SECONDS` is retried.
3. Order by `data.event_time`, not by arrival: an event older than the last one applied to the same activity
   (a create arriving after its delete, say) is stale and skipped.
4. Fetch what changed through the gateway, `GET /v1/users/{user}/strava/activities/{id}` with
   `Tokensvc-Priority: sync` (the app's shared Strava limits, leaving room for interactive calls), waiting
   `Retry-After` on 429 / 503 a bounded number of times. tokensvc injects the user's token, refreshes it when
   Strava rejects it, and never lets a worker see it.

State (handled ids, event times, the queue) is in memory here; a real app keeps it in its database, and
`record()` is where it would store the activity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote

import httpx
import uvicorn
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("sync_worker")

MAX_BODY_BYTES = 64 * 1024  # a forwarded event is well under 1 KiB
MAX_ATTEMPTS = 5  # per fetch: the first try and up to four waits on 429 / 503 / tokensvc unreachable
MAX_WAIT_SECONDS = 900.0  # longest Retry-After honoured (a 15-minute window); beyond it, try the event later
SEEN_IDS = 10_000  # handled webhook-ids remembered
EVENT_TYPES = frozenset(
    {"strava.activity.created", "strava.activity.updated", "strava.activity.deleted", "strava.athlete.updated"}
)


@dataclass(frozen=True)
class Event:
    webhook_id: str
    type: str
    user_id: str
    object_id: int
    event_time: int

    @classmethod
    def parse(cls, webhook_id: str, payload: dict[str, Any]) -> Event:
        data = payload["data"]
        return cls(webhook_id, payload["type"], data["user_id"], int(data["object_id"]), int(data["event_time"]))


class EventOrder:
    """Per user and object, the newest `event_time` applied and whether it was a delete."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str, int], tuple[int, bool]] = {}

    def admit(self, event: Event) -> bool:
        """True when `event` is not older than what was applied to its object (and records it)."""
        key = (event.user_id, event.type.rsplit(".", 2)[1], event.object_id)
        last = self._last.get(key)
        if last is not None and (event.event_time < last[0] or (event.event_time == last[0] and last[1])):
            return False
        self._last[key] = (event.event_time, event.type == "strava.activity.deleted")
        return True


class Recorder:
    """What the worker did, one JSON object a line (stands in for the app's own database)."""

    def __init__(self, sink: IO[str]) -> None:
        self._sink = sink

    def __call__(self, kind: str, **fields: Any) -> None:
        self._sink.write(json.dumps({"kind": kind, **fields}) + "\n")
        self._sink.flush()


def retry_after(response: httpx.Response | None, attempt: int) -> float:
    """The wait tokensvc asks for, or an exponential one when it gave none (or was unreachable)."""
    if response is not None:
        try:
            return max(0.0, float(response.headers["retry-after"]))
        except (KeyError, ValueError):
            pass
    return float(2**attempt)


async def fetch_activity(
    http: httpx.AsyncClient, user_id: str, activity_id: int, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
) -> httpx.Response | None:
    """The activity through the gateway; None when tokensvc still refuses (429 / 503) after MAX_ATTEMPTS or asks
    for a longer wait than MAX_WAIT_SECONDS."""
    url = f"/v1/users/{quote(user_id, safe='')}/strava/activities/{activity_id}"
    for attempt in range(MAX_ATTEMPTS):
        response: httpx.Response | None = None
        try:
            response = await http.get(url, headers={"Tokensvc-Priority": "sync"})
        except httpx.TransportError as exc:
            log.warning("tokensvc unreachable (%s), attempt %d", type(exc).__name__, attempt + 1)
        if response is not None and response.status_code not in (429, 503):
            return response
        wait = retry_after(response, attempt)
        if attempt + 1 == MAX_ATTEMPTS or wait > MAX_WAIT_SECONDS:
            return None
        await sleep(wait)
    return None


async def handle(http: httpx.AsyncClient, event: Event, record: Recorder) -> None:
    """Apply one admitted event: fetch a created or updated activity, forget a deleted one."""
    if event.type == "strava.activity.deleted":
        record("deleted", user_id=event.user_id, activity_id=event.object_id)
        return
    if event.type == "strava.athlete.updated":
        record("athlete_updated", user_id=event.user_id, athlete_id=event.object_id)  # e.g. re-read the profile
        return
    response = await fetch_activity(http, event.user_id, event.object_id)
    if response is None:  # a real app leaves the event in its queue for later
        record("deferred", user_id=event.user_id, activity_id=event.object_id)
        return
    body = response.json()
    if response.status_code == 200:
        record("fetched", user_id=event.user_id, activity_id=event.object_id, status=200, activity=body)
    else:  # 404: deleted or private since; 409 reauth_required / 403 insufficient_scope: the user must reconnect
        code = body.get("code") if isinstance(body, dict) else None
        record("refused", user_id=event.user_id, activity_id=event.object_id, status=response.status_code, code=code)


async def consume(queue: asyncio.Queue[Event], http: httpx.AsyncClient, record: Recorder) -> None:
    """One consumer: events are applied one at a time, in `event_time` order per object. A wait on 429 holds every
    user's events, as it should: the spent window is the app's, not the user's."""
    order = EventOrder()
    while True:
        event = await queue.get()
        try:
            if order.admit(event):
                await handle(http, event, record)
            else:
                record("stale", webhook_id=event.webhook_id, type=event.type, event_time=event.event_time)
        except Exception:  # one bad event must not stop the worker
            log.exception("event %s failed", event.webhook_id)
        finally:
            queue.task_done()


def make_app(tokensvc_url: str, api_key: str, notify_secret: str, record: Recorder) -> Starlette:
    webhook = Webhook(notify_secret)
    queue: asyncio.Queue[Event] = asyncio.Queue()
    seen: OrderedDict[str, None] = OrderedDict()

    async def receive(request: Request) -> Response:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return Response(status_code=413)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:  # a chunked body declares no length
            return Response(status_code=413)
        try:
            payload = webhook.verify(body, dict(request.headers))  # the raw body, before any parsing
        except WebhookVerificationError:
            return Response(status_code=401)
        webhook_id = request.headers["webhook-id"]
        if webhook_id in seen:
            record("duplicate", webhook_id=webhook_id)
            return Response(status_code=204)
        record("received", webhook_id=webhook_id, type=payload.get("type"), data=payload.get("data"))
        if payload.get("type") in EVENT_TYPES:  # token.* notifications come here too (token.connected: a backfill)
            try:
                queue.put_nowait(Event.parse(webhook_id, payload))
            except (KeyError, TypeError, ValueError):  # signed, so retrying would not help: log and drop it
                log.error("malformed event %s", webhook_id)
        seen[webhook_id] = None
        if len(seen) > SEEN_IDS:
            seen.popitem(last=False)
        return Response(status_code=204)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queued": queue.qsize()})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(base_url=tokensvc_url, headers=headers, timeout=30) as http:
            consumer = asyncio.create_task(consume(queue, http, record))
            yield
            consumer.cancel()

    routes = [Route("/hooks/tokensvc", receive, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokensvc-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True, help="one of tokensvc's TOKENSVC_API_KEYS")
    parser.add_argument("--notify-secret", required=True, help="TOKENSVC_NOTIFY_SECRET (whsec_...)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--record", default="-", help="JSON-lines file of what was synced (default: stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sink = sys.stdout if args.record == "-" else open(args.record, "a", encoding="utf-8")
    try:
        app = make_app(args.tokensvc_url.rstrip("/"), args.api_key, args.notify_secret, Recorder(sink))
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if sink is not sys.stdout:
            sink.close()


if __name__ == "__main__":
    main()
