"""Hot-path benchmark: `GET /v1/users/{id}/access-token` (valid tokens) against `GET /healthz`, with wrk.

Run from the repository root:

    .venv/bin/python bench/hotpath.py [--users 1000] [--duration 15] [--connections 64] [--threads 2]

What it does (see bench/README.md):
1. drops and recreates the Postgres database `tokensvc_bench`, starts ONE `tokensvc serve` on it (free port) and
   polls /healthz until it answers (bounded);
2. seeds `--users` users holding valid tokens (expires_at = now + 6 h) through `PUT /v1/users/{id}/tokens`;
3. warms both endpoints up, then runs wrk `--rounds` times on the pair (healthz, then access-token), each for
   `--duration` seconds with the same connections and threads; every run must return only 200s;
4. prints the machine, the versions, every run and a table of the best round of each endpoint and their ratio;
5. profiles the server with py-spy during one more access-token load and summarises where the time goes.
The server is stopped and the database dropped in a `finally`, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
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
    wait_ready,
)
from tests.e2e.processes import Process, clean_env, free_port

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LUA_SCRIPT = BENCH_DIR / "hotpath.lua"
API_KEY = "bench-key-0123456789"
USER_PREFIX = "bench-user-"
TOKEN_LIFETIME_SECONDS = 6 * 3600
SEED_CONCURRENCY = 32
LOADAVG_WARNING = 0.5
REST_WARNING = 25.0  # percent of a core busy outside the server, Postgres and wrk during a run
VERSIONED_PACKAGES = (
    "tokensvc",
    "uvicorn",
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-core",
    "sqlalchemy",
    "asyncpg",
    "uvloop",
    "httptools",
    "cryptography",
    "structlog",
)


# -- machine and versions ------------------------------------------------------------------------------------


def tool_version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def environment(wrk: str, py_spy: str | None, pg_version: str) -> dict[str, Any]:
    cpus = os.cpu_count() or 0
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus,
        "cpu_count": cpus,
        "cpu_model": cpu_model(),
        "mem_total_gib": mem_total_gib(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {name: package_version(name) for name in VERSIONED_PACKAGES},
        "postgres": pg_version,
        "wrk": tool_version([wrk, "--version"]),
        "py_spy": tool_version([py_spy, "--version"]) if py_spy else "not installed",
        "git": git_revision(),
    }


# -- CPU accounting ------------------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_stat() -> tuple[int, int, int]:
    """(busy jiffies, total jiffies, processes forked since boot) from /proc/stat."""
    busy = total = forks = 0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            total = sum(values[:8])  # guest time is already counted in user
            busy = total - idle
        elif line.startswith("processes "):
            forks = int(line.split()[1])
    return busy, total, forks


def children_cpu_seconds() -> float:
    """CPU of the children this process has waited for (during a run: wrk alone)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def pg_connections(admin_url: str, name: str) -> tuple[int, int]:
    """(connections ever made to database `name`, connections open to it now).

    The first is pg_stat_database.sessions (a backend reports within about a second); the second shows how big
    the server's pool really is.
    """
    conn = await asyncpg.connect(admin_url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT sessions FROM pg_stat_database WHERE datname = $1),"
            " (SELECT count(*) FROM pg_stat_activity WHERE datname = $1)",
            name,
        )
    finally:
        await conn.close()
    return int(row[0] or 0), int(row[1] or 0)


@dataclass
class CpuSnapshot:
    at: float
    server: int
    postgres: dict[int, int]
    machine: tuple[int, int, int]
    children: float
    sessions: int
    open_connections: int

    @classmethod
    def take(cls, server_pid: int, admin_url: str, db_name: str) -> CpuSnapshot:
        sessions, open_connections = asyncio.run(pg_connections(admin_url, db_name))
        return cls(
            time.monotonic(),
            process_ticks(server_pid) or 0,
            postgres_ticks(),
            machine_stat(),
            children_cpu_seconds(),
            sessions,
            open_connections,
        )


@dataclass
class CpuUsage:
    """CPU during one run, in percent of one core (100 = one core busy for the whole run).

    `postgres` counts the Postgres processes alive at the end of the run (a backend that exited meanwhile is
    missed); `rest` is the machine's busy time not in server, postgres or wrk: short-lived Postgres backends
    (connection churn) and anything else running on the machine. `new_connections` is how many connections
    were opened to the benchmark's database during the run (each one a Postgres backend forked, authenticated
    and, once the pool lets it go, torn down again).
    """

    server: float
    postgres: float
    wrk: float
    rest: float
    machine_busy: float
    forks: int
    new_connections: int
    open_connections: int


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
    wall = max(after.at - before.at, 1e-9)
    server = (after.server - before.server) / CLOCK_TICKS / wall * 100
    pg = sum(t - before.postgres.get(pid, 0) for pid, t in after.postgres.items()) / CLOCK_TICKS / wall * 100
    wrk = (after.children - before.children) / wall * 100
    busy = after.machine[0] - before.machine[0]
    total = max(after.machine[1] - before.machine[1], 1)
    ncpu = os.cpu_count() or 1
    machine = busy / total * ncpu * 100
    return CpuUsage(
        server=round(server, 1),
        postgres=round(pg, 1),
        wrk=round(wrk, 1),
        rest=round(max(machine - server - pg - wrk, 0.0), 1),
        machine_busy=round(machine, 1),
        forks=after.machine[2] - before.machine[2],
        new_connections=after.sessions - before.sessions,
        open_connections=after.open_connections,
    )


# -- database and server -------------------------------------------------------------------------------------


def generate_key(out_dir: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tokensvc", "gen-key"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
        cwd=out_dir,
    )
    key = done.stdout.strip()
    if done.returncode != 0 or not key:
        raise BenchError(f"`tokensvc gen-key` failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return key


def start_server(database_url: str, out_dir: Path, extra_env: dict[str, str]) -> Process:
    port = free_port()
    settings = {
        "TOKENSVC_DATABASE_URL": database_url,
        "TOKENSVC_ENCRYPTION_KEYS": generate_key(out_dir),
        "TOKENSVC_API_KEYS": API_KEY,
        "TOKENSVC_STRAVA_CLIENT_ID": "bench-client",
        "TOKENSVC_STRAVA_CLIENT_SECRET": "bench-secret",  # valid tokens never call Strava
        # Nothing listens on the discard port: a refresh attempt would fail fast (and show up as a non-200).
        "TOKENSVC_STRAVA_BASE_URL": "http://127.0.0.1:9",
        "TOKENSVC_SESSION_SECRET": secrets.token_urlsafe(32),  # browser sessions; unused here, required to start
        "TOKENSVC_SWEEP_INTERVAL_SECONDS": "0",
        "TOKENSVC_LOG_LEVEL": "WARNING",
    }
    env = clean_env(**(settings | extra_env))
    log = out_dir / "server.log"
    with log.open("wb") as sink:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            [sys.executable, "-m", "tokensvc", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=out_dir,  # no stray .env from the work tree
        )
    return Process("server", popen, f"http://127.0.0.1:{port}", log)


def user_id(n: int) -> str:
    return f"{USER_PREFIX}{n}"


async def seed_users(base_url: str, users: int) -> tuple[float, dict[str, str]]:
    """PUT valid tokens for `users` users, concurrently; returns (seconds, a few user -> access token to check)."""
    expires_at = int(time.time()) + TOKEN_LIFETIME_SECONDS
    limits = httpx.Limits(max_connections=SEED_CONCURRENCY, max_keepalive_connections=SEED_CONCURRENCY)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    semaphore = asyncio.Semaphore(SEED_CONCURRENCY)
    samples: dict[str, str] = {}
    sample_every = max(users // 5, 1)

    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=30) as http:

        async def put(n: int) -> None:
            access = f"bench-access-{n}-{secrets.token_hex(12)}"
            body = {
                "access_token": access,
                "refresh_token": f"bench-refresh-{n}-{secrets.token_hex(12)}",
                "expires_at": expires_at,
                "athlete_id": 1_000_000 + n,
                "scopes": ["read", "activity:read_all"],
            }
            async with semaphore:
                response = await http.put(f"/v1/users/{user_id(n)}/tokens", json=body)
            if response.status_code != 200 or response.json().get("status") != "valid":
                raise BenchError(f"seeding {user_id(n)}: {response.status_code} {response.text[:300]}")
            if n % sample_every == 0:
                samples[user_id(n)] = access

        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for n in range(users):
                group.create_task(put(n))
        seconds = time.monotonic() - started

        # The hot path must answer what was stored, from the store, without calling Strava.
        for uid, access in samples.items():
            response = await http.get(f"/v1/users/{uid}/access-token")
            if response.status_code != 200 or response.json().get("access_token") != access:
                raise BenchError(f"access-token for {uid} after seeding: {response.status_code}")
            if response.headers.get("cache-control") != "no-store":
                raise BenchError("access-token responses must carry Cache-Control: no-store")
    return seconds, samples


# -- wrk -----------------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    label: str
    mode: str
    requests: int
    seconds: float
    rps: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non200: int
    errors: dict[str, int]
    cpu: CpuUsage | None = None
    output: Path | None = None


@dataclass
class WrkConfig:
    wrk: str
    url: str
    users: int
    connections: int
    threads: int
    timeout_seconds: int
    out_dir: Path
    admin_url: str
    db_name: str

    def snapshot(self, server: Process) -> CpuSnapshot:
        return CpuSnapshot.take(server.pid, self.admin_url, self.db_name)

    def argv(self, mode: str, seconds: float) -> list[str]:
        argv = [
            self.wrk,
            "--threads",
            str(self.threads),
            "--connections",
            str(self.connections),
            "--duration",
            f"{max(round(seconds), 1)}s",
            "--timeout",
            f"{self.timeout_seconds}s",
            "--latency",
            "--script",
            str(LUA_SCRIPT),
            self.url,
            "--",
            mode,
        ]
        if mode == "access-token":
            argv += [str(self.users), API_KEY, USER_PREFIX]
        return argv


def parse_wrk(label: str, mode: str, text: str, output: Path) -> WrkResult:
    match = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.MULTILINE)
    if match is None:
        raise BenchError(f"wrk ({label}) printed no BENCH_RESULT line; see {output}:\n{text[-2000:]}")
    data = json.loads(match.group(1))
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        label=label,
        mode=mode,
        requests=data["requests"],
        seconds=round(seconds, 3),
        rps=round(data["requests"] / seconds, 1) if seconds > 0 else 0.0,
        mean_ms=round(data["mean_us"] / 1000, 2),
        p50_ms=round(data["p50_us"] / 1000, 2),
        p90_ms=round(data["p90_us"] / 1000, 2),
        p99_ms=round(data["p99_us"] / 1000, 2),
        max_ms=round(data["max_us"] / 1000, 2),
        non200=data["non200"],
        errors={k: int(v) for k, v in data["errors"].items()},
        output=output,
    )


def check_clean(result: WrkResult, text: str) -> None:
    """Fail loudly unless every request of the run was answered with a 200."""
    problems = []
    if result.requests == 0:
        problems.append("no request completed")
    if result.non200:
        problems.append(f"{result.non200} responses were not a 200")
    if any(result.errors.values()):
        problems.append(f"socket errors {result.errors}")
    if "Non-2xx or 3xx responses" in text:
        problems.append("wrk reported non-2xx/3xx responses")
    if problems:
        first_bad = re.search(r"^BENCH_FIRST_BAD (.*)$", text, re.MULTILINE)
        detail = f"; first bad response: {first_bad.group(1)}" if first_bad else ""
        raise BenchError(f"{result.label}: {'; '.join(problems)}{detail} (wrk output: {result.output})")


def run_wrk(config: WrkConfig, server: Process, mode: str, seconds: float, label: str) -> WrkResult:
    output = config.out_dir / f"wrk-{label}.txt"
    argv = config.argv(mode, seconds)
    before = config.snapshot(server)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk ({label}) did not finish within {seconds + 60:.0f} s") from exc
    after = config.snapshot(server)
    text = f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}"
    output.write_text(text)
    if done.returncode != 0:
        raise BenchError(f"wrk ({label}) exited with {done.returncode}:\n{text[-2000:]}")
    if server.popen.poll() is not None:
        raise BenchError(f"the server died during {label}:\n{server.log_tail()}")
    result = parse_wrk(label, mode, text, output)
    result.cpu = cpu_usage(before, after)
    check_clean(result, text)
    return result


# -- profile -------------------------------------------------------------------------------------------------

FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Rule:
    """Frames of a file (substring of its path), optionally only some functions (last part of the name)."""

    file: str
    funcs: frozenset[str] = frozenset()

    def matches(self, frame: Frame) -> bool:
        return self.file in frame.file and (not self.funcs or frame.func.rsplit(".", 1)[-1] in self.funcs)


def rules(*files: str, funcs: Sequence[str] = ()) -> tuple[Rule, ...]:
    return tuple(Rule(f, frozenset(funcs)) for f in files)


# Each sample goes to the phase of its innermost frame that matches one, in this order: the specific phases
# come first, so a stdlib helper (contextlib, typing, threading...) counts for the library that called it.
# Innermost attribution is robust to what py-spy cannot show whole: SQLAlchemy runs its sync half in greenlets
# (stacks that start at Connection.execute), and --nonblocking sometimes reads a stack cut short at the root.
CHURN_FUNCS = ("connect", "__connect", "_connect", "_create_ssl_connection", "close", "_close_connection", "terminate")
PHASES: tuple[tuple[str, tuple[Rule, ...]], ...] = (
    (
        "Postgres connect/close (pool churn: asyncpg connect, startup, close)",
        rules("asyncpg/connect_utils.py")
        + rules("asyncpg/connection.py", "asyncpg/dialects", "sqlalchemy/pool/", funcs=CHURN_FUNCS)
        + rules("sqlalchemy/dialects/postgresql/asyncpg.py", "sqlalchemy/engine/default.py", funcs=CHURN_FUNCS),
    ),
    ("asyncpg: prepare/bind/execute/fetch (Python part, incl. socket write)", rules("asyncpg/")),
    ("SQLAlchemy: statement compile, cache key, coercions", rules("sqlalchemy/sql/")),
    ("SQLAlchemy: pool checkout/return", rules("sqlalchemy/pool/")),
    (
        "SQLAlchemy: async greenlet bridge",
        rules("sqlalchemy/util/concurrency", "sqlalchemy/util/_concurrency", "greenlet"),
    ),
    ("SQLAlchemy: engine execute, events, result rows, asyncpg adapter", rules("sqlalchemy/")),
    ("tokensvc: AES-GCM decrypt", rules("tokensvc/crypto.py", "cryptography/")),
    ("tokensvc: middleware (body limit, CORS)", rules("tokensvc/api/limits.py", "tokensvc/api/cors.py")),
    ("tokensvc: api/service/store/deps code", rules("tokensvc/")),
    (
        "threadpool hops for sync dependencies (anyio to_thread, worker threads)",
        rules("anyio/", "starlette/concurrency.py", "threading.py", "queue.py"),
    ),
    (
        "FastAPI: dependency solving, params, security",
        rules("fastapi/dependencies/", "fastapi/params", "fastapi/security"),
    ),
    ("pydantic", rules("pydantic/", "pydantic_core/")),
    ("FastAPI: app, routing, telemetry, body limit, exit stack", rules("fastapi/")),
    ("Starlette: middleware, routing, Request/Response", rules("starlette/")),
    ("uvicorn + httptools: HTTP parse, ASGI glue, send", rules("uvicorn/", "httptools/")),
    ("logging / metrics", rules("structlog/", "prometheus_client/", "logging/")),
    ("asyncio (Python part)", rules("asyncio/", "uvloop/")),
)
LOOP_LABEL = "event loop / C only (no Python frame above the loop)"
OTHER_LABEL = "stdlib with no library frame above (cut-short stacks)"
DB_GROUP = "database, all of it (SQLAlchemy + asyncpg + tokensvc store)"
GROUPS: tuple[tuple[str, tuple[Rule, ...]], ...] = (
    (DB_GROUP, rules("sqlalchemy/", "asyncpg/", "tokensvc/store/", "greenlet")),
    ("FastAPI + Starlette (framework)", rules("fastapi/", "starlette/")),
    ("FastAPI solve_dependencies", rules("fastapi/dependencies/utils.py", funcs=("solve_dependencies",))),
    ("threadpool (run_in_threadpool, worker threads)", rules("starlette/concurrency.py", "anyio/to_thread.py")),
    ("tokensvc endpoint access_token (api)", rules("tokensvc/api/tokens.py", funcs=("access_token",))),
    ("uvicorn send (response write)", rules("uvicorn/protocols/http/", funcs=("send",))),
)


@dataclass
class Frame:
    func: str
    file: str
    line: str

    @property
    def where(self) -> str:
        return f"{self.func} ({self.file})"


def parse_frame(text: str) -> Frame:
    match = FRAME_RE.match(text)
    if match is None:
        return Frame(text, "", "")
    return Frame(match["func"], match["file"], match["line"] or "")


def phase_of(frame: Frame) -> str | None:
    for label, phase_rules in PHASES:
        if any(rule.matches(frame) for rule in phase_rules):
            return label
    return None


def is_python(frame: Frame) -> bool:
    return frame.file.endswith(".py") or frame.file.startswith("<")


def strip_roots(frames: list[Frame]) -> list[Frame]:
    """Drop the start-up frames every sample shares (typer, uvicorn.run, asyncio.run) down to the loop.

    With --native, the event loop's own C frames (uvloop, libuv) that follow are dropped too.
    """
    last = -1
    for i, frame in enumerate(frames):
        if "asyncio/runners.py" in frame.file or "asyncio/base_events.py" in frame.file:
            last = i
    rest = frames[last + 1 :]
    if last >= 0:
        first_python = next((i for i, f in enumerate(rest) if is_python(f)), len(rest))
        rest = rest[first_python:]
    return rest


@dataclass
class Profile:
    samples: int = 0
    phases: Counter[str] = field(default_factory=Counter)
    groups: Counter[str] = field(default_factory=Counter)
    self_frames: Counter[str] = field(default_factory=Counter)
    cumulative: Counter[str] = field(default_factory=Counter)

    def pct(self, count: int) -> float:
        return 100.0 * count / self.samples if self.samples else 0.0


def analyse_raw(text: str) -> Profile:
    """Aggregate py-spy's raw (collapsed stacks) output: `frame;frame;... count` per line, root first."""
    profile = Profile()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = strip_roots([parse_frame(part) for part in stack.split(";")])
        python_frames = [f for f in frames if is_python(f)]
        profile.samples += count
        if not python_frames:
            profile.phases[LOOP_LABEL] += count
            profile.self_frames[LOOP_LABEL] += count
            continue
        profile.self_frames[frames[-1].where] += count
        phase = next((p for p in map(phase_of, reversed(python_frames)) if p is not None), OTHER_LABEL)
        profile.phases[phase] += count
        for label, group_rules in GROUPS:
            if any(rule.matches(f) for f in python_frames for rule in group_rules):
                profile.groups[label] += count
        for where in {f.where for f in frames}:
            profile.cumulative[where] += count
    return profile


def profile_report(profile: Profile, top: int) -> str:
    out = [f"{profile.samples} samples of the server's thread holding the GIL (idle time excluded)", ""]
    out.append(f"{'where the time goes (innermost matching frame; sums to 100%)':<74} {'%':>6}")
    for label, count in profile.phases.most_common():
        out.append(f"  {label:<72} {profile.pct(count):6.1f}")
    out += ["", f"{'inclusive: samples with any such frame (lower bounds: some stacks are cut short)':<74} {'%':>6}"]
    for label, _ in GROUPS:
        out.append(f"  {label:<72} {profile.pct(profile.groups[label]):6.1f}")
    out += ["", f"top {top} self frames (the function on CPU; C code shows as its Python caller)"]
    for where, count in profile.self_frames.most_common(top):
        out.append(f"  {profile.pct(count):5.1f}%  {where}")
    out += ["", f"top {top} cumulative frames"]
    for where, count in profile.cumulative.most_common(top):
        out.append(f"  {profile.pct(count):5.1f}%  {where}")
    return "\n".join(out)


def run_profile(
    config: WrkConfig, server: Process, py_spy: str, seconds: int, rate: int, blocking: bool, native: bool
) -> tuple[WrkResult, Path, str]:
    """py-spy on the server while wrk loads access-token (a run of its own, not one of the measured rounds)."""
    raw = config.out_dir / "profile-access-token.raw.txt"
    raw.unlink(missing_ok=True)
    wrk_seconds = seconds + 3  # wrk outlives the recording, so every sample is under load
    wrk_out = config.out_dir / "wrk-profile-access-token.txt"
    argv = config.argv("access-token", wrk_seconds)
    spy_argv = [py_spy, "record", "--pid", str(server.pid), "--duration", str(seconds), "--rate", str(rate)]
    # --gil: only the thread running Python (the event loop, or a threadpool worker running a sync dependency);
    # threads waiting for work would otherwise show up as busy.
    spy_argv += ["--format", "raw", "--output", str(raw), "--gil"]
    if native:
        spy_argv.append("--native")  # needs the blocking mode
    elif not blocking:
        # Blocking mode stops the process for every sample; the stop lands on syscall exits more often than
        # chance, which inflates the frames that write to sockets. Non-blocking reads memory while the server
        # runs: unbiased, at the price of some unreadable samples (reported as errors and left out).
        spy_argv.append("--nonblocking")
    before = config.snapshot(server)
    with wrk_out.open("w") as sink:
        wrk = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            try:
                spy = subprocess.run(spy_argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ProfilerError(f"py-spy did not run: {exc}") from exc
            wrk.wait(timeout=wrk_seconds + 60)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
    after = config.snapshot(server)
    text = wrk_out.read_text()
    result = parse_wrk("profile-access-token", "access-token", text, wrk_out)
    result.cpu = cpu_usage(before, after)
    check_clean(result, text)
    if spy.returncode != 0 or not raw.exists():
        raise ProfilerError(f"py-spy failed ({spy.returncode}): {(spy.stdout + spy.stderr).strip()[-1500:]}")
    return result, raw, (spy.stdout + spy.stderr).strip()


# -- report --------------------------------------------------------------------------------------------------


def best(results: list[WrkResult], mode: str) -> WrkResult:
    return max((r for r in results if r.mode == mode), key=lambda r: r.rps)


def fmt_cpu(cpu: CpuUsage | None) -> str:
    if cpu is None:
        return ""
    return (
        f"{cpu.server:6.0f}% {cpu.postgres:6.0f}% {cpu.wrk:5.0f}% {cpu.rest:5.0f}% {cpu.machine_busy:6.0f}%"
        f" {cpu.new_connections:9} {cpu.open_connections:5}"
    )


def describe_cpu(cpu: CpuUsage | None) -> str:
    if cpu is None:
        return "CPU not measured"
    return (
        f"CPU: server {cpu.server:.0f}%, postgres {cpu.postgres:.0f}%, wrk {cpu.wrk:.0f}%, rest {cpu.rest:.0f}%,"
        f" machine {cpu.machine_busy:.0f}%; {cpu.new_connections} new Postgres connections,"
        f" {cpu.open_connections} open at the end"
    )


CPU_LEGEND = """\
   CPU in percent of one core: the server process, Postgres processes alive at the end of the run, wrk, the rest
   (exited Postgres backends and anything else on the machine), and the whole machine ({cores} cores = {full}%).
   new conns: connections opened to the database during the run (each one forks a Postgres backend); open:
   connections to it open at the end of the run (the connections the server's pool holds)"""


def results_table(rows: list[WrkResult]) -> str:
    head = (
        f"{'run':<18} {'requests/s':>11} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'requests':>9}"
        f"  {'server':>7} {'pg':>7} {'wrk':>6} {'rest':>6} {'all':>7} {'new conns':>9} {'open':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.label:<18} {r.rps:11,.1f} {r.p50_ms:8.2f} {r.p90_ms:8.2f} {r.p99_ms:8.2f} {r.max_ms:8.1f}"
            f" {r.requests:9,}  {fmt_cpu(r.cpu)}"
        )
    return "\n".join(lines)


def print_environment(env: dict[str, Any], args: argparse.Namespace) -> None:
    print("== machine")
    mem = f", {env['mem_total_gib']:.1f} GiB RAM" if env["mem_total_gib"] else ""
    print(f"nproc {env['nproc']} (cpu_count {env['cpu_count']}), CPU: {env['cpu_model']}{mem}")
    print(f"kernel {env['kernel']}, load average at start {', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}")
    print("server, Postgres and wrk share these CPUs")
    if env["loadavg_at_start"][0] > LOADAVG_WARNING:
        print(
            f"WARNING: the machine was already busy (1-min load {env['loadavg_at_start'][0]:.2f}): figures may be low"
        )
    print("== versions")
    print(f"python {env['python']}")
    print("  ".join(f"{k} {v}" for k, v in env["packages"].items()))
    print(f"postgres {env['postgres']}; {env['wrk']}; py-spy {env['py_spy']}; tokensvc git {env['git']}")
    print("uvicorn loop=auto (uvloop when installed), http=auto (httptools when installed); one process, no workers")
    print("== settings")
    if args.server_env_map:
        print(f"server environment overrides: {args.server_env_map}")
    print(
        f"users {args.users}, duration {args.duration} s per run, connections {args.connections}, "
        f"threads {args.threads}, warm-up {args.warmup} s per endpoint, rounds {args.rounds}"
    )


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000, help="users seeded with valid tokens (default 1000)")
    parser.add_argument("--duration", type=int, default=15, help="seconds per measured wrk run (default 15)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per endpoint, not reported (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="(healthz, access-token) pairs; best is reported")
    parser.add_argument("--timeout", type=int, default=10, help="wrk per-request timeout in seconds (default 10)")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="Postgres server URL")
    parser.add_argument("--db-name", default="tokensvc_bench", help="database to (re)create and drop")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "out", help="logs, wrk output, profile")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--profile-seconds", type=int, default=10, help="py-spy recording length (default 10)")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--profile-top", type=int, default=25, help="frames listed in the profile summary")
    parser.add_argument(
        "--blocking", action="store_true", help="py-spy in blocking mode (default --nonblocking; see run_profile)"
    )
    parser.add_argument("--native", action="store_true", help="py-spy --native: C/Cython frames too (blocking mode)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, repeatable (e.g. TOKENSVC_DB_POOL_SIZE=64); overrides the defaults",
    )
    args = parser.parse_args(argv)
    args.server_env_map = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--server-env takes NAME=VALUE, got {item!r}")
        args.server_env_map[name] = value
    for name in ("users", "duration", "connections", "threads", "rounds", "timeout", "profile_seconds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads (wrk gives each thread its own connections)")
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed (apt-get install wrk)")
    py_spy = None if args.no_profile else find_py_spy()
    if not args.no_profile and py_spy is None:
        raise BenchError("py-spy is not installed: `.venv/bin/pip install py-spy`, or pass --no-profile")
    out_dir: Path = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    admin_url = f"{args.pg.rstrip('/')}/postgres"
    database_url = f"{args.pg.rstrip('/')}/{args.db_name}"
    quoted_identifier(args.db_name)

    server: Process | None = None
    created = False
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        pg_version = asyncio.run(recreate_database(admin_url, args.db_name))
        created = True
        env = environment(wrk, py_spy, pg_version)
        report["environment"] = env
        print_environment(env, args)

        server = start_server(database_url, out_dir, args.server_env_map)
        ready = asyncio.run(wait_ready(server, path="/healthz"))
        print(f"== server pid {server.pid} on {server.url}, ready in {ready:.1f} s (log: {server.log})")

        seed_seconds, _ = asyncio.run(seed_users(server.url, args.users))
        print(
            f"seeded {args.users} users in {seed_seconds:.1f} s ({args.users / seed_seconds:,.0f} PUT/s, not counted)"
        )

        config = WrkConfig(
            wrk, server.url, args.users, args.connections, args.threads, args.timeout, out_dir, admin_url, args.db_name
        )
        for mode in ("healthz", "access-token"):
            warm = run_wrk(config, server, mode, args.warmup, f"warmup-{mode}")
            print(f"warm-up {mode}: {warm.rps:,.0f} requests/s (not reported)")

        results: list[WrkResult] = []
        for round_no in range(1, args.rounds + 1):
            for mode in ("healthz", "access-token"):
                result = run_wrk(config, server, mode, args.duration, f"{mode} #{round_no}")
                results.append(result)
                print(f"{result.label}: {result.rps:,.1f} requests/s, p50 {result.p50_ms} ms, p99 {result.p99_ms} ms")

        best_health, best_access = best(results, "healthz"), best(results, "access-token")
        ratio = best_access.rps / best_health.rps
        print()
        print(f"== every run ({args.duration} s, {args.connections} connections, {args.threads} wrk threads)")
        print(CPU_LEGEND.format(cores=env["cpu_count"], full=env["cpu_count"] * 100))
        print(results_table(results))
        busy_elsewhere = [r.label for r in results if r.cpu is not None and r.cpu.rest > REST_WARNING]
        if busy_elsewhere:
            print(
                f"WARNING: more than {REST_WARNING:.0f}% of a core went elsewhere during {', '.join(busy_elsewhere)}"
                " (other processes on the machine, or Postgres connection churn): compare rounds with care"
            )
        print()
        print(f"== result: best of {args.rounds} rounds per endpoint (highest requests/s; p50/p99 from that run)")
        head = f"{'endpoint':<38} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8}"
        print(head)
        print("-" * len(head))
        for r in (best_health, best_access):
            path = "GET /healthz" if r.mode == "healthz" else "GET /v1/users/{random}/access-token"
            print(f"{path:<38} {r.rps:11,.1f} {r.p50_ms:8.2f} {r.p99_ms:8.2f}")
        print(f"ratio access-token / healthz = {ratio:.3f}   (target >= 0.5 now, >= 0.8 later)")
        medians = {
            mode: statistics.median(r.rps for r in results if r.mode == mode) for mode in ("healthz", "access-token")
        }
        print(
            f"(medians over the rounds: healthz {medians['healthz']:,.1f}, access-token "
            f"{medians['access-token']:,.1f} requests/s, ratio {medians['access-token'] / medians['healthz']:.3f})"
        )
        report["runs"] = [asdict(r) | {"output": str(r.output)} for r in results]
        report["best"] = {"healthz": asdict(best_health), "access-token": asdict(best_access)}
        for value in report["best"].values():
            value["output"] = str(value["output"])
        report["ratio"] = round(ratio, 3)
        report["median_rps"] = medians

        if py_spy is not None:
            print()
            mode = "native, blocking" if args.native else "blocking" if args.blocking else "non-blocking"
            print(f"== profile: py-spy ({mode}, --gil) on pid {server.pid}, {args.profile_seconds} s at")
            print(f"   {args.profile_rate} Hz, during a separate access-token load (same connections and threads)")
            try:
                load, raw, spy_log = run_profile(
                    config, server, py_spy, args.profile_seconds, args.profile_rate, args.blocking, args.native
                )
            except ProfilerError as exc:
                print(f"WARNING: no profile: {exc}", file=sys.stderr)
                report["profile"] = {"error": str(exc)}
                return report
            counts = re.search(r"Samples: (\d+) Errors: (\d+)", spy_log)
            spy_counts = f"py-spy samples {counts[1]}, errors {counts[2]}" if counts else spy_log[-300:]
            print(f"   load while profiling (slowed by the sampling): {load.rps:,.0f} requests/s; {spy_counts}")
            print(f"   {describe_cpu(load.cpu)}")
            profile = analyse_raw(raw.read_text())
            summary = profile_report(profile, args.profile_top)
            (out_dir / "profile-summary.txt").write_text(summary + "\n")
            print(summary)
            print(f"(raw stacks: {raw}; render with flamegraph.pl or speedscope)")
            report["profile"] = {
                "samples": profile.samples,
                "phases_pct": {k: round(profile.pct(v), 1) for k, v in profile.phases.most_common()},
                "inclusive_pct": {k: round(profile.pct(profile.groups[k]), 1) for k, _ in GROUPS},
                "load_rps": load.rps,
            }
        return report
    finally:
        if server is not None:
            server.stop()
            if server.popen.returncode not in (0, -signal.SIGTERM):
                print(f"note: the server exited with {server.popen.returncode}; see {server.log}", file=sys.stderr)
        if created:
            try:
                asyncio.run(drop_database(admin_url, args.db_name))
            except (OSError, asyncpg.PostgresError) as exc:
                print(f"warning: could not drop database {args.db_name}: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with terminate_as_exit():
        try:
            report = bench(args)
        except BenchError as exc:
            print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
            return 1
    results_file = args.out_dir.resolve() / "results.json"
    results_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nresults: {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
