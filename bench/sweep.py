"""Sweep at defaults: `--replicas` `tokensvc serve` on one Postgres refresh every due user of a large table.

    .venv/bin/python bench/sweep.py --pg postgresql://postgres@127.0.0.1:5432
        # = --replicas 3 --users 100000 --due 10000 --latency-ms 200, every server setting at its default

Seeds the sandbox (one athlete per due user) and `user_tokens` (COPY, encrypted with the servers' key), checks the
sweeper's claim is an index scan, makes every sandbox refresh take `--latency-ms`, then sends
`POST /v1/refresh-sweep` to every replica at once (the periodic sweep is off: its interval would be waited for,
not measured) and verifies and prints the pass: see bench/README.md. Exit 1 when a verification fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from benchlib import (
    BenchError,
    CpuMeter,
    cpu_seconds,
    describe_cpu,
    header,
    memory_kib,
    migrate,
    postgres_seconds,
    profiled,
    run_main,
    scratch_database,
    table,
)
from tests.e2e.processes import Process, Samples, scrape, service_env, start_replicas, start_sandbox

from tokensvc.config import Settings, normalize_database_url
from tokensvc.crypto import TokenCipher, generate_key
from tokensvc.db import make_engine
from tokensvc.store.tokens import due_statement

BENCH_DIR = Path(__file__).resolve().parent
API_KEY = "sweepbench-key-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BUFFER_SECONDS = 1800  # TOKENSVC_REFRESH_BUFFER_SECONDS default; the server is left at it
DUE_EXPIRES_IN = 300  # due users: the access token expires in 5 minutes (inside the buffer)
NOT_DUE_EXPIRES_IN = 6 * 3600  # the others: a fresh Strava token (6 h), next due in ~5 h
NOT_DUE_ATHLETE_BASE = 50_000_000  # athlete ids of not-due users (no sandbox athlete: never refreshed)
TARGET_RATIO = 0.8
TARGET_RSS_MB = 200.0
TARGET_CPU_MS = 3.0  # server CPU per refresh, summed over the replicas (issue 11)
SEED_CONCURRENCY = 50
COLUMNS = tuple(
    "user_id access_token_enc refresh_token_enc key_id expires_at athlete_id scopes last_refreshed_at "
    "created_at updated_at version sweep_at failure_count".split()
)
# flag -> the server setting it sets when given
SETTING_FLAGS = {
    "concurrency": "TOKENSVC_SWEEP_CONCURRENCY",
    "token_concurrency": "TOKENSVC_STRAVA_TOKEN_CONCURRENCY",
    "batch_size": "TOKENSVC_SWEEP_BATCH_SIZE",
    "pool_size": "TOKENSVC_DB_POOL_SIZE",
}


# -- seeding -------------------------------------------------------------------------------------------------


async def seed_athletes(sandbox_url: str, count: int) -> list[dict[str, Any]]:
    """`count` sandbox athletes whose access token expires in DUE_EXPIRES_IN (control API). A seeding POST is sent
    again after a transport error (uvicorn may close a kept-alive connection as it is reused on a busy machine); a
    lost answer only leaves an unused athlete behind."""
    limits = httpx.Limits(max_connections=SEED_CONCURRENCY)
    semaphore = asyncio.Semaphore(SEED_CONCURRENCY)
    async with httpx.AsyncClient(base_url=sandbox_url, limits=limits, timeout=30) as http:

        async def create() -> dict[str, Any]:
            async with semaphore:
                for attempt in range(3):
                    try:
                        response = await http.post("/_control/athletes", json={"expires_in": DUE_EXPIRES_IN})
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
            if response.status_code != 200:
                raise BenchError(f"sandbox /_control/athletes: {response.status_code} {response.text[:300]}")
            athlete: dict[str, Any] = response.json()
            return athlete

        return list(await asyncio.gather(*(create() for _ in range(count))))


def sweep_at(uid: str, expires_at: int) -> int:
    """`TokenService.sweep_at` at the default buffer: inside the buffer plus a per-user jitter of up to half of it."""
    jitter = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:4], "big") % (BUFFER_SECONDS // 2)
    return expires_at - BUFFER_SECONDS + jitter


def build_rows(users: int, due: dict[int, dict[str, Any]], key: str) -> list[tuple[Any, ...]]:
    """Every `user_tokens` row, encrypted exactly as the service encrypts (key, user id and field bound)."""
    cipher = TokenCipher([key])
    now = int(time.time())
    now_dt = datetime.fromtimestamp(now, UTC)
    rows: list[tuple[Any, ...]] = []
    for n in range(users):
        uid = f"sweep-user-{n:06d}"
        athlete = due.get(n) or {
            "access_token": secrets.token_hex(20),  # the shape of Strava's tokens
            "refresh_token": secrets.token_hex(20),
            "expires_at": now + NOT_DUE_EXPIRES_IN,
            "athlete_id": NOT_DUE_ATHLETE_BASE + n,
        }
        rows.append(
            (
                uid,
                cipher.encrypt(athlete["access_token"], user_id=uid, field="access"),
                cipher.encrypt(athlete["refresh_token"], user_id=uid, field="refresh"),
                cipher.current_key_id,
                athlete["expires_at"],
                athlete["athlete_id"],
                "read,activity:read_all",
                None,  # last_refreshed_at
                now_dt,
                now_dt,
                1,  # version
                sweep_at(uid, athlete["expires_at"]),
                0,  # failure_count
            )
        )
    return rows


async def load_rows(database_url: str, rows: list[tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for start in range(0, len(rows), 5000):
            await conn.copy_records_to_table("user_tokens", records=rows[start : start + 5000], columns=COLUMNS)
        # Every user in use, as after the upgrade's backfill: at the default TOKENSVC_SWEEP_ACTIVE_DAYS the sweep
        # refreshes only users something asked for lately. (A tree from before the table sweeps everyone.)
        if await conn.fetchval("SELECT to_regclass('token_usage') IS NOT NULL"):
            await conn.execute(
                "INSERT INTO token_usage (user_id, last_used_at) SELECT user_id, extract(epoch FROM now())::bigint"
                " FROM user_tokens ON CONFLICT (user_id) DO NOTHING"
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def fetch_one(database_url: str, sql: str, *params: object) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow(sql, *params)
    finally:
        await conn.close()


async def count_due_rows(database_url: str) -> tuple[int, int]:
    """(rows the sweeper would take now, rows ever refreshed)."""
    row = await fetch_one(
        database_url,
        "SELECT count(*) FILTER (WHERE reauth_reason IS NULL AND sweep_at <= $1),"
        " count(*) FILTER (WHERE last_refreshed_at IS NOT NULL) FROM user_tokens",
        int(time.time()),
    )
    return int(row[0]), int(row[1])


async def check_claim_plan(database_url: str, batch_size: int) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the sweeper's real claim (compiled by the engine's dialect, values inlined), in
    a transaction rolled back (ANALYZE takes the row locks); it must be an index scan on ix_user_tokens_sweep."""
    engine = make_engine(normalize_database_url(database_url), pool_size=1)
    statement = due_statement(now=int(time.time()), limit=batch_size)
    sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    engine.sync_engine.dispose()  # never connected
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            plan = "\n".join(str(r[0]) for r in await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"))
        finally:
            await transaction.rollback()
    finally:
        await conn.close()
    print(f"== the sweeper's claim (store.tokens.due_statement)\n{sql}\n-- EXPLAIN (ANALYZE, BUFFERS)\n{plan}")
    index_line = next((line.strip() for line in plan.splitlines() if "ix_user_tokens_sweep" in line), None)
    if index_line is None or "Index" not in index_line or "Seq Scan" in plan:
        raise BenchError("the claim statement is not an index scan on ix_user_tokens_sweep (plan above)")
    print(f"OK: {index_line}")


async def sandbox(http: httpx.AsyncClient, url: str, method: str, path: str, body: object = None) -> Any:
    response = await http.request(method, f"{url}{path}", json=body, timeout=60)
    if response.status_code != 200:
        raise BenchError(f"sandbox {path}: {response.status_code} {response.text[:300]}")
    return response.json()


# -- the sweep -----------------------------------------------------------------------------------------------


def refreshed(samples: Samples) -> float:
    return samples.get(("tokensvc_refresh_total", frozenset({("outcome", "refreshed"), ("trigger", "sweep")})), 0.0)


def rate_limited(samples: Samples) -> float:
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "tokensvc_refresh_total" and ("outcome", "rate_limited") in labels
    )


@dataclass
class SweepRun:
    """One pass: every replica's POST /v1/refresh-sweep at once; memory per replica, in replica order."""

    seconds: float
    reports: list[dict[str, int]]
    cpu: dict[str, float]
    rss_ready_kib: list[int]
    hwm_end_kib: list[int]
    strava_call_mean_ms: float
    rate_limited: float
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (seconds in, refreshed so far)

    @property
    def total(self) -> dict[str, int]:
        return summed(self.reports)


def summed(reports: list[dict[str, int]]) -> dict[str, int]:
    return {key: sum(int(r.get(key, 0)) for r in reports) for key in reports[0]}


async def refresh_sweep(http: httpx.AsyncClient, servers: list[Process]) -> list[dict[str, int]]:
    responses = await asyncio.gather(*(http.post(f"{server.url}/v1/refresh-sweep") for server in servers))
    for server, response in zip(servers, responses, strict=True):
        if response.status_code != 200:
            raise BenchError(f"{server.name} POST /v1/refresh-sweep: {response.status_code} {response.text[:500]}")
    return [response.json() for response in responses]


async def run_sweep(servers: list[Process], sandbox_process: Process) -> SweepRun:
    """One pass across the replicas, sampling progress every second."""
    ready = [memory_kib(server.pid) for server in servers]
    timeline: list[tuple[float, float]] = []
    async with httpx.AsyncClient(headers=AUTH, timeout=1800) as http:
        before = await scrape(http, *servers)
        meter = CpuMeter(
            {
                "server": lambda: sum(cpu_seconds(server.pid) for server in servers),
                "sandbox": lambda: cpu_seconds(sandbox_process.pid),
                "postgres": postgres_seconds,
            }
        )
        sweep = asyncio.create_task(refresh_sweep(http, servers))
        while not sweep.done():
            await asyncio.wait([sweep], timeout=1.0)
            if not sweep.done():
                timeline.append(
                    (time.monotonic() - meter.started, refreshed(await scrape(http, *servers)) - refreshed(before))
                )
        reports = sweep.result()
        cpu = meter.stop()
        end = [memory_kib(server.pid) for server in servers]
        after = await scrape(http, *servers)
    calls = after.get(("tokensvc_refresh_duration_seconds_count", frozenset()), 0.0) - before.get(
        ("tokensvc_refresh_duration_seconds_count", frozenset()), 0.0
    )
    call_seconds = after.get(("tokensvc_refresh_duration_seconds_sum", frozenset()), 0.0) - before.get(
        ("tokensvc_refresh_duration_seconds_sum", frozenset()), 0.0
    )
    timeline.append((cpu["seconds"], refreshed(after) - refreshed(before)))
    return SweepRun(
        seconds=cpu["seconds"],
        reports=reports,
        cpu=cpu,
        rss_ready_kib=[m.get("VmRSS", 0) for m in ready],
        hwm_end_kib=[m.get("VmHWM", 0) for m in end],
        strava_call_mean_ms=call_seconds / calls * 1000 if calls else 0.0,
        rate_limited=rate_limited(after) - rate_limited(before),
        timeline=timeline,
    )


def verify(
    run: SweepRun, stats: dict[str, Any], due_athletes: set[int], again: dict[str, int], left: tuple[int, int]
) -> list[str]:
    """Everything that must hold after the measured sweep; the problems (empty when all is well)."""
    problems = []
    due, report = len(due_athletes), run.total
    if report.get("refreshed") != due or report.get("checked") != due:
        problems.append(f"the sweep answered {report}, expected checked = refreshed = {due}")
    if report.get("failed") != 0 or report.get("needs_reauth") != 0:
        problems.append(f"the sweep had failures: {report}")
    if run.rate_limited:
        problems.append(f"{run.rate_limited:.0f} refreshes ended provider_rate_limited (want 0)")
    if stats["calls"].get("refresh") != due:
        problems.append(f"the sandbox saw {stats['calls'].get('refresh')} refresh calls, expected exactly {due}")
    by_athlete = {int(k): v for k, v in stats.get("refresh_by_athlete", {}).items()}
    if set(by_athlete) != due_athletes or any(v != 1 for v in by_athlete.values()):
        twice = sum(1 for v in by_athlete.values() if v != 1)
        missing = len(due_athletes - set(by_athlete))
        problems.append(f"refreshes per athlete: {twice} athletes not exactly once, {missing} never refreshed")
    if stats.get("ledger_violations"):
        problems.append(f"stale refresh tokens presented: {stats['ledger_violations'][:3]}")
    if again.get("checked") != 0:
        problems.append(f"a second sweep still found work: {again}")
    if left != (0, due):
        problems.append(f"after the sweep: {left[0]} rows still due, {left[1]} rows refreshed (want 0, {due})")
    return problems


def print_run(run: SweepRun, args: argparse.Namespace) -> list[str]:
    """The figures; returns the targets missed."""
    rate = args.due / run.seconds
    # What the settings allow: each replica's sweep keeps at most this many calls at Strava.
    slots = min(
        args.concurrency or default("sweep_concurrency"), args.token_concurrency or default("strava_token_concurrency")
    )
    ideal = args.replicas * slots / (args.latency_ms / 1000)
    per_refresh = {
        name: run.cpu[name] / 100 * run.seconds / args.due * 1000 for name in ("server", "sandbox", "postgres")
    }
    peak_mib = max(run.hwm_end_kib) / 1024
    print(f"== the sweep: POST /v1/refresh-sweep on {args.replicas} replicas at once, {run.seconds:.2f} s")
    print(f"   answers {run.reports}; summed {run.total}")
    print(
        f"   refreshes/s {rate:,.1f}; ideal {ideal:,.0f}/s"
        f" ({args.replicas} replicas x {slots} calls in flight / {args.latency_ms} ms)"
    )
    print(
        f"   Strava call (server's view) {run.strava_call_mean_ms:.1f} ms; {rate * run.strava_call_mean_ms / 1000:.1f}"
        f" calls in flight on average; provider_rate_limited {run.rate_limited:.0f}"
    )
    peaks = ", ".join(f"{k / 1024:.1f}" for k in run.hwm_end_kib)
    ready = ", ".join(f"{k / 1024:.1f}" for k in run.rss_ready_kib)
    print(f"   peak RSS (VmHWM) per replica: {peaks} MiB; RSS when ready {ready} MiB")
    print(f"   CPU in % of one core during the sweep: {describe_cpu(run.cpu)}")
    print("   CPU per refresh: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in per_refresh.items()))
    steps, previous = [], (0.0, 0.0)
    for at, done in run.timeline:
        if at - previous[0] >= max(0.5, run.seconds / 30):  # at most about 30 intervals
            steps.append(f"{at:.0f}s:{(done - previous[1]) / (at - previous[0]):.0f}")
            previous = (at, done)
    print(f"   refreshes/s over time (end of interval: rate): {' '.join(steps)}")
    # Steady state: from the first sample at least 1 s in to the last before the sweep answered.
    inner = [(at, done) for at, done in run.timeline[:-1] if at >= 1.0]
    if len(inner) >= 2 and inner[-1][0] - inner[0][0] >= 1.0:
        steady = (inner[-1][1] - inner[0][1]) / (inner[-1][0] - inner[0][0])
        print(f"   steady state (no ramp-up or tail): {steady:,.1f} refreshes/s, ratio {steady / ideal:.3f}")
    missed = [
        *([f"ratio {rate / ideal:.3f} < {TARGET_RATIO}"] if rate / ideal < TARGET_RATIO else []),
        *([f"peak RSS {peak_mib:.0f} MiB > {TARGET_RSS_MB:.0f}"] if peak_mib > TARGET_RSS_MB else []),
        *(
            [f"server CPU {per_refresh['server']:.2f} ms/refresh > {TARGET_CPU_MS}"]
            if per_refresh["server"] > TARGET_CPU_MS
            else []
        ),
    ]
    print("\n== result")
    head = ["replicas", "users", "due", "latency ms", "wall s", "refr./s", "ideal/s", "ratio", "max peak RSS MiB"]
    row = [
        args.replicas,
        args.users,
        args.due,
        args.latency_ms,
        run.seconds,
        rate,
        ideal,
        f"{rate / ideal:.3f}",
        peak_mib,
    ]
    print(table([*head, "server CPU ms/refr."], [[*row, per_refresh["server"]]]))
    print(
        f"targets: ratio >= {TARGET_RATIO}, peak RSS < {TARGET_RSS_MB:.0f} MiB, server CPU < {TARGET_CPU_MS} ms:"
        f" {'; '.join(missed) or 'met'}"
    )
    return missed


# -- the run -------------------------------------------------------------------------------------------------


def default(name: str) -> int:
    value: int = Settings.model_fields[name].default
    return value


def server_env(args: argparse.Namespace, database_url: str, sandbox_url: str, key: str) -> dict[str, str]:
    """At defaults but for what the bench must set, what a flag sets and `--server-env`."""
    settings = {name: str(getattr(args, flag)) for flag, name in SETTING_FLAGS.items() if getattr(args, flag)}
    settings |= dict(item.split("=", 1) for item in args.server_env)
    return service_env(database_url, sandbox_url, api_key=API_KEY, key=key, TOKENSVC_LOG_LEVEL="WARNING") | settings


async def bench(args: argparse.Namespace) -> bool:
    out_dir: Path = args.out_dir
    async with scratch_database(args.pg, args.db_name) as (database_url, pg_version):
        settings = (
            f"replicas {args.replicas}, users {args.users:,}, due {args.due:,}, sandbox latency {args.latency_ms} ms"
        )
        flags = [f"{name}={getattr(args, flag)}" for flag, name in SETTING_FLAGS.items() if getattr(args, flag)]
        header(
            "bench/sweep.py", f"{settings}; set: {', '.join(flags + args.server_env) or 'nothing'}", postgres=pg_version
        )
        if args.server_python != sys.executable:
            print(f"replicas and migrate run by {args.server_python}")
        key = generate_key()
        sandbox_process = start_sandbox(out_dir, cwd=out_dir)
        servers: list[Process] = []
        try:
            env = server_env(args, database_url, sandbox_process.url, key)
            await migrate(env, args.server_python)
            started = time.monotonic()
            athletes = await seed_athletes(sandbox_process.url, args.due)
            due_users = sorted(random.Random(20261127).sample(range(args.users), args.due))
            await load_rows(database_url, build_rows(args.users, dict(zip(due_users, athletes, strict=True)), key))
            print(
                f"seeded {args.due:,} sandbox athletes and {args.users:,} rows"
                f" in {time.monotonic() - started:.1f} s (not measured)"
            )
            if (still_due := (await count_due_rows(database_url))[0]) != args.due:
                raise BenchError(f"{still_due} rows are due after seeding, expected {args.due}")
            await check_claim_plan(database_url, args.batch_size or default("sweep_batch_size"))

            async with httpx.AsyncClient(headers=AUTH, timeout=120) as http:
                latency = {"endpoint": "refresh", "kind": "latency", "latency_ms": args.latency_ms, "count": args.due}
                await sandbox(http, sandbox_process.url, "POST", "/_control/faults", latency)
                servers = await start_replicas(args.replicas, out_dir, env, "--no-migrate", python=args.server_python)
                print()
                run = await run_sweep(servers, sandbox_process)
                missed = print_run(run, args)
                stats = await sandbox(http, sandbox_process.url, "GET", "/_control/stats")
                again = await refresh_sweep(http, servers)
                again_total = {key: sum(int(r.get(key, 0)) for r in again) for key in again[0]}
                left = await count_due_rows(database_url)
                problems = verify(run, stats, {a["athlete_id"] for a in athletes}, again_total, left)
                print(
                    f"verification: sandbox refresh calls {stats['calls'].get('refresh')}, ledger violations"
                    f" {len(stats.get('ledger_violations', []))}, second sweep {again_total}, rows still due {left[0]}"
                )
                for problem in problems:
                    print(f"VERIFICATION FAILED: {problem}", file=sys.stderr)
                if args.profile == "always" or (args.profile == "auto" and missed):
                    await profile(args, http, servers, sandbox_process, database_url, out_dir)
            return not problems
        finally:
            for process in [*servers, sandbox_process]:
                process.stop()


async def profile(
    args: argparse.Namespace,
    http: httpx.AsyncClient,
    servers: list[Process],
    sandbox_process: Process,
    database_url: str,
    out_dir: Path,
) -> None:
    """Make the same users due again and profile a second, identical pass on the first replica and the sandbox."""
    conn = await asyncpg.connect(database_url)
    try:
        now = int(time.time())
        await conn.execute(
            "UPDATE user_tokens SET expires_at = $1, sweep_at = $2 WHERE last_refreshed_at IS NOT NULL",
            now + DUE_EXPIRES_IN,
            now - 1,
        )
    finally:
        await conn.close()
    latency = {"endpoint": "refresh", "kind": "latency", "latency_ms": args.latency_ms, "count": args.due}
    await sandbox(http, sandbox_process.url, "POST", "/_control/faults", latency)
    print("\n== profile: py-spy during a second sweep of the same users (made due again)")
    async with profiled({"server": servers[0].pid, "sandbox": sandbox_process.pid}, out_dir):
        run = await run_sweep(servers, sandbox_process)
    print(f"(the profiled sweep: {args.due / run.seconds:,.0f} refreshes/s; CPU {describe_cpu(run.cpu)})")
    stats = await sandbox(http, sandbox_process.url, "GET", "/_control/stats")
    if stats.get("ledger_violations"):
        raise BenchError(f"stale refresh tokens presented in the profiled sweep: {stats['ledger_violations'][:3]}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--users", type=int, default=100_000, help="rows in user_tokens")
    parser.add_argument("--due", type=int, default=10_000, help="of them due for the sweeper")
    parser.add_argument("--latency-ms", type=int, default=200, help="sandbox latency per refresh")
    for flag, name in SETTING_FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None, help=f"set {name}")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE", help="repeatable")
    parser.add_argument("--server-python", default=sys.executable, help="another tree's .venv/bin/python")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="Postgres server URL")
    parser.add_argument("--db-name", default="tokensvc_sweepbench", help="database to (re)create and drop")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "out" / "sweep", help="logs and profiles")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy a second sweep when a target is missed (auto)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.due <= args.users or min(args.replicas, args.latency_ms) < 1:
        parser.error("want 1 <= --due <= --users, and --replicas and --latency-ms at least 1")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir = args.out_dir.resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not asyncio.run(bench(args)):
        print("BENCH FAILED: a verification failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
