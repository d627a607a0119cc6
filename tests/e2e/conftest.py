"""Fixtures for tests across real processes (Postgres required: that is where processes share state)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import processes
from tests.e2e.processes import Process, start_sandbox
from tokensvc.crypto import generate_key

API_KEY = "e2e-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def sandbox_process(tmp_path: Path) -> Iterator[Process]:
    process = start_sandbox(tmp_path)
    yield process
    process.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A client for the processes, with the service API key and room for hundreds of concurrent calls."""
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=AUTH) as client:
        yield client


def service_env(database_url: str, sandbox: Process, **extra: str) -> dict[str, str]:
    """The settings of a `tokensvc serve` replica talking to the sandbox process: `processes.service_env` with this
    suite's API key, a new encryption key and INFO logs."""
    return processes.service_env(
        database_url, sandbox.url, api_key=API_KEY, key=generate_key(), **({"TOKENSVC_LOG_LEVEL": "INFO"} | extra)
    )


async def seed_user(http: httpx.AsyncClient, sandbox: Process, replica: Process, user_id: str, expires_in: int) -> Any:
    """An athlete connected in the sandbox whose pair is imported into tokensvc through `replica`."""
    athlete = (await http.post(f"{sandbox.url}/_control/athletes", json={"expires_in": expires_in})).json()
    response = await http.put(
        f"{replica.url}/v1/users/{user_id}/tokens",
        json={k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")},
    )
    assert response.status_code == 200, response.text
    return athlete


async def sandbox_stats(http: httpx.AsyncClient, sandbox: Process) -> Any:
    return (await http.get(f"{sandbox.url}/_control/stats")).json()
