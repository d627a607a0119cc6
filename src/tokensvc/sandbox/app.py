"""The sandbox as an ASGI app that works at the root of its own server or mounted under a prefix."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from fastapi import FastAPI

from .control import control_router
from .oauth import strava_router
from .state import SandboxState
from .subscriptions import push_router


def create_sandbox_app(
    *,
    client_id: str = "sandbox-client",
    client_secret: str = "sandbox-secret",
    clock: Callable[[], float] = time.time,
    rotate: bool = True,
    push_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build a fresh sandbox; its world is `app.state.sandbox`. Nothing depends on lifespan, so mounting works.

    `push_transport` (tests) carries the webhook requests the sandbox makes to a subscription's callback.
    """
    state = SandboxState(
        client_id=client_id, client_secret=client_secret, clock=clock, rotate=rotate, push_transport=push_transport
    )
    app = FastAPI(title="Strava sandbox", docs_url=None, redoc_url=None)
    app.state.sandbox = state
    app.include_router(strava_router(state))
    app.include_router(push_router(state))
    app.include_router(control_router(state))
    return app
