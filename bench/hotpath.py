"""Hot path: `GET /v1/users/{id}/access-token` (valid tokens) against `GET /healthz`, with wrk (bench/hotpath.lua).

    .venv/bin/python bench/hotpath.py     # = --users 1000 --duration 15 --connections 64 --threads 2; needs wrk

One `tokensvc serve` on a scratch Postgres database with `--users` valid users; after a warm-up, `--rounds` rounds
of (healthz, access-token) wrk runs of `--duration` s at the same connections. Every response is checked (a non-200,
or a 200 without `access_token`, fails the run). The figure is best access-token / best healthz requests/s, with
CPU per process and Postgres connections opened per run; then py-spy samples the server under access-token load
(`--no-profile` to skip). Strava points at a closed port: an attempted refresh would be an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from benchlib import (
    BenchError,
    CpuMeter,
    children_seconds,
    cpu_seconds,
    describe_cpu,
    header,
    postgres_seconds,
    profiled,
    run_main,
    scratch_database,
    table,
    wait_ready,
)
from tests.e2e.processes import Process, service_env, start_service

from tokensvc.crypto import generate_key

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "hotpath.lua"
API_KEY = "bench-key-0123456789"
USER_PREFIX = "bench-user-"
MODES = ("healthz", "access-token")


async def seed_users(base_url: str, users: int) -> None:
    """PUT valid tokens (6 h left) for `users` users; a few must then read back what was stored, uncached."""
    expires_at = int(time.time()) + 6 * 3600
    limits = httpx.Limits(max_connections=32)
    semaphore = asyncio.Semaphore(32)
    samples: dict[str, str] = {}
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, limits=limits
    ) as http:

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
                response = await http.put(f"/v1/users/{USER_PREFIX}{n}/tokens", json=body, timeout=30)
            if response.status_code != 200 or response.json().get("status") != "valid":
                raise BenchError(f"seeding {USER_PREFIX}{n}: {response.status_code} {response.text[:300]}")
            if n % max(users // 5, 1) == 0:
                samples[f"{USER_PREFIX}{n}"] = access

        await asyncio.gather(*(put(n) for n in range(users)))
        for uid, access in samples.items():
            response = await http.get(f"/v1/users/{uid}/access-token")
            if response.status_code != 200 or response.json().get("access_token") != access:
                raise BenchError(f"access-token for {uid} after seeding: {response.status_code}")
            if response.headers.get("cache-control") != "no-store":
                raise BenchError("access-token responses must carry Cache-Control: no-store")


@dataclass
class WrkRun:
    label: str
    mode: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu: dict[str, float]
    new_connections: int
    open_connections: int


async def pg_connections(admin_url: str, name: str) -> tuple[int, int]:
    """(connections ever made to database `name`, connections open to it now)."""
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


async def run_wrk(args: argparse.Namespace, server: Process, mode: str, seconds: int, label: str) -> WrkRun:
    """One wrk run of `mode`; fails unless every request was answered with a 200."""
    argv = [f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    argv += ["--script", str(LUA_SCRIPT), server.url, "--", mode]
    if mode == "access-token":
        argv += [str(args.users), API_KEY, USER_PREFIX]
    admin, db_name = args.pg_admin, args.db_name
    sessions_before, _ = await pg_connections(admin, db_name)
    meter = CpuMeter({"server": lambda: cpu_seconds(server.pid), "postgres": postgres_seconds, "wrk": children_seconds})
    wrk = await asyncio.create_subprocess_exec(
        args.wrk, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(seconds + 60):
        text = (await wrk.communicate())[0].decode()
    cpu = meter.stop()
    sessions_after, open_connections = await pg_connections(admin, db_name)
    output = args.out_dir / f"wrk-{label.replace(' #', '-')}.txt"
    output.write_text(f"$ wrk {' '.join(argv)}\n{text}")
    if wrk.returncode != 0 or not server.alive():
        raise BenchError(f"wrk ({label}) exited {wrk.returncode}, server alive: {server.alive()}:\n{text[-2000:]}")
    match = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.MULTILINE)
    if match is None:
        raise BenchError(f"wrk ({label}) printed no BENCH_RESULT line; see {output}")
    data = json.loads(match[1])
    problems = [
        *(["no request completed"] if data["requests"] == 0 else []),
        *([f"{data['non200']} responses were not a 200"] if data["non200"] else []),
        *([f"socket errors {data['errors']}"] if any(data["errors"].values()) else []),
        *(["wrk reported non-2xx/3xx responses"] if "Non-2xx or 3xx responses" in text else []),
    ]
    if problems:
        first_bad = re.search(r"^BENCH_FIRST_BAD (.*)$", text, re.MULTILINE)
        detail = f"; first bad response: {first_bad[1]}" if first_bad else ""
        raise BenchError(f"{label}: {'; '.join(problems)}{detail} (wrk output: {output})")
    return WrkRun(
        label,
        mode,
        data["requests"] / (data["duration_us"] / 1e6),
        data["p50_us"] / 1000,
        data["p99_us"] / 1000,
        data["requests"],
        cpu,
        sessions_after - sessions_before,
        open_connections,
    )


async def bench(args: argparse.Namespace) -> None:
    async with scratch_database(args.pg, args.db_name) as (database_url, pg_version):
        settings = (
            f"users {args.users}, {args.duration} s a run, wrk -t{args.threads} -c{args.connections}, warm-up "
            f"{args.warmup} s per endpoint, {args.rounds} rounds; one process, uvicorn loop and http auto"
        )
        header("bench/hotpath.py", settings, postgres=pg_version)
        # Nothing listens on the discard port: a refresh attempt would fail fast (and show up as a non-200).
        env = service_env(database_url, "http://127.0.0.1:9", api_key=API_KEY, key=generate_key())
        server = start_service("server", args.out_dir, env | {"TOKENSVC_LOG_LEVEL": "WARNING"})
        try:
            await wait_ready(server, path="/healthz")
            await seed_users(server.url, args.users)
            for mode in MODES:
                warm = await run_wrk(args, server, mode, args.warmup, f"warmup {mode}")
                print(f"warm-up {mode}: {warm.rps:,.0f} requests/s (not reported)")
            runs = []
            for round_no in range(1, args.rounds + 1):
                for mode in MODES:
                    runs.append(await run_wrk(args, server, mode, args.duration, f"{mode} #{round_no}"))
                    print(f"{runs[-1].label}: {runs[-1].rps:,.1f} requests/s", flush=True)
            report(runs)
            if not args.no_profile:
                print(f"\n== profile: py-spy on the server during {args.duration} s of access-token load")
                async with profiled({"server": server.pid}, args.out_dir, rate=250):
                    load = await run_wrk(args, server, "access-token", args.duration, "profile access-token")
                print(f"(load while profiling: {load.rps:,.0f} requests/s; CPU {describe_cpu(load.cpu)})")
        finally:
            server.stop()


def report(runs: list[WrkRun]) -> None:
    print("\n== every run: CPU in % of one core (rest: exited Postgres backends, anything else on the machine);")
    print("   new conns: connections opened to the database during the run; open: open at its end (the pool)")
    head = ["run", "requests/s", "p50 ms", "p99 ms", "requests", "server", "pg", "wrk", "rest", "all"]
    rows = [
        [r.label, r.rps, r.p50_ms, r.p99_ms, r.requests]
        + [round(r.cpu[k]) for k in ("server", "postgres", "wrk", "rest", "machine")]
        + [r.new_connections, r.open_connections]
        for r in runs
    ]
    print(table([*head, "new conns", "open"], rows))
    best = {mode: max((r for r in runs if r.mode == mode), key=lambda r: r.rps) for mode in MODES}
    median = {mode: statistics.median(r.rps for r in runs if r.mode == mode) for mode in MODES}
    print("\n== result: best round per endpoint (p50/p99 from that run)")
    paths = {"healthz": "GET /healthz", "access-token": "GET /v1/users/{random}/access-token"}
    print(
        table(
            ["endpoint", "requests/s", "p50 ms", "p99 ms"],
            [[paths[m], r.rps, r.p50_ms, r.p99_ms] for m, r in best.items()],
        )
    )
    print(f"ratio access-token / healthz = {best['access-token'].rps / best['healthz'].rps:.3f}   (target >= 0.5)")
    print(
        f"(medians over the rounds: healthz {median['healthz']:,.1f}, access-token {median['access-token']:,.1f}"
        f" requests/s, ratio {median['access-token'] / median['healthz']:.3f})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000, help="users seeded with valid tokens")
    parser.add_argument("--duration", type=int, default=15, help="seconds per measured wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per endpoint, not reported")
    parser.add_argument("--rounds", type=int, default=2, help="(healthz, access-token) pairs; the best is reported")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="Postgres server URL")
    parser.add_argument("--db-name", default="tokensvc_bench", help="database to (re)create and drop")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "out", help="logs, wrk output, profile")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    args = parser.parse_args(argv)
    if min(args.users, args.duration, args.warmup, args.rounds) < 1 or args.connections < args.threads:
        parser.error("every count must be at least 1, and --connections at least --threads")
    args.wrk = shutil.which("wrk")
    if args.wrk is None:
        raise BenchError("wrk is not installed (apt-get install wrk)")
    args.pg_admin = f"{args.pg.rstrip('/')}/postgres"
    args.out_dir = args.out_dir.resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
