"""Sweep at defaults: 3 `tokensvc serve` replicas on one Postgres refresh every due user of a large table.

Run from the repository root (every server setting at its default unless a flag sets it):

    .venv/bin/python bench/sweep.py --pg postgresql://postgres@127.0.0.1:5432
        [--replicas 3] [--users 100000] [--due 10000] [--latency-ms 200]
        [--concurrency N] [--token-concurrency N] [--batch-size N] [--pool-size N] [--server-env NAME=VALUE]
        [--server-python OTHER_TREE/.venv/bin/python]

What it does (see bench/README.md, "bench/sweep.py: the background sweeper"):
1. drops and recreates the Postgres database `tokensvc_sweepbench` and migrates it with `tokensvc migrate`;
2. starts the Strava sandbox (`python -m tokensvc.sandbox --port 0`) and creates one athlete per due user through
   its control API (`POST /_control/athletes`, concurrently), so the sandbox holds the refresh tokens tokensvc will
   present;
3. bulk-loads `--users` rows into `user_tokens` (asyncpg COPY; tokens encrypted here with `TokenCipher` and the
   key the server gets): `--due` of them expire in 5 minutes and are due for the sweeper, the rest expire in 6 h;
   then ANALYZE;
4. prints `EXPLAIN (ANALYZE, BUFFERS)` of the sweeper's real claim statement (`store.tokens.due_statement`) and
   fails unless it is an index scan on `ix_user_tokens_sweep`;
5. makes every sandbox refresh take `--latency-ms` (a `latency` fault), starts `--replicas` `tokensvc serve`
   (tests/e2e/processes.py) with the periodic sweeper off (TOKENSVC_SWEEP_INTERVAL_SECONDS=0: its default 300 s
   interval and jitter would be waited for, not measured) and sends `POST /v1/refresh-sweep` to every replica at
   once: the product's own sweep, one pass across the replicas (each claims disjoint batches). Meanwhile it samples
   every replica's RSS and the CPU of the replicas, the sandbox and Postgres;
6. verifies the outcome (every due user refreshed by that one pass, exactly one Strava call each, no failure, no
   `provider_rate_limited`, no stale refresh token presented to the sandbox, a second pass finds nothing) and
   prints wall time, refreshes/s against the ideal (replicas x the Strava calls a sweep keeps in flight / latency), peak
   RSS per replica (VmHWM) and server CPU per refresh (the replicas' CPU time summed / refreshes);
7. when the run misses a target (or with `--profile always`), makes the same users due again and profiles a
   second sweep with py-spy (server and sandbox), printing where the time goes.
The replicas and the sandbox are stopped and the database dropped in a `finally`, whatever happens.
`--server-python` runs migrate and the replicas with another tree's interpreter (a before/after measurement on the
same machine); seeding and checks stay this tree's.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import json
import os
import platform
import random
import re
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.e2e.processes

from benchlib import (
    BenchError,
    ProfilerError,
    cpu_model,
    drop_database,
    find_py_spy,
    git_revision,
    mem_total_gib,
    package_version,
    postgres_ticks,
    process_ticks,
    quoted_identifier,
    recreate_database,
    terminate_as_exit,
)
from tests.e2e.processes import Process, clean_env, start_sandbox, start_service, wait_ready

from tokensvc.config import Settings, normalize_database_url
from tokensvc.crypto import TokenCipher, generate_key
from tokensvc.db import make_engine
from tokensvc.store.tokens import due_statement

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
API_KEY = "sweepbench-key-0123"
CLIENT_ID = "sandbox-client"
CLIENT_SECRET = "sandbox-secret"  # the sandbox's built-in credentials (public on purpose)
USER_PREFIX = "sweep-user-"
SCOPES = "read,activity:read_all"
BUFFER_SECONDS = 1800  # TOKENSVC_REFRESH_BUFFER_SECONDS default; the server is left at it
DUE_EXPIRES_IN = 300  # due users: the access token expires in 5 minutes (inside the buffer)
NOT_DUE_EXPIRES_IN = 6 * 3600  # the others: a fresh Strava token (6 h), next due in ~5 h
NOT_DUE_ATHLETE_BASE = 50_000_000  # athlete ids of not-due users (they have no sandbox athlete: never refreshed)
SWEEP_TIMEOUT_SECONDS = 1800.0
READY_DEADLINE_SECONDS = 60.0
TIMELINE_SECONDS = 1.0
TARGET_RATIO = 0.8
TARGET_RSS_MB = 200.0
TARGET_CPU_MS = 3.0  # server CPU per refresh, summed over the replicas (issue 11)
LOADAVG_WARNING = 0.5
REST_WARNING = 25.0  # percent of a core busy outside the server, the sandbox, Postgres and this script
SEED_BATCH = 5_000
SEED_ATTEMPTS = 3
VERSIONED_PACKAGES = (
    "tokensvc",
    "uvicorn",
    "fastapi",
    "starlette",
    "pydantic",
    "sqlalchemy",
    "asyncpg",
    "httpx",
    "httpcore",
    "uvloop",
    "httptools",
    "cryptography",
    "python-multipart",
)
COLUMNS = (
    "user_id",
    "access_token_enc",
    "refresh_token_enc",
    "key_id",
    "expires_at",
    "athlete_id",
    "scopes",
    "reauth_reason",
    "last_refreshed_at",
    "created_at",
    "updated_at",
    "version",
    "sweep_at",
    "failure_count",
    "last_error",
)


# -- machine and versions ------------------------------------------------------------------------------------


def print_environment(pg_version: str, args: argparse.Namespace) -> dict[str, Any]:
    cpus = os.cpu_count() or 0
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load = os.getloadavg()
    packages = {name: package_version(name) for name in VERSIONED_PACKAGES}
    env: dict[str, Any] = {
        "nproc": nproc,
        "cpu_model": cpu_model(),
        "mem_total_gib": mem_total_gib(),
        "kernel": platform.release(),
        "loadavg_at_start": load,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": packages,
        "postgres": pg_version,
        "git": git_revision(),
    }
    mem = f", {env['mem_total_gib']:.1f} GiB RAM" if env["mem_total_gib"] else ""
    print("== machine")
    print(f"nproc {nproc}, CPU: {env['cpu_model']}{mem}, kernel {env['kernel']}")
    print(f"load average at start {', '.join(f'{x:.2f}' for x in load)}; server, sandbox and Postgres share these CPUs")
    if load[0] > LOADAVG_WARNING:
        print(f"WARNING: the machine was already busy (1-min load {load[0]:.2f}): figures may be low")
    print("== versions")
    print(f"python {env['python']}; postgres {pg_version}; tokensvc git {env['git']}")
    print("  ".join(f"{k} {v}" for k, v in packages.items()))
    print("== settings")
    print(
        f"replicas {args.replicas}, users {args.users:,}, due {args.due:,}, sandbox latency {args.latency_ms} ms;"
        f" TOKENSVC_SWEEP_CONCURRENCY {setting_text(args.concurrency, args.sweep_concurrency)},"
        f" TOKENSVC_STRAVA_TOKEN_CONCURRENCY {setting_text(args.token_concurrency, args.token_slots)},"
        f" TOKENSVC_SWEEP_BATCH_SIZE {setting_text(args.batch_size, None)},"
        f" TOKENSVC_DB_POOL_SIZE {setting_text(args.pool_size, None)}; extra server env {args.server_env_map or 'none'}"
    )
    if args.server_python != sys.executable:
        print(f"replicas and migrate run by {args.server_python}")
    return env


def setting_text(given: int | None, default: int | None) -> str:
    if given is not None:
        return f"{given} (set)"
    return f"default ({default})" if default is not None else "default"


# -- /proc: memory and CPU -----------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak RSS since the process started) of `pid`, in KiB; empty when it is gone."""
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return values


def system_ticks(pid: int) -> int:
    """stime alone: time in the kernel on the process's behalf (socket I/O; on loopback TCP, the send path
    also runs the receiver's network stack)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[12])


def machine_ticks() -> tuple[int, int]:
    """(busy jiffies, total jiffies) of the whole machine, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            total = sum(values[:8])  # guest time is already counted in user
            return total - values[3] - values[4], total  # minus idle and iowait
    return 0, 1


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuSnapshot:
    at: float
    server: int
    server_system: int
    sandbox: int
    postgres: dict[int, int]
    machine: tuple[int, int]
    bench: float

    @classmethod
    def take(cls, server_pids: Sequence[int], sandbox_pid: int) -> CpuSnapshot:
        """`server`: the replicas' ticks summed."""
        return cls(
            time.monotonic(),
            sum(process_ticks(pid) or 0 for pid in server_pids),
            sum(system_ticks(pid) for pid in server_pids),
            process_ticks(sandbox_pid) or 0,
            postgres_ticks(),
            machine_ticks(),
            self_cpu_seconds(),
        )


@dataclass
class CpuUsage:
    """CPU over an interval in percent of ONE core (the machine has `nproc` x 100 %).

    `postgres` counts the Postgres processes alive at the end (backends that exited meanwhile are missed and land in
    `rest`); `rest` is the machine's busy time outside the server, the sandbox, Postgres and this script.
    """

    server: float
    server_system: float
    sandbox: float
    postgres: float
    bench: float
    rest: float
    machine: float


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
    wall = max(after.at - before.at, 1e-9)

    def pct(ticks: int) -> float:
        return ticks / CLOCK_TICKS / wall * 100

    server = pct(after.server - before.server)
    sandbox = pct(after.sandbox - before.sandbox)
    pg = pct(sum(t - before.postgres.get(pid, 0) for pid, t in after.postgres.items()))
    bench = (after.bench - before.bench) / wall * 100
    busy = after.machine[0] - before.machine[0]
    total = max(after.machine[1] - before.machine[1], 1)
    machine = busy / total * (os.cpu_count() or 1) * 100
    return CpuUsage(
        server=round(server, 1),
        server_system=round(pct(after.server_system - before.server_system), 1),
        sandbox=round(sandbox, 1),
        postgres=round(pg, 1),
        bench=round(bench, 1),
        rest=round(max(machine - server - sandbox - pg - bench, 0.0), 1),
        machine=round(machine, 1),
    )


def describe_cpu(cpu: CpuUsage) -> str:
    return (
        f"server {cpu.server:.0f}% (of which kernel {cpu.server_system:.0f}%), sandbox {cpu.sandbox:.0f}%,"
        f" postgres {cpu.postgres:.0f}%, this script {cpu.bench:.0f}%, rest {cpu.rest:.0f}%;"
        f" whole machine {cpu.machine:.0f}% (of {(os.cpu_count() or 1) * 100}%)"
    )


# -- database ------------------------------------------------------------------------------------------------


def migrate(database_url: str, out_dir: Path, python: str) -> float:
    """`tokensvc migrate` in a subprocess; returns the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        [python, "-m", "tokensvc", "migrate"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env(TOKENSVC_DATABASE_URL=database_url, TOKENSVC_LOG_LEVEL="WARNING"),
        cwd=out_dir,  # no stray .env from the work tree
    )
    if done.returncode != 0:
        raise BenchError(f"`tokensvc migrate` failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
    return time.monotonic() - started


def user_id(n: int) -> str:
    return f"{USER_PREFIX}{n:06d}"


def sweep_at(uid: str, expires_at: int) -> int:
    """The same schedule as `TokenService.sweep_at` at the default buffer: inside the buffer plus a per-user jitter
    of up to half of it (a due user's is already past, a fresh one's is ~5 h away)."""
    spread = max(1, BUFFER_SECONDS // 2)
    jitter = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:4], "big") % spread
    return expires_at - BUFFER_SECONDS + jitter


@dataclass(frozen=True)
class Athlete:
    """A sandbox athlete as `/_control/athletes` seeded it (the tokens tokensvc must hold)."""

    athlete_id: int
    access_token: str
    refresh_token: str
    expires_at: int


def build_rows(users: int, due: dict[int, Athlete], key: str) -> list[tuple[Any, ...]]:
    """Every `user_tokens` row, encrypted exactly as the service encrypts (key, user id and field bound)."""
    cipher = TokenCipher([key])
    key_id = cipher.current_key_id
    now = int(time.time())
    now_dt = datetime.fromtimestamp(now, UTC)
    rows: list[tuple[Any, ...]] = []
    for n in range(users):
        uid = user_id(n)
        athlete = due.get(n)
        if athlete is not None:
            access, refresh = athlete.access_token, athlete.refresh_token
            expires_at, athlete_id = athlete.expires_at, athlete.athlete_id
        else:
            access, refresh = secrets.token_hex(20), secrets.token_hex(20)  # the shape of Strava's tokens
            expires_at, athlete_id = now + NOT_DUE_EXPIRES_IN, NOT_DUE_ATHLETE_BASE + n
        rows.append(
            (
                uid,
                cipher.encrypt(access, user_id=uid, field="access"),
                cipher.encrypt(refresh, user_id=uid, field="refresh"),
                key_id,
                expires_at,
                athlete_id,
                SCOPES,
                None,  # reauth_reason
                None,  # last_refreshed_at
                now_dt,
                now_dt,
                1,  # version
                sweep_at(uid, expires_at),
                0,  # failure_count
                None,  # last_error
            )
        )
    return rows


async def load_rows(database_url: str, rows: list[tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for start in range(0, len(rows), SEED_BATCH):
            await conn.copy_records_to_table("user_tokens", records=rows[start : start + SEED_BATCH], columns=COLUMNS)
        # Every user is in use, as after the upgrade's backfill: at the default TOKENSVC_SWEEP_ACTIVE_DAYS the sweep
        # refreshes only users something asked for lately. (A tree from before the table sweeps everyone.)
        if await conn.fetchval("SELECT to_regclass('token_usage') IS NOT NULL"):
            await conn.execute(
                "INSERT INTO token_usage (user_id, last_used_at) SELECT user_id, extract(epoch FROM now())::bigint"
                " FROM user_tokens ON CONFLICT (user_id) DO NOTHING"
            )
            await conn.execute("ANALYZE token_usage")
        await conn.execute("ANALYZE user_tokens")
    finally:
        await conn.close()


async def count_due_rows(database_url: str, now: int) -> tuple[int, int]:
    """(rows the sweeper would take now, rows ever refreshed)."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE reauth_reason IS NULL AND sweep_at <= $1),"
            " count(*) FILTER (WHERE last_refreshed_at IS NOT NULL) FROM user_tokens",
            now,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row[0]), int(row[1])


def claim_sql(database_url: str, batch_size: int, now: int) -> str:
    """The sweeper's real claim statement, compiled by the engine's own dialect with the values inlined."""
    engine = make_engine(normalize_database_url(database_url), pool_size=1)
    try:
        compiled = due_statement(now=now, limit=batch_size).compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True}
        )
        return str(compiled)
    finally:
        engine.sync_engine.dispose()  # never connected: nothing to close asynchronously


async def explain_claim(database_url: str, sql: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim, in a transaction rolled back (ANALYZE really takes the row locks)."""
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
        finally:
            await transaction.rollback()
    finally:
        await conn.close()
    return "\n".join(str(r[0]) for r in rows)


async def make_due_again(database_url: str) -> int:
    """For the profiled sweep: every user refreshed by the measured one is due again (its token 5 minutes from
    expiry, its sweep time passed). The sandbox still accepts the refresh token tokensvc now holds."""
    now = int(time.time())
    conn = await asyncpg.connect(database_url)
    try:
        status = await conn.execute(
            "UPDATE user_tokens SET expires_at = $1, sweep_at = $2 WHERE last_refreshed_at IS NOT NULL",
            now + DUE_EXPIRES_IN,
            now - 1,
        )
        await conn.execute("ANALYZE user_tokens")
    finally:
        await conn.close()
    return int(status.split()[-1])


# -- processes -----------------------------------------------------------------------------------------------


def start_servers(
    args: argparse.Namespace, database_url: str, sandbox_url: str, key: str, out_dir: Path
) -> list[Process]:
    """`--replicas` `tokensvc serve` at defaults but for what the bench must set (and what a flag sets)."""
    settings = {
        "TOKENSVC_DATABASE_URL": database_url,
        "TOKENSVC_STRAVA_BASE_URL": sandbox_url,
        "TOKENSVC_STRAVA_CLIENT_ID": CLIENT_ID,
        "TOKENSVC_STRAVA_CLIENT_SECRET": CLIENT_SECRET,
        "TOKENSVC_API_KEYS": API_KEY,
        "TOKENSVC_ENCRYPTION_KEYS": key,
        "TOKENSVC_SESSION_SECRET": secrets.token_urlsafe(32),  # required to start; no browser here
        "TOKENSVC_SWEEP_INTERVAL_SECONDS": "0",  # no periodic sweep: only the one pass the bench asks for
        "TOKENSVC_LOG_LEVEL": "WARNING",
    }
    optional = {
        "TOKENSVC_SWEEP_CONCURRENCY": args.concurrency,
        "TOKENSVC_STRAVA_TOKEN_CONCURRENCY": args.token_concurrency,
        "TOKENSVC_SWEEP_BATCH_SIZE": args.batch_size,
        "TOKENSVC_DB_POOL_SIZE": args.pool_size,
    }
    settings |= {name: str(value) for name, value in optional.items() if value is not None}
    return [
        start_service(f"replica-{n}", out_dir, settings | args.server_env_map, python=args.server_python)
        for n in range(args.replicas)
    ]


# -- sandbox -------------------------------------------------------------------------------------------------


async def seed_athletes(sandbox_url: str, count: int, concurrency: int) -> list[Athlete]:
    """Create `count` sandbox athletes whose access token expires in DUE_EXPIRES_IN seconds (control API)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    athletes: list[Athlete] = []
    async with httpx.AsyncClient(base_url=sandbox_url, limits=limits, timeout=30) as http:

        async def create() -> None:
            async with semaphore:
                response = await post_retrying(http, "/_control/athletes", {"expires_in": DUE_EXPIRES_IN})
            if response.status_code != 200:
                raise BenchError(f"sandbox /_control/athletes: {response.status_code} {response.text[:300]}")
            body = response.json()
            athletes.append(
                Athlete(body["athlete_id"], body["access_token"], body["refresh_token"], body["expires_at"])
            )

        async with asyncio.TaskGroup() as group:
            for _ in range(count):
                group.create_task(create())
    return athletes


async def post_retrying(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """A seeding POST, sent again after a transport error (on a busy machine uvicorn may close a kept-alive
    connection as it is reused); a lost answer only leaves one unused sandbox athlete behind."""
    for attempt in range(SEED_ATTEMPTS):
        try:
            return await http.post(path, json=body)
        except httpx.TransportError:
            if attempt == SEED_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def sandbox_post(sandbox_url: str, path: str, body: dict[str, Any]) -> Any:
    async with httpx.AsyncClient(base_url=sandbox_url, timeout=30) as http:
        response = await http.post(path, json=body)
    if response.status_code != 200:
        raise BenchError(f"sandbox {path}: {response.status_code} {response.text[:300]}")
    return response.json()


async def sandbox_stats(sandbox_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=sandbox_url, timeout=60) as http:
        response = await http.get("/_control/stats")
    if response.status_code != 200:
        raise BenchError(f"sandbox /_control/stats: {response.status_code} {response.text[:300]}")
    stats: dict[str, Any] = response.json()
    return stats


async def inject_latency(sandbox_url: str, latency_ms: int, count: int) -> None:
    await sandbox_post(
        sandbox_url,
        "/_control/faults",
        {"endpoint": "refresh", "kind": "latency", "latency_ms": latency_ms, "count": count},
    )


# -- the sweep -----------------------------------------------------------------------------------------------

METRIC_RE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def metric_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        match = METRIC_RE.match(line)
        if match is None:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        try:
            values[(match["name"], labels)] = float(match["value"])
        except ValueError:
            continue
    return values


@dataclass
class StravaCalls:
    """From the server's Prometheus metrics: sweep refreshes so far, and the Strava refresh calls' timing."""

    refreshed: float = 0.0
    call_seconds_sum: float = 0.0
    call_count: float = 0.0
    rate_limited: float = 0.0  # refreshes of any trigger that ended `provider_rate_limited`

    @classmethod
    def parse(cls, text: str) -> StravaCalls:
        values = metric_values(text)
        refreshed = values.get(
            ("tokensvc_refresh_total", frozenset({("outcome", "refreshed"), ("trigger", "sweep")})), 0.0
        )
        limited = sum(
            v
            for (name, labels), v in values.items()
            if name == "tokensvc_refresh_total" and ("outcome", "rate_limited") in labels
        )
        return cls(
            refreshed=refreshed,
            call_seconds_sum=values.get(("tokensvc_refresh_duration_seconds_sum", frozenset()), 0.0),
            call_count=values.get(("tokensvc_refresh_duration_seconds_count", frozenset()), 0.0),
            rate_limited=limited,
        )

    def __add__(self, other: StravaCalls) -> StravaCalls:
        return StravaCalls(
            self.refreshed + other.refreshed,
            self.call_seconds_sum + other.call_seconds_sum,
            self.call_count + other.call_count,
            self.rate_limited + other.rate_limited,
        )


async def fleet_metrics(http: httpx.AsyncClient, servers: Sequence[Process]) -> StravaCalls:
    """The replicas' metrics, summed."""
    texts = await asyncio.gather(*(http.get(f"{server.url}/metrics", timeout=10) for server in servers))
    total = StravaCalls()
    for response in texts:
        total = total + StravaCalls.parse(response.text)
    return total


@dataclass
class SweepRun:
    """One pass: every replica's POST /v1/refresh-sweep at once. `report` sums the replicas' answers; memory
    figures are per replica (lists in replica order)."""

    label: str
    seconds: float
    report: dict[str, Any]
    reports: list[dict[str, Any]]
    cpu: CpuUsage
    rss_ready_kib: list[int]
    hwm_ready_kib: list[int]
    rss_end_kib: list[int]
    hwm_end_kib: list[int]
    sandbox_hwm_kib: int
    pg_connections_max: int
    strava_call_mean_ms: float
    rate_limited: float
    timeline: list[tuple[float, float]] = field(default_factory=list)


async def db_connections(conn: asyncpg.Connection, db_name: str) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", db_name) or 0)


async def run_sweep(label: str, servers: list[Process], sandbox: Process, admin_url: str, db_name: str) -> SweepRun:
    """POST /v1/refresh-sweep to every replica at once and wait for all answers, sampling progress and connections
    (1 Hz)."""
    ready_mem = [memory_kib(server.pid) for server in servers]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    timeline: list[tuple[float, float]] = []
    pg_max = 0
    pids = [server.pid for server in servers]
    monitor = await asyncpg.connect(admin_url)
    try:
        async with httpx.AsyncClient(headers=headers, timeout=SWEEP_TIMEOUT_SECONDS) as http:
            metrics_before = await fleet_metrics(http, servers)
            before = CpuSnapshot.take(pids, sandbox.pid)
            started = time.monotonic()
            sweeps = [asyncio.create_task(http.post(f"{server.url}/v1/refresh-sweep")) for server in servers]
            while not all(sweep.done() for sweep in sweeps):
                await asyncio.wait(sweeps, timeout=TIMELINE_SECONDS)
                if not all(sweep.done() for sweep in sweeps):
                    progress = await fleet_metrics(http, servers)
                    timeline.append((time.monotonic() - started, progress.refreshed - metrics_before.refreshed))
                    pg_max = max(pg_max, await db_connections(monitor, db_name))
            responses = [sweep.result() for sweep in sweeps]
            seconds = time.monotonic() - started
            after = CpuSnapshot.take(pids, sandbox.pid)
            end_mem = [memory_kib(server.pid) for server in servers]
            metrics_after = await fleet_metrics(http, servers)
    finally:
        await monitor.close()
    for server, response in zip(servers, responses, strict=True):
        if response.status_code != 200:
            raise BenchError(f"{label}: {server.name} answered {response.status_code}: {response.text[:500]}")
    reports = [response.json() for response in responses]
    total = {key: sum(int(r.get(key, 0)) for r in reports) for key in reports[0]}
    calls = metrics_after.call_count - metrics_before.call_count
    call_mean_ms = (metrics_after.call_seconds_sum - metrics_before.call_seconds_sum) / calls * 1000 if calls else 0.0
    timeline.append((seconds, metrics_after.refreshed - metrics_before.refreshed))
    return SweepRun(
        label=label,
        seconds=seconds,
        report=total,
        reports=reports,
        cpu=cpu_usage(before, after),
        rss_ready_kib=[m.get("VmRSS", 0) for m in ready_mem],
        hwm_ready_kib=[m.get("VmHWM", 0) for m in ready_mem],
        rss_end_kib=[m.get("VmRSS", 0) for m in end_mem],
        hwm_end_kib=[m.get("VmHWM", 0) for m in end_mem],
        sandbox_hwm_kib=memory_kib(sandbox.pid).get("VmHWM", 0),
        pg_connections_max=pg_max,
        strava_call_mean_ms=round(call_mean_ms, 2),
        rate_limited=metrics_after.rate_limited - metrics_before.rate_limited,
        timeline=timeline,
    )


async def second_sweep(servers: list[Process]) -> dict[str, Any]:
    """A second pass across the replicas: must find nothing."""
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        responses = await asyncio.gather(*(http.post(f"{server.url}/v1/refresh-sweep") for server in servers))
    for response in responses:
        if response.status_code != 200:
            raise BenchError(f"second POST /v1/refresh-sweep answered {response.status_code}: {response.text[:500]}")
    reports = [response.json() for response in responses]
    return {key: sum(int(r.get(key, 0)) for r in reports) for key in reports[0]}


def verify(
    run: SweepRun, stats: dict[str, Any], due_athletes: set[int], due: int, again: dict[str, Any], left: tuple[int, int]
) -> list[str]:
    """Everything that must hold after the measured sweep; returns the problems (empty when all is well)."""
    problems = []
    report = run.report
    if report.get("refreshed") != due or report.get("checked") != due:
        problems.append(f"the sweep answered {report}, expected checked = refreshed = {due}")
    if report.get("failed") != 0 or report.get("needs_reauth") != 0:
        problems.append(f"the sweep had failures: {report}")
    if run.rate_limited:
        problems.append(f"{run.rate_limited:.0f} refreshes ended provider_rate_limited (want 0)")
    refresh_calls = stats.get("calls", {}).get("refresh")
    if refresh_calls != due:
        problems.append(f"the sandbox saw {refresh_calls} refresh calls, expected exactly {due}")
    by_athlete = {int(k): v for k, v in stats.get("refresh_by_athlete", {}).items()}
    if set(by_athlete) != due_athletes or any(v != 1 for v in by_athlete.values()):
        twice = sum(1 for v in by_athlete.values() if v != 1)
        missing = len(due_athletes - set(by_athlete))
        problems.append(f"refreshes per athlete: {twice} athletes not exactly once, {missing} never refreshed")
    if stats.get("ledger_violations"):
        problems.append(f"stale refresh tokens presented: {stats['ledger_violations'][:3]}")
    if again.get("checked") != 0:
        problems.append(f"a second sweep still found work: {again}")
    still_due, refreshed_rows = left
    if still_due != 0 or refreshed_rows != due:
        problems.append(f"after the sweep: {still_due} rows still due, {refreshed_rows} rows refreshed (want 0, {due})")
    return problems


# -- profile -------------------------------------------------------------------------------------------------

FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Each sample goes to the phase of its innermost frame matching one, in this order (specific first), so a stdlib
# helper counts for the library that called it. Innermost attribution is robust to the stacks py-spy cannot show
# whole: SQLAlchemy's greenlet half, and --nonblocking stacks cut short at the root.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Postgres connect/close (pool churn)", ("asyncpg/connect_utils.py",)),
    ("asyncpg (protocol, Python part)", ("asyncpg/",)),
    ("SQLAlchemy: compile, cache key, coercions", ("sqlalchemy/sql/",)),
    ("SQLAlchemy: pool", ("sqlalchemy/pool/",)),
    ("SQLAlchemy: greenlet bridge", ("sqlalchemy/util/concurrency", "sqlalchemy/util/_concurrency", "greenlet")),
    ("SQLAlchemy: engine, events, results, asyncpg adapter", ("sqlalchemy/",)),
    ("AES-GCM (tokensvc.crypto, cryptography)", ("tokensvc/crypto.py", "cryptography/")),
    ("tokensvc sandbox (emulator code)", ("tokensvc/sandbox/",)),
    ("tokensvc: service/store/providers/api", ("tokensvc/",)),
    ("stamina (retry wrapper around each Strava POST)", ("stamina/", "tenacity/")),
    ("httpx/httpcore/h11 (Strava client)", ("httpx/", "httpcore/", "h11/", "anyio/", "sniffio/")),
    ("python-multipart (form parsing)", ("multipart/", "python_multipart/")),
    ("FastAPI", ("fastapi/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("Starlette", ("starlette/",)),
    ("uvicorn + httptools", ("uvicorn/", "httptools/")),
    ("logging / metrics", ("structlog/", "prometheus_client/", "logging/")),
    ("json", ("json/",)),
    ("asyncio (Python part)", ("asyncio/", "uvloop/")),
)
LOOP_LABEL = "event loop / C only (no Python frame above the loop)"
OTHER_LABEL = "stdlib with no library frame above (cut-short stacks)"


@dataclass
class Profile:
    samples: int = 0
    phases: Counter[str] = field(default_factory=Counter)
    self_frames: Counter[str] = field(default_factory=Counter)
    cumulative: Counter[str] = field(default_factory=Counter)

    def pct(self, count: int) -> float:
        return 100.0 * count / self.samples if self.samples else 0.0


def parse_frame(text: str) -> tuple[str, str]:
    match = FRAME_RE.match(text)
    return (match["func"], match["file"]) if match else (text, "")


def analyse_raw(text: str) -> Profile:
    """Aggregate py-spy's raw output (`frame;frame;... count`, root first)."""
    profile = Profile()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [parse_frame(part) for part in stack.split(";")]
        last_loop = max(
            (i for i, (_, f) in enumerate(frames) if "asyncio/runners.py" in f or "asyncio/base_events.py" in f),
            default=-1,
        )
        frames = [f for f in frames[last_loop + 1 :] if f[1].endswith(".py") or f[1].startswith("<")]
        profile.samples += count
        if not frames:
            profile.phases[LOOP_LABEL] += count
            profile.self_frames[LOOP_LABEL] += count
            continue
        func, file = frames[-1]
        profile.self_frames[f"{func} ({file})"] += count
        phase = next(
            (
                label
                for _, path in reversed(frames)
                for label, needles in PHASES
                if any(needle in path for needle in needles)
            ),
            OTHER_LABEL,
        )
        profile.phases[phase] += count
        for where in {f"{fn} ({fl})" for fn, fl in frames}:
            profile.cumulative[where] += count
    return profile


def profile_report(title: str, profile: Profile, top: int) -> str:
    out = [f"-- {title}: {profile.samples} samples holding the GIL (idle time excluded)"]
    out.append(f"  {'where the time goes (innermost matching frame; sums to 100%)':<72} {'%':>6}")
    for label, count in profile.phases.most_common():
        out.append(f"    {label:<70} {profile.pct(count):6.1f}")
    out.append(f"  top {top} self frames")
    for where, count in profile.self_frames.most_common(top):
        out.append(f"    {profile.pct(count):5.1f}%  {where}")
    out.append(f"  top {top} cumulative frames")
    for where, count in profile.cumulative.most_common(top):
        out.append(f"    {profile.pct(count):5.1f}%  {where}")
    return "\n".join(out)


def start_py_spy(py_spy: str, pid: int, raw: Path, rate: int) -> subprocess.Popen[str]:
    """py-spy until SIGINT: non-blocking (unbiased; unreadable samples are dropped), `--gil` (the thread running
    Python only, so idle worker threads do not count as busy)."""
    raw.unlink(missing_ok=True)
    argv = [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(raw)]
    argv += ["--gil", "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_py_spy(spy: subprocess.Popen[str], raw: Path) -> str:
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
    try:
        output, _ = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        output, _ = spy.communicate()
    if not raw.exists():
        raise ProfilerError(f"py-spy wrote nothing ({spy.returncode}): {output.strip()[-1500:]}")
    return output.strip()


# -- report --------------------------------------------------------------------------------------------------


def mib(kib: int) -> float:
    return kib / 1024


def print_run(run: SweepRun, args: argparse.Namespace) -> dict[str, float]:
    due = args.due
    rate = due / run.seconds
    # What the defaults allow: each replica's sweep keeps at most this many calls at Strava.
    ideal = args.replicas * min(args.sweep_concurrency, args.token_slots) / (args.latency_ms / 1000)
    ratio = rate / ideal
    in_flight = rate * run.strava_call_mean_ms / 1000
    print(f"== {run.label}: POST /v1/refresh-sweep on {args.replicas} replicas at once, {run.seconds:.2f} s")
    print(f"   answers {run.reports}; summed {run.report}")
    print(
        f"   refreshes/s {rate:,.1f}; ideal {ideal:,.0f}/s ({args.replicas} replicas x min(sweep concurrency"
        f" {args.sweep_concurrency}, token slots {args.token_slots}) / {args.latency_ms} ms)"
    )
    print(f"   ratio achieved / ideal {ratio:.3f} (target >= {TARGET_RATIO})")
    print(
        f"   Strava call (server's view: request sent to answer parsed) {run.strava_call_mean_ms:.1f} ms;"
        f" {in_flight:.1f} calls in flight on average across the replicas; provider_rate_limited {run.rate_limited:.0f}"
    )
    peaks = ", ".join(f"{mib(k):.1f}" for k in run.hwm_end_kib)
    ready = ", ".join(f"{mib(k):.1f}" for k in run.rss_ready_kib)
    print(f"   peak RSS (VmHWM) per replica: {peaks} MiB (target < {TARGET_RSS_MB:.0f}); RSS when ready {ready} MiB")
    print(f"   CPU in % of one core during the sweep: {describe_cpu(run.cpu)}")
    cpu_ms = per_user_cpu(run, due)
    print(
        f"   CPU per refresh: server (all replicas) {cpu_ms['server_cpu_ms_per_refresh']:.2f} ms"
        f" (target < {TARGET_CPU_MS}), sandbox {cpu_ms['sandbox_cpu_ms_per_refresh']:.2f} ms,"
        f" postgres {cpu_ms['postgres_cpu_ms_per_refresh']:.2f} ms"
    )
    if run.cpu.rest > REST_WARNING:
        print(
            f"   WARNING: {run.cpu.rest:.0f}% of a core went to other processes during the sweep: the machine was"
            " shared, figures are low"
        )
    print(
        f"   Postgres connections to the bench database (max sampled): {run.pg_connections_max};"
        f" sandbox peak RSS {mib(run.sandbox_hwm_kib):.1f} MiB"
    )
    if len(run.timeline) > 1:
        steps = []
        previous = (0.0, 0.0)
        for at, done in run.timeline:
            if at - previous[0] >= max(0.5, run.seconds / 30):  # at most about 30 intervals
                steps.append(f"{at:.0f}s:{(done - previous[1]) / (at - previous[0]):.0f}")
                previous = (at, done)
        print(f"   refreshes/s over time (end of interval: rate): {' '.join(steps)}")
    steady = steady_rate(run.timeline)
    if steady is not None:
        print(
            f"   steady state (from 1 s in to the last sample before the end, no ramp-up or tail): {steady:,.1f}"
            f" refreshes/s, ratio {steady / ideal:.3f}"
        )
    return {"rate": rate, "ideal": ideal, "ratio": ratio} | cpu_ms | {"steady_rate": steady or 0.0}


def per_user_cpu(run: SweepRun, due: int) -> dict[str, float]:
    """Milliseconds of CPU per refreshed user, per process group."""
    return {
        f"{name}_cpu_ms_per_refresh": round(getattr(run.cpu, name) / 100 * run.seconds / due * 1000, 3)
        for name in ("server", "sandbox", "postgres")
    }


def steady_rate(timeline: list[tuple[float, float]]) -> float | None:
    """Refreshes/s between the first progress sample at least 1 s in and the last one before the sweep answered."""
    inner = [(at, done) for at, done in timeline[:-1] if at >= 1.0]
    if len(inner) < 2 or inner[-1][0] - inner[0][0] < 1.0:
        return None
    return (inner[-1][1] - inner[0][1]) / (inner[-1][0] - inner[0][0])


# -- main ----------------------------------------------------------------------------------------------------


def fields_default(name: str) -> int:
    value: int = Settings.model_fields[name].default
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3, help="`tokensvc serve` processes (default 3)")
    parser.add_argument("--users", type=int, default=100_000, help="rows in user_tokens (default 100000)")
    parser.add_argument("--due", type=int, default=10_000, help="of them due for the sweeper (default 10000)")
    parser.add_argument("--concurrency", type=int, default=None, help="TOKENSVC_SWEEP_CONCURRENCY (default: unset)")
    parser.add_argument(
        "--token-concurrency",
        type=int,
        default=None,
        help="TOKENSVC_STRAVA_TOKEN_CONCURRENCY (default: unset, the service's); bounds the ideal with the sweep's",
    )
    parser.add_argument("--latency-ms", type=int, default=200, help="sandbox latency per refresh (default 200)")
    parser.add_argument("--batch-size", type=int, default=None, help="TOKENSVC_SWEEP_BATCH_SIZE (default: unset)")
    parser.add_argument("--pool-size", type=int, default=None, help="TOKENSVC_DB_POOL_SIZE (default: unset)")
    parser.add_argument(
        "--server-python",
        default=sys.executable,
        help="interpreter for migrate and the replicas (another tree's .venv/bin/python for a before/after)",
    )
    parser.add_argument("--seed-concurrency", type=int, default=50, help="concurrent sandbox seeding calls")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="Postgres server URL")
    parser.add_argument("--db-name", default="tokensvc_sweepbench", help="database to (re)create and drop")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "out" / "sweep", help="logs, profiles, results")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="profile a second sweep with py-spy: when a target is missed (auto), always, or never",
    )
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--profile-top", type=int, default=20, help="frames listed per profile")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra server environment, repeatable (e.g. PYTHONPATH=/tmp/patched/src); overrides the defaults",
    )
    args = parser.parse_args(argv)
    args.server_env_map = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--server-env takes NAME=VALUE, got {item!r}")
        args.server_env_map[name] = value
    for name in ("replicas", "users", "due", "latency_ms", "seed_concurrency", "profile_rate"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.due > args.users:
        parser.error("--due cannot exceed --users")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.db_name):
        parser.error(f"--db-name must be a plain lower-case identifier, got {args.db_name!r}")
    # The values in force (the servers' tree's defaults where unset): what the ideal and the report name. A tree
    # from before the token-call bound has none: its ideal is still this tree's default's.
    defaults = server_defaults(args.server_python)
    args.sweep_concurrency = args.concurrency or defaults.get("sweep_concurrency")
    args.token_slots = args.token_concurrency or fields_default("strava_token_concurrency")
    return args


def server_defaults(python: str) -> dict[str, int]:
    """The servers' tree's Settings defaults (another tree's may differ from this one's)."""
    code = "import json; from tokensvc.config import Settings as S; "
    code += "print(json.dumps({k: f.default for k, f in S.model_fields.items() if isinstance(f.default, int)}))"
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=60, check=False, env=clean_env()
    )
    if done.returncode != 0:
        raise BenchError(f"cannot read the servers' defaults with {python}: {done.stderr[-500:]}")
    values: dict[str, int] = json.loads(done.stdout)
    return values


@contextmanager
def exclusive_database(name: str) -> Iterator[None]:
    """One run per database name on this machine: a second `bench/sweep.py` would drop the first one's database
    under it (and then its own `finally` would drop it again)."""
    path = Path(f"/tmp/tokensvc-bench-{name}.lock")
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(
                f"another bench/sweep.py is using database {name} ({path} is locked): wait, or pass --db-name"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_profile(
    args: argparse.Namespace,
    servers: list[Process],
    sandbox: Process,
    admin_url: str,
    database_url: str,
    out_dir: Path,
    py_spy: str,
) -> dict[str, Any]:
    """Make the same users due again and profile a second, identical pass: the first replica and the sandbox."""
    server = servers[0]
    again = asyncio.run(make_due_again(database_url))
    asyncio.run(inject_latency(sandbox.url, args.latency_ms, again))
    raws = {"server": out_dir / "profile-server.raw.txt", "sandbox": out_dir / "profile-sandbox.raw.txt"}
    spies = {
        "server": start_py_spy(py_spy, server.pid, raws["server"], args.profile_rate),
        "sandbox": start_py_spy(py_spy, sandbox.pid, raws["sandbox"], args.profile_rate),
    }
    try:
        time.sleep(1.0)  # let py-spy attach before the sweep starts
        run = asyncio.run(run_sweep("profiled sweep", servers, sandbox, admin_url, args.db_name))
    finally:
        logs = {}
        for name, spy in spies.items():
            try:
                logs[name] = stop_py_spy(spy, raws[name])
            except ProfilerError as exc:
                logs[name] = f"error: {exc}"
    print()
    print(f"== profile: py-spy (non-blocking, --gil, {args.profile_rate} Hz) during a second sweep of {again:,} users")
    print(f"   (made due again; the sweep ran slower under the profiler: {args.due / run.seconds:,.0f} refreshes/s,")
    print(f"   Strava call {run.strava_call_mean_ms:.1f} ms; CPU {describe_cpu(run.cpu)})")
    summary: dict[str, Any] = {"sweep_seconds": run.seconds, "cpu": asdict(run.cpu)}
    texts = []
    for name, raw in raws.items():
        counts = re.search(r"Samples: (\d+) Errors: (\d+)", logs[name])
        print(f"   {name}: {'samples ' + counts[1] + ', errors ' + counts[2] if counts else logs[name][-300:]}")
        if not raw.exists():
            continue
        profile = analyse_raw(raw.read_text())
        text = profile_report(
            f"{name} (pid {server.pid if name == 'server' else sandbox.pid})", profile, args.profile_top
        )
        texts.append(text)
        summary[name] = {k: round(profile.pct(v), 1) for k, v in profile.phases.most_common()}
    for text in texts:
        print(text)
    (out_dir / "profile-summary.txt").write_text("\n\n".join(texts) + "\n")
    print(f"(raw stacks: {', '.join(str(r) for r in raws.values())}; render with flamegraph.pl or speedscope)")
    return summary


def bench(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """The whole run; returns (report, verified)."""
    out_dir: Path = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    admin_url = f"{args.pg.rstrip('/')}/postgres"
    database_url = f"{args.pg.rstrip('/')}/{args.db_name}"
    quoted_identifier(args.db_name)
    py_spy = find_py_spy()
    if args.profile == "always" and py_spy is None:
        raise BenchError("py-spy is not installed: `.venv/bin/pip install py-spy`, or pass --profile never")

    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    sandbox: Process | None = None
    servers: list[Process] = []
    created = False
    try:
        pg_version = asyncio.run(recreate_database(admin_url, args.db_name))
        created = True
        report["environment"] = print_environment(pg_version, args)
        print("== setup (not measured)")
        seconds = migrate(database_url, out_dir, args.server_python)
        print(f"migrated {args.db_name} with `tokensvc migrate` in {seconds:.1f} s")

        sandbox = start_sandbox(out_dir, "--client-id", CLIENT_ID, cwd=out_dir)
        print(f"sandbox pid {sandbox.pid} on {sandbox.url}")
        started = time.monotonic()
        athletes = asyncio.run(seed_athletes(sandbox.url, args.due, args.seed_concurrency))
        seed_sandbox = time.monotonic() - started
        print(
            f"seeded {len(athletes):,} sandbox athletes through POST /_control/athletes ({args.seed_concurrency} at a"
            f" time) in {seed_sandbox:.1f} s ({len(athletes) / seed_sandbox:,.0f}/s)"
        )

        key = generate_key()
        due_users = sorted(random.Random(20261127).sample(range(args.users), args.due))
        due_map = dict(zip(due_users, athletes, strict=True))
        started = time.monotonic()
        rows = build_rows(args.users, due_map, key)
        encrypt_seconds = time.monotonic() - started
        started = time.monotonic()
        asyncio.run(load_rows(database_url, rows))
        load_seconds = time.monotonic() - started
        del rows
        print(
            f"built {args.users:,} rows ({2 * args.users:,} AES-GCM encryptions) in {encrypt_seconds:.1f} s;"
            f" COPY + ANALYZE in {load_seconds:.1f} s"
        )
        report["seeding_seconds"] = {
            "sandbox_athletes": round(seed_sandbox, 2),
            "encrypt": round(encrypt_seconds, 2),
            "copy_analyze": round(load_seconds, 2),
        }
        still_due, _ = asyncio.run(count_due_rows(database_url, int(time.time())))
        if still_due != args.due:
            raise BenchError(f"{still_due} rows are due after seeding, expected {args.due}")

        print()
        sql = claim_sql(database_url, args.batch_size or fields_default("sweep_batch_size"), int(time.time()))
        plan = asyncio.run(explain_claim(database_url, sql))
        print("== the sweeper's claim statement (store.tokens.due_statement, Postgres dialect, values inlined)")
        print(sql)
        print("-- EXPLAIN (ANALYZE, BUFFERS)")
        print(plan)
        report["claim_sql"] = sql
        report["claim_plan"] = plan
        index_line = next((line.strip() for line in plan.splitlines() if "ix_user_tokens_sweep" in line), None)
        if index_line is None or "Index" not in index_line or "Seq Scan" in plan:
            raise BenchError("the claim statement is not an index scan on ix_user_tokens_sweep (plan above)")
        print(f"OK: {index_line}")

        print()
        asyncio.run(inject_latency(sandbox.url, args.latency_ms, args.due))
        print(f"sandbox: every refresh now waits {args.latency_ms} ms (latency fault x{args.due:,})")
        started = time.monotonic()
        servers = start_servers(args, database_url, sandbox.url, key, out_dir)
        asyncio.run(wait_ready(*servers, deadline=READY_DEADLINE_SECONDS))
        for server in servers:
            print(f"{server.name} pid {server.pid} on {server.url} (log: {server.log})")
        print(f"{len(servers)} replicas ready in {time.monotonic() - started:.1f} s")
        time.sleep(1.0)  # let start-up settle before the CPU and memory baselines

        print()
        run = asyncio.run(run_sweep("measured sweep", servers, sandbox, admin_url, args.db_name))
        figures = print_run(run, args)
        report["run"] = asdict(run)
        report["figures"] = figures | {
            "wall_seconds": run.seconds,
            "peak_rss_mib_per_replica": [round(mib(k), 1) for k in run.hwm_end_kib],
            "rss_ready_mib_per_replica": [round(mib(k), 1) for k in run.rss_ready_kib],
        }

        stats = asyncio.run(sandbox_stats(sandbox.url))
        again = asyncio.run(second_sweep(servers))
        left = asyncio.run(count_due_rows(database_url, int(time.time())))
        problems = verify(run, stats, {a.athlete_id for a in athletes}, args.due, again, left)
        report["verification"] = {"problems": problems, "second_sweep": again, "sandbox_calls": stats.get("calls")}
        print(
            f"   verification: sandbox refresh calls {stats.get('calls', {}).get('refresh')},"
            f" ledger violations {len(stats.get('ledger_violations', []))}, second sweep {again},"
            f" rows still due {left[0]}, rows refreshed {left[1]:,}"
        )
        if problems:
            for problem in problems:
                print(f"   VERIFICATION FAILED: {problem}", file=sys.stderr)
        else:
            print("   verification: OK")

        print()
        peak_mib = mib(max(run.hwm_end_kib))
        cpu_ms = figures["server_cpu_ms_per_refresh"]
        missed = [
            *([f"ratio {figures['ratio']:.3f} < {TARGET_RATIO}"] if figures["ratio"] < TARGET_RATIO else []),
            *([f"peak RSS {peak_mib:.0f} MiB > {TARGET_RSS_MB:.0f}"] if peak_mib > TARGET_RSS_MB else []),
            *([f"server CPU {cpu_ms:.2f} ms per refresh > {TARGET_CPU_MS}"] if cpu_ms > TARGET_CPU_MS else []),
        ]
        print("== result")
        head = f"{'repl.':>5} {'users':>8} {'due':>7} {'latency':>8} {'wall s':>7} {'refr./s':>8} {'ideal/s':>8}"
        head += f" {'ratio':>6} {'max peak RSS MiB':>16} {'server CPU ms/refr.':>19}"
        print(head)
        print("-" * len(head))
        print(
            f"{args.replicas:5} {args.users:8,} {args.due:7,} {args.latency_ms:5} ms {run.seconds:7.2f}"
            f" {figures['rate']:8.1f} {figures['ideal']:8.0f} {figures['ratio']:6.3f} {peak_mib:16.1f} {cpu_ms:19.2f}"
        )
        print(
            f"seeding (not in the figures): sandbox athletes {seed_sandbox:.1f} s, encryption {encrypt_seconds:.1f} s,"
            f" COPY + ANALYZE {load_seconds:.1f} s"
        )
        targets = (
            f"ratio >= {TARGET_RATIO}, peak RSS < {TARGET_RSS_MB:.0f} MiB, server CPU < {TARGET_CPU_MS} ms/refresh"
        )
        print(f"targets: {targets}: {'; '.join(missed) or 'met'}")
        report["targets_missed"] = missed

        if args.profile == "always" or (args.profile == "auto" and missed):
            if py_spy is None:
                print("WARNING: py-spy is not installed: no profile", file=sys.stderr)
            else:
                try:
                    report["profile"] = run_profile(args, servers, sandbox, admin_url, database_url, out_dir, py_spy)
                except ProfilerError as exc:
                    print(f"WARNING: no profile: {exc}", file=sys.stderr)
                stats = asyncio.run(sandbox_stats(sandbox.url))
                if stats.get("ledger_violations"):
                    problems.append(f"stale refresh tokens presented: {stats['ledger_violations'][:3]}")
        return report, not problems
    finally:
        for server in servers:
            server.stop()
            if server.popen.returncode not in (0, -signal.SIGTERM):
                print(f"note: {server.name} exited with {server.popen.returncode}; see {server.log}", file=sys.stderr)
        if sandbox is not None:
            sandbox.stop()
        if created:
            try:
                asyncio.run(drop_database(admin_url, args.db_name))
            except (OSError, asyncpg.PostgresError) as exc:
                print(f"warning: could not drop database {args.db_name}: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with terminate_as_exit():
        try:
            with exclusive_database(args.db_name):
                report, verified = bench(args)
        except BenchError as exc:
            print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
            return 1
    results_file = args.out_dir.resolve() / "results.json"
    results_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nresults: {results_file}")
    if not verified:
        print("BENCHMARK FAILED: a verification failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
