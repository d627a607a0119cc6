"""A fleet of `tokensvc serve` replicas on one Postgres under mixed load, counting their connections (issue 12).

Used by tests/e2e/test_fleet.py (a short run in CI) and bench/fleet.py (ten replicas, two minutes). Connections
are counted two ways while the load runs: the server's view (client backends in `pg_stat_activity`, the sampler's
own excluded) and each replica's own (its sockets to the Postgres port, read from /proc), so that the bound is
checked per replica and not only as a sum.

The load: access tokens, token status, forced refreshes, new users imported due (the background sweep, every
few seconds, refreshes them), explicit sweeps, and Strava webhook events (deauthorizations Strava does not
confirm, and activity events). Every answer must be a 2xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.e2e.processes import Process, clean_env, run_cli, service_env, start_replicas, start_sandbox
from tokensvc.crypto import generate_key

API_KEY = "fleet-key-0123456789abcdef"
VERIFY_TOKEN = "fleet-verify-token"
SAMPLE_EVERY_SECONDS = 0.1
# Not connection settings: a sweep every few seconds (so two minutes see many), a sandbox limit far above the load
# (a 429 from "Strava" would be an error of the load), webhooks on. The service's own budget stays at its default:
# token calls take no unit, and the webhook checks fit the background share.
LOAD_ENV = {
    "TOKENSVC_SWEEP_INTERVAL_SECONDS": "5",
    "TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN": VERIFY_TOKEN,
    "TOKENSVC_LOG_LEVEL": "WARNING",
}
SANDBOX_ARGS = ("--rate-limit", "1000000,10000000")
# (operation, weight): mostly reads, as in production.
MIX = (("access", 55), ("status", 15), ("refresh", 10), ("connect", 8), ("webhook", 10), ("sweep", 2))


@dataclass
class FleetReport:
    replicas: int
    seconds: float
    calls: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    peak_total: int = 0  # client backends in pg_stat_activity, at most, at one sample
    peak_per_replica: list[int] = field(default_factory=list)  # each replica's sockets to Postgres, at most
    samples: int = 0

    def summary(self) -> str:
        calls = ", ".join(f"{name} {count:,}" for name, count in sorted(self.calls.items()))
        return (
            f"{self.replicas} replicas, {self.seconds:.0f} s: {sum(self.calls.values()):,} calls ({calls}); "
            f"errors {len(self.errors)}; peak connections (pg_stat_activity) {self.peak_total}; peak per replica "
            f"{self.peak_per_replica} (max {max(self.peak_per_replica, default=0)}); {self.samples} samples"
        )


def connections_to(pid: int, port: int) -> int:
    """How many sockets process `pid` holds to TCP port `port` (its own descriptors matched in /proc/PID/net)."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


async def sample_connections(dsn: str, pg_port: int, pids: list[int], report: FleetReport, stop: asyncio.Event) -> None:
    """Until `stop`: every SAMPLE_EVERY_SECONDS, the server's count and each replica's, keeping the peaks."""
    report.peak_per_replica = [0] * len(pids)
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "fleet-sampler"})
    try:
        while not stop.is_set():
            total = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()"
            )
            report.peak_total = max(report.peak_total, int(total))
            for index, pid in enumerate(pids):
                report.peak_per_replica[index] = max(report.peak_per_replica[index], connections_to(pid, pg_port))
            report.samples += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=SAMPLE_EVERY_SECONDS)
    finally:
        await conn.close()


@dataclass
class Load:
    http: httpx.AsyncClient
    sandbox: Process
    replicas: list[Process]
    report: FleetReport
    rng: random.Random
    users: list[tuple[str, int]] = field(default_factory=list)  # (user id, athlete id)

    async def call(self, name: str, method: str, path: str, **kwargs: object) -> httpx.Response | None:
        replica = self.rng.choice(self.replicas)
        started = time.monotonic()
        try:
            response = await self.http.request(method, f"{replica.url}{path}", **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            cause = exc.__cause__.__cause__ if exc.__cause__ is not None else None
            elapsed = time.monotonic() - started
            self.report.errors.append(f"{name} {replica.name}: {type(exc).__name__} {cause!r} after {elapsed:.1f} s")
            return None
        self.report.calls[name] += 1
        if not 200 <= response.status_code < 300:
            self.report.errors.append(f"{name} {replica.name}: {response.status_code} {response.text[:200]}")
        return response

    async def connect(self, expires_in: int) -> None:
        """A new sandbox athlete, imported through a random replica; due for a refresh if `expires_in` is short."""
        athlete = await self.new_athlete(expires_in)
        user_id = f"fleet-{athlete['athlete_id']}"
        body = {k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
        response = await self.call("connect", "PUT", f"/v1/users/{user_id}/tokens", json=body)
        if response is not None and response.status_code == 200:
            self.users.append((user_id, athlete["athlete_id"]))

    async def new_athlete(self, expires_in: int) -> dict[str, Any]:
        """The sandbox's control API (the harness, not the service under test): a dropped connection is retried."""
        url = f"{self.sandbox.url}/_control/athletes"
        for _attempt in range(2):
            with contextlib.suppress(httpx.TransportError):
                response = await self.http.post(url, json={"expires_in": expires_in})
                athlete: dict[str, Any] = response.json()
                return athlete
        response = await self.http.post(url, json={"expires_in": expires_in})
        athlete = response.json()
        return athlete

    def webhook_event(self) -> dict[str, object]:
        _user, athlete_id = self.rng.choice(self.users)
        event: dict[str, object] = {"owner_id": athlete_id, "subscription_id": 1, "event_time": int(time.time())}
        if self.rng.random() < 0.5:  # a deauthorization Strava does not confirm: the athlete is still connected
            event |= {"object_type": "athlete", "object_id": athlete_id, "aspect_type": "update"}
            return event | {"updates": {"authorized": "false"}}
        return event | {"object_type": "activity", "object_id": self.rng.randrange(1, 10**9), "aspect_type": "create"}

    def operation(self, name: str) -> Awaitable[object]:
        user_id, _athlete = self.rng.choice(self.users)
        operations: dict[str, Callable[[], Awaitable[object]]] = {
            "access": lambda: self.call(name, "GET", f"/v1/users/{user_id}/access-token"),
            "status": lambda: self.call(name, "GET", f"/v1/users/{user_id}/token-status"),
            "refresh": lambda: self.call(name, "POST", f"/v1/users/{user_id}/refresh", params={"force": "true"}),
            "connect": lambda: self.connect(expires_in=self.rng.randrange(60, 1200)),
            "webhook": lambda: self.call(name, "POST", "/v1/webhooks/strava", json=self.webhook_event()),
            "sweep": lambda: self.call(name, "POST", "/v1/refresh-sweep"),
        }
        return operations[name]()

    async def client(self, deadline: float) -> None:
        names, weights = zip(*MIX, strict=True)
        while time.monotonic() < deadline:
            await self.operation(self.rng.choices(names, weights)[0])


async def start_fleet(database_url: str, count: int, out_dir: Path) -> tuple[Process, list[Process]]:
    """The sandbox and `count` replicas at default connection settings, the database migrated once first."""
    sandbox = start_sandbox(out_dir, *SANDBOX_ARGS)
    try:
        # Default connection settings (nothing about pools set) plus LOAD_ENV, which sets the sweep interval that
        # start_service would otherwise turn off.
        env = service_env(database_url, sandbox.url, api_key=API_KEY, key=generate_key(), **LOAD_ENV)
        migrated = await run_cli("migrate", env=clean_env(**env))
        assert migrated.returncode == 0, migrated.stderr
        return sandbox, await start_replicas(count, out_dir, env, "--no-migrate")
    except BaseException:
        sandbox.stop()
        raise


async def run_load(
    sandbox: Process, replicas: list[Process], *, dsn: str, pg_port: int, users: int, clients: int, seconds: float
) -> FleetReport:
    """Seed `users` (a fifth of them due), then `clients` concurrent callers for `seconds`, sampling connections."""
    report = FleetReport(replicas=len(replicas), seconds=seconds)
    # Every call on a new connection: with HTTP keep-alive, ten replicas starved of CPU (2 cores) reset a few reused
    # connections (httpx ReadError before any answer, 39 in 1,902 calls); that is uvicorn's keep-alive handling
    # under loop lag, not the connection budget this measures (bench/README.md).
    limits = httpx.Limits(max_connections=clients + 16, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as http:
        load = Load(http, sandbox, replicas, report, random.Random(12))
        seeds = [load.connect(expires_in=600 if n % 5 == 0 else 6 * 3600) for n in range(users)]
        for start in range(0, len(seeds), 32):
            await asyncio.gather(*seeds[start : start + 32])
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_connections(dsn, pg_port, [r.popen.pid for r in replicas], report, stop))
        try:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(load.client(deadline) for _ in range(clients)))
        finally:
            stop.set()
            await sampler
    return report
