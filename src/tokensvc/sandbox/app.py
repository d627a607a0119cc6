"""The sandbox as an ASGI app that works at the root of its own server or mounted under a prefix."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI

from .control import control_router
from .oauth import strava_router
from .state import SandboxState


def create_sandbox_app(
    *,
    client_id: str = "sandbox-client",
    client_secret: str = "sandbox-secret",
    clock: Callable[[], float] = time.time,
    rotate: bool = True,
) -> FastAPI:
    """Build a fresh sandbox; its world is `app.state.sandbox`. Nothing depends on lifespan, so mounting works."""
    state = SandboxState(client_id=client_id, client_secret=client_secret, clock=clock, rotate=rotate)
    app = FastAPI(title="Strava sandbox", docs_url=None, redoc_url=None)
    app.state.sandbox = state
    app.include_router(strava_router(state))
    app.include_router(control_router(state))
    return app
