"""The application factory. The lifespan owns the engine, the Strava client and the token service."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import structlog
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc import __version__
from tokensvc.api import health, problems, tokens
from tokensvc.api.deps import ApiKeys
from tokensvc.api.limits import BodySizeLimit
from tokensvc.config import Settings
from tokensvc.crypto import TokenCipher
from tokensvc.db import make_engine
from tokensvc.providers.strava import StravaClient
from tokensvc.service.tokens import Clock, TokenService

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Resources:
    engine: AsyncEngine
    strava: StravaClient
    service: TokenService


@asynccontextmanager
async def open_resources(
    settings: Settings, *, clock: Clock = time.time, strava_transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[Resources]:
    """Engine, Strava client and token service for a prepared `Settings`; closed in reverse order."""
    engine = make_engine(
        settings.database_url, pool_size=settings.db_pool_size, lock_timeout_seconds=settings.lock_timeout_seconds
    )
    strava = StravaClient(
        base_url=settings.strava_base_url,
        client_id=settings.strava_client_id or "",
        client_secret=settings.strava_client_secret.get_secret_value() if settings.strava_client_secret else "",
        timeout=settings.strava_timeout_seconds,
        transport=strava_transport,
        clock=clock,
    )
    service = TokenService(
        engine=engine,
        cipher=TokenCipher([k.get_secret_value() for k in settings.encryption_keys]),
        strava=strava,
        clock=clock,
        buffer_seconds=settings.refresh_buffer_seconds,
        lock_timeout_seconds=settings.lock_timeout_seconds,
    )
    try:
        yield Resources(engine, strava, service)
    finally:
        await service.aclose()
        await strava.aclose()
        await engine.dispose()


def create_app(
    settings: Settings,
    *,
    sandbox: bool = False,
    clock: Clock = time.time,
    strava_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the ASGI app from prepared settings (see `config.prepare`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_resources(settings, clock=clock, strava_transport=strava_transport) as res:
            app.state.engine = res.engine
            app.state.token_service = res.service
            log.info("service.started", strava_base_url=settings.strava_base_url, sandbox=sandbox)
            yield
        log.info("service.stopped")

    app = FastAPI(
        title="tokensvc",
        version=__version__,
        summary="Keeps Strava OAuth tokens fresh for every user of an application.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_keys = ApiKeys([k.get_secret_value() for k in settings.api_keys])
    problems.install(app)
    app.include_router(health.router)
    app.include_router(tokens.router)
    if sandbox:
        from tokensvc.sandbox import create_sandbox_app

        app.mount(
            "/sandbox/strava",
            create_sandbox_app(
                client_id=settings.strava_client_id or "",
                client_secret=settings.strava_client_secret.get_secret_value() if settings.strava_client_secret else "",
            ),
        )
    app.add_middleware(BodySizeLimit)
    return app
