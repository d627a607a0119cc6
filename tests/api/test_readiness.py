"""Readiness tells the truth, fast: it answers within a second however busy the main pool, and fails from the
moment shutdown begins."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import FakeClock, make_settings
from tokensvc.app import create_app


@pytest.fixture
async def app(pg_url: str, clock: FakeClock, strava_transport: httpx.AsyncBaseTransport) -> AsyncIterator[FastAPI]:
    application = create_app(make_settings(pg_url, db_pool_size=1), clock=clock, strava_transport=strava_transport)
    async with LifespanManager(application):
        yield application


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tokensvc.test") as client:
        yield client


@pytest.mark.postgres
class TestReadiness:
    async def test_readiness_answers_at_once_while_the_main_pool_is_exhausted(
        self, app: FastAPI, http: httpx.AsyncClient
    ) -> None:
        """Every connection of the main pool (Postgres, TOKENSVC_DB_POOL_SIZE=1) is checked out: /readyz still
        says ok within 1 s."""
        engine: AsyncEngine = app.state.engine
        async with engine.connect():
            started = time.perf_counter()
            response = await http.get("/readyz")
            elapsed = time.perf_counter() - started
        assert response.status_code == 200
        assert elapsed < 1.0

    async def test_readiness_fails_from_the_moment_shutdown_begins(self, app: FastAPI, http: httpx.AsyncClient) -> None:
        """After SIGTERM (here: the shutdown's start) the replica says it is not ready, with Retry-After;
        liveness still answers."""
        assert (await http.get("/readyz")).status_code == 200
        app.state.shutdown.begin()
        response = await http.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"status": "shutting_down"}
        assert response.headers["retry-after"]
        assert (await http.get("/healthz")).status_code == 200
