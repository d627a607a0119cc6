"""Fixtures for tests across real processes (Postgres required: that is where processes share state)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL, _admin, run_isolated, sqlalchemy_pg_url
from tests.e2e.processes import Process, start_sandbox


@pytest.fixture
def empty_pg_url(pg_template: str) -> Iterator[str]:
    """A Postgres database with no schema: the replicas' start-up migration builds it."""
    name = f"tokensvc_e_{uuid.uuid4().hex[:12]}"
    run_isolated(_admin(f"CREATE DATABASE {name}"))
    yield sqlalchemy_pg_url(PG_ADMIN_URL, name)
    run_isolated(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def sandbox_process(tmp_path: Path) -> Iterator[Process]:
    process = start_sandbox(tmp_path)
    yield process
    process.stop()
