"""Behind a transaction-mode pooler (PgBouncer): with TOKENSVC_DB_STATEMENT_CACHE=false and TOKENSVC_TOKEN_CACHE=false
the service serves mixed traffic with no error; with the statement cache on, the same traffic breaks (which is why
the setting exists). Real processes: PgBouncer, `tokensvc serve`, the sandbox."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PG_ADMIN_URL, REQUIRE_POSTGRES
from tests.e2e.conftest import service_env
from tests.e2e.pooler import Pooler, pgbouncer_binary
from tests.e2e.processes import Process, start_service, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

USERS = 12
WORKERS = 16
CALLS = 30


@pytest.fixture
def pooler(pg_template: str) -> Iterator[Pooler]:
    """PgBouncer in transaction mode with three server connections. `lock_timeout` is ignored as a startup
    parameter only so that the statement cache is the one difference between the two tests."""
    binary = pgbouncer_binary()
    if binary is None:
        message = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    pooler = Pooler(binary, PG_ADMIN_URL, pool_size=3, ignore=("lock_timeout",))
    yield pooler
    pooler.stop()


async def mixed_traffic(http: httpx.AsyncClient, service: Process, users: list[str]) -> Counter[int]:
    """WORKERS callers, CALLS requests each: access tokens, statuses, forced refreshes, stats, readiness."""
    statuses: Counter[int] = Counter()

    async def worker(n: int) -> None:
        for call in range(CALLS):
            user_id = users[(n + call) % len(users)]
            kind = (n + call) % 10
            if kind == 0:
                response = await http.post(f"{service.url}/v1/users/{user_id}/refresh?force=true")
            elif kind == 1:
                response = await http.get(f"{service.url}/v1/stats")
            elif kind == 2:
                response = await http.get(f"{service.url}/readyz")
            elif kind < 6:
                response = await http.get(f"{service.url}/v1/users/{user_id}/token-status")
            else:
                response = await http.get(f"{service.url}/v1/users/{user_id}/access-token")
            statuses[response.status_code] += 1

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))
    return statuses


async def run_behind(
    pooler: Pooler, database_url: str, sandbox: Process, http: httpx.AsyncClient, tmp_path: Path, *, cache: str
) -> tuple[Counter[int], str]:
    env = service_env(
        pooler.url(database_url),
        sandbox,
        TOKENSVC_DB_STATEMENT_CACHE=cache,
        TOKENSVC_TOKEN_CACHE="false",  # LISTEN does not pass a transaction-mode pooler
    )
    service = start_service(f"behind-pooler-{cache}", tmp_path, env)
    try:
        await wait_ready(service)
        users = [f"pooled-{i}" for i in range(USERS)]
        statuses: Counter[int] = Counter()
        for user_id in users:
            athlete = (await http.post(f"{sandbox.url}/_control/athletes", json={"expires_in": 6 * 3600})).json()
            body = {k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
            statuses[(await http.put(f"{service.url}/v1/users/{user_id}/tokens", json=body)).status_code] += 1
        statuses += await mixed_traffic(http, service, users)
    finally:
        service.stop()
    return statuses, service.log.read_text(errors="replace")


class TestBehindPgBouncer:
    async def test_with_the_statement_cache_off_everything_answers(
        self, pooler: Pooler, empty_pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """Migrations, imports and 480 mixed requests through PgBouncer: every answer a 2xx, no statement error."""
        statuses, log = await run_behind(pooler, empty_pg_url, sandbox_process, http, tmp_path, cache="false")
        assert set(statuses) == {200}, statuses
        assert sum(statuses.values()) == USERS + WORKERS * CALLS
        assert "prepared statement" not in log

    async def test_with_the_statement_cache_on_the_same_traffic_breaks(
        self, pooler: Pooler, empty_pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """The control: asyncpg's named, cached statements meet other clients' on PgBouncer's shared server
        connections, and requests fail."""
        statuses, log = await run_behind(pooler, empty_pg_url, sandbox_process, http, tmp_path, cache="true")
        assert set(statuses) != {200}, statuses
        # asyncpg: "prepared statement ... does not exist" / "already exists" on a server connection it did not use
        assert "InvalidSQLStatementNameError" in log or "DuplicatePreparedStatementError" in log
