"""Issue 12 item 1, the short version of bench/fleet.py: replicas at default settings on one throwaway Postgres
(max_connections = 100) under mixed load answer every call with a 2xx, and no replica ever holds more than the
connection budget (8 at defaults: engine pool 6, reader pool 1, the token cache's listener)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_POSTGRES
from tests.e2e.fleet import run_load, start_fleet
from tests.reliability.cluster import Cluster, postgres_bin_dir
from tokensvc.config import Settings

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPLICAS = 3
SECONDS = 15.0
CLIENTS = 48  # far more callers than the three replicas have connections: every pool is contended


@pytest.fixture
def small_cluster() -> Iterator[Cluster]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        message = "no Postgres server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    cluster = Cluster(bin_dir, max_connections=100)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


async def test_replicas_at_defaults_stay_within_the_connection_budget(small_cluster: Cluster, tmp_path: Path) -> None:
    budget = Settings(_env_file=None, database_url=small_cluster.url()).connection_budget
    assert budget == 8
    database = f"fleet_{uuid.uuid4().hex[:8]}"
    small_cluster.psql(f"CREATE DATABASE {database}")
    sandbox, replicas = await start_fleet(small_cluster.url(database), REPLICAS, tmp_path)
    try:
        report = await run_load(
            sandbox,
            replicas,
            dsn=small_cluster.url().replace("+asyncpg", ""),
            pg_port=small_cluster.port,
            users=60,
            clients=CLIENTS,
            seconds=SECONDS,
        )
    finally:
        for process in [*replicas, sandbox]:
            process.stop()
    print(report.summary())
    assert report.errors == [], report.errors[:20]
    assert report.samples > 10
    assert all(0 < peak <= budget for peak in report.peak_per_replica), report.peak_per_replica
    assert report.peak_total <= REPLICAS * budget
    for name in ("access", "status", "refresh", "connect", "webhook", "sweep"):
        assert report.calls[name] > 0, report.calls
