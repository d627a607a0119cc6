"""Fixtures for the fault matrix: a throwaway Postgres cluster (session), a database per test, the sandbox as a
process, service replicas as processes, and a client that records every answer the service gave.

Missing Postgres binaries skip these tests, unless `TOKENSVC_REQUIRE_POSTGRES=1` (CI), where they fail.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REQUIRE_POSTGRES
from tests.e2e.conftest import AUTH, service_env
from tests.e2e.processes import Process, start_sandbox, start_service
from tests.reliability.cluster import Cluster, postgres_bin_dir
from tests.reliability.invariants import Harness, Recorder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a reliability test on Postgres starting processes."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.postgres)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The throwaway cluster, shared by the session (stopped and removed at the end)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        message = "no Postgres server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    made = Cluster(bin_dir)
    try:
        made.start()
        yield made
    finally:
        made.destroy()


@pytest.fixture
def database(cluster: Cluster) -> Iterator[str]:
    """An empty database for one test (the first replica migrates it); yields its name. The cluster is running
    again afterwards whatever the test did to it."""
    name = f"rel_{uuid.uuid4().hex[:12]}"
    cluster.psql(f"CREATE DATABASE {name}")
    yield name
    if not cluster.running:
        cluster.start()
    cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sandbox_process(tmp_path: Path) -> Iterator[Process]:
    process = start_sandbox(tmp_path)
    yield process
    process.stop()


@pytest.fixture
async def http(sandbox_process: Process) -> AsyncIterator[Recorder]:
    """A client with the service API key that records every answer from anything but the sandbox."""
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=90, limits=limits, headers=AUTH) as client:
        yield Recorder(client, sandbox_url=sandbox_process.url)


ServiceFactory = Callable[..., Process]


@pytest.fixture
def base_env(cluster: Cluster, database: str, sandbox_process: Process) -> dict[str, str]:
    """The replicas' settings: this test's database, the sandbox, one encryption key for all."""
    return service_env(cluster.url(database), sandbox_process)


@pytest.fixture
def harness(
    http: Recorder, sandbox_process: Process, cluster: Cluster, database: str, base_env: dict[str, str]
) -> Harness:
    return Harness(http, sandbox_process, cluster, database, base_env["TOKENSVC_ENCRYPTION_KEYS"])


@pytest.fixture
def services(base_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start replicas with `make(name, strava_url=None, **TOKENSVC_settings)`; all are stopped at the end."""
    started: list[Process] = []
    base = base_env

    def make(name: str, *, strava_url: str | None = None, **extra: str) -> Process:
        env = base | extra
        if strava_url is not None:
            env["TOKENSVC_STRAVA_BASE_URL"] = strava_url
        process = start_service(name, tmp_path, env)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()
