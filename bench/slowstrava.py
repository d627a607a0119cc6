"""Slow Strava (issue 11): refreshes waiting 8 s at Strava must not take readiness, reads, webhooks or writes down.

    .venv/bin/python bench/slowstrava.py        # = --due 50 --latency-ms 8000 --replicas 3 --valid 20

Postgres: a throwaway cluster (tests/reliability/cluster.py, removed at the end; or `--pg URL` for a server you
give, where only the `--db-name` database is touched), the sandbox, and `--replicas` `tokensvc serve` processes at
default settings. Set on top of the defaults, and why: the credentials, keys and URLs a replica needs, the webhook
verify token (webhooks are off without it), `TOKENSVC_SWEEP_INTERVAL_SECONDS=0` (the refreshes measured are the 50
on-demand ones sent here; a sweep would refresh the due users at a time of its own) and log level WARNING.

1. imports `--due` users whose tokens expire in 10 minutes (due: inside the default 30-minute buffer) and `--valid`
   users whose tokens live 6 h, then queues `--due` sandbox `latency` faults of `--latency-ms` on refresh calls;
2. sends `POST /v1/users/{id}/refresh` for every due user at once, spread round-robin over the replicas;
3. once the sandbox has received all `--due` refresh calls (they now wait there), and until the first refresh
   answers, measures in parallel loops over the replicas: `GET /readyz`, a valid user's `GET …/access-token`,
   `GET …/token-status`, and Strava's webhook `POST /v1/webhooks/strava` (an activity event for a valid athlete);
4. checks that every refresh answered 200 `refreshed`, and that the sandbox saw exactly one refresh call per due
   athlete (`/_control/stats`), and every probe answered 200.
Then the SQLite variant with one process: the same due users and slow refreshes, and while they wait, other users'
writes (`PUT /v1/users/{id}/tokens`, imports of new users) plus the same reads, with their p50/p99.

Targets: readyz < 1 s, access-token < 100 ms, webhook < 500 ms (p99); imports on SQLite are not blocked (p99 well
under the Strava latency). Exit 1 when a check or a target fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.reliability.cluster

from benchlib import (
    BenchError,
    cpu_model,
    drop_database,
    git_revision,
    recreate_database,
    terminate_as_exit,
    wait_ready,
)
from tests.e2e.processes import Process, clean_env, free_port, start_sandbox
from tests.reliability.cluster import Cluster, postgres_bin_dir

from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Settings
from tokensvc.crypto import generate_key

API_KEY = "slow-key-0123456789abcdef"
VERIFY_TOKEN = "slow-verify-token"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TARGETS_MS = {"readyz": 1000.0, "access-token": 100.0, "webhook": 500.0}
ALL_HELD_DEADLINE_SECONDS = 30.0


@dataclass
class Fleet:
    sandbox: Process
    replicas: list[Process]
    http: httpx.AsyncClient
    valid: list[tuple[str, int]] = field(default_factory=list)  # (user id, athlete id)
    due: list[tuple[str, int]] = field(default_factory=list)
    spare: list[dict[str, Any]] = field(default_factory=list)  # sandbox athletes made beforehand, for import probes


@dataclass
class Probes:
    latencies: dict[str, list[float]] = field(default_factory=dict)  # ms
    errors: list[str] = field(default_factory=list)


def replica_env(database_url: str, sandbox_url: str, key: str, token_concurrency: int | None) -> dict[str, str]:
    extra = {} if token_concurrency is None else {"TOKENSVC_STRAVA_TOKEN_CONCURRENCY": str(token_concurrency)}
    return extra | {
        "TOKENSVC_DATABASE_URL": database_url,
        "TOKENSVC_STRAVA_BASE_URL": sandbox_url,
        "TOKENSVC_STRAVA_CLIENT_ID": SANDBOX_CLIENT_ID,
        "TOKENSVC_STRAVA_CLIENT_SECRET": SANDBOX_CLIENT_SECRET,
        "TOKENSVC_API_KEYS": API_KEY,
        "TOKENSVC_ENCRYPTION_KEYS": key,
        "TOKENSVC_SESSION_SECRET": "slow-session-secret-" + "s" * 32,
        "TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN": VERIFY_TOKEN,
        "TOKENSVC_SWEEP_INTERVAL_SECONDS": "0",
        "TOKENSVC_LOG_LEVEL": "WARNING",
    }


def start_replica(name: str, out_dir: Path, env: dict[str, str]) -> Process:
    port = free_port()
    log = out_dir / f"{name}.log"
    with log.open("wb") as sink:
        popen = subprocess.Popen(
            [sys.executable, "-m", "tokensvc", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-migrate"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(**env),
            cwd=out_dir,
        )
    return Process(name, popen, f"http://127.0.0.1:{port}", log)


def migrate(env: dict[str, str], out_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokensvc", "migrate"],
        env=clean_env(**env),
        cwd=out_dir,
        capture_output=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise BenchError(f"tokensvc migrate failed: {done.stderr.decode()[-2000:]}")


async def new_athlete(fleet: Fleet, expires_in: int) -> dict[str, Any]:
    response = await fleet.http.post(f"{fleet.sandbox.url}/_control/athletes", json={"expires_in": expires_in})
    if response.status_code != 200:
        raise BenchError(f"sandbox athletes: {response.status_code} {response.text[:200]}")
    athlete: dict[str, Any] = response.json()
    return athlete


async def import_user(fleet: Fleet, replica: Process, expires_in: int, prefix: str) -> tuple[str, int]:
    athlete = await new_athlete(fleet, expires_in)
    user_id = f"{prefix}-{athlete['athlete_id']}"
    body = {k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
    response = await fleet.http.put(f"{replica.url}/v1/users/{user_id}/tokens", json=body, headers=HEADERS)
    if response.status_code != 200:
        raise BenchError(f"import {user_id}: {response.status_code} {response.text[:200]}")
    return user_id, int(athlete["athlete_id"])


async def seed(fleet: Fleet, due: int, valid: int) -> None:
    replicas = fleet.replicas
    fleet.valid = list(
        await asyncio.gather(
            *(import_user(fleet, replicas[n % len(replicas)], 6 * 3600, "valid") for n in range(valid))
        )
    )
    fleet.due = list(
        await asyncio.gather(*(import_user(fleet, replicas[n % len(replicas)], 600, "due") for n in range(due)))
    )


async def sandbox_stats(fleet: Fleet) -> dict[str, Any]:
    response = await fleet.http.get(f"{fleet.sandbox.url}/_control/stats")
    stats: dict[str, Any] = response.json()
    return stats


async def refresh_calls(fleet: Fleet) -> int:
    return int((await sandbox_stats(fleet))["calls"].get("refresh", 0))


def webhook_event(athlete_id: int) -> dict[str, object]:
    return {
        "object_type": "activity",
        "object_id": int(time.time() * 1000) % 10**9,
        "aspect_type": "create",
        "owner_id": athlete_id,
        "subscription_id": 1,
        "event_time": int(time.time()),
    }


async def probe_loop(
    name: str,
    fleet: Fleet,
    probes: Probes,
    stop: asyncio.Event,
    send: Callable[[Process, int], Awaitable[httpx.Response]],
) -> None:
    """Sequential requests of one kind, round-robin over the replicas, until `stop`; every answer must be a 2xx."""
    samples = probes.latencies.setdefault(name, [])
    n = 0
    while not stop.is_set():
        replica = fleet.replicas[n % len(fleet.replicas)]
        started = time.perf_counter()
        try:
            response = await send(replica, n)
        except httpx.HTTPError as exc:
            probes.errors.append(
                f"{name} {replica.name}: {type(exc).__name__} after {time.perf_counter() - started:.2f} s"
            )
        else:
            if stop.is_set():  # answered after the window closed: not measured while all refreshes waited
                break
            samples.append((time.perf_counter() - started) * 1000)
            if not 200 <= response.status_code < 300:
                probes.errors.append(f"{name} {replica.name}: {response.status_code} {response.text[:200]}")
        n += 1


def probe_kinds(fleet: Fleet, *, writes: bool) -> dict[str, Callable[[Process, int], Awaitable[httpx.Response]]]:
    def valid(n: int) -> tuple[str, int]:
        return fleet.valid[n % len(fleet.valid)]

    kinds: dict[str, Callable[[Process, int], Awaitable[httpx.Response]]] = {
        "readyz": lambda r, n: fleet.http.get(f"{r.url}/readyz"),
        "access-token": lambda r, n: fleet.http.get(f"{r.url}/v1/users/{valid(n)[0]}/access-token", headers=HEADERS),
        "token-status": lambda r, n: fleet.http.get(f"{r.url}/v1/users/{valid(n)[0]}/token-status", headers=HEADERS),
        "webhook": lambda r, n: fleet.http.post(f"{r.url}/v1/webhooks/strava", json=webhook_event(valid(n)[1])),
    }
    if writes:
        kinds["import (write)"] = lambda r, n: import_response(fleet, r)
    return kinds


async def import_response(fleet: Fleet, replica: Process) -> httpx.Response:
    """A new user's import: one write transaction, the kind a held SQLite write lock would block."""
    athlete = fleet.spare.pop() if fleet.spare else await new_athlete(fleet, 6 * 3600)
    body = {k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
    return await fleet.http.put(
        f"{replica.url}/v1/users/other-{athlete['athlete_id']}/tokens", json=body, headers=HEADERS
    )


async def wait_all_held(fleet: Fleet, due: int, refreshes: list[asyncio.Task[httpx.Response]]) -> float:
    """Until the sandbox has received `due` refresh calls (each waits the latency there); the seconds it took."""
    started = time.monotonic()
    async with asyncio.timeout(ALL_HELD_DEADLINE_SECONDS):
        while await refresh_calls(fleet) < due:
            done = [task for task in refreshes if task.done()]
            if done:
                failed = done[0].exception()
                answer = repr(failed) if failed is not None else done[0].result().text[:200]
                raise BenchError(f"a refresh answered before all of them reached Strava: {answer}")
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def run_probes(fleet: Fleet, until: Awaitable[object], *, writes: bool) -> tuple[Probes, float]:
    """Every probe kind in its own loop until `until` is done; the probes and the window's seconds."""
    probes, stop = Probes(), asyncio.Event()
    loops = [
        asyncio.create_task(probe_loop(name, fleet, probes, stop, send))
        for name, send in probe_kinds(fleet, writes=writes).items()
    ]
    started = time.monotonic()
    await until
    window = time.monotonic() - started
    stop.set()
    await asyncio.gather(*loops)
    return probes, window


async def measure(
    fleet: Fleet, args: argparse.Namespace, *, writes: bool
) -> tuple[Probes, Probes, list[httpx.Response]]:
    """A baseline with nothing in flight; then the due users' refreshes, probing while every one waits at Strava."""
    baseline, _ = await run_probes(fleet, asyncio.sleep(args.baseline_seconds), writes=writes)
    due = len(fleet.due)
    faults = {"endpoint": "refresh", "kind": "latency", "latency_ms": args.latency_ms, "count": due}
    (await fleet.http.post(f"{fleet.sandbox.url}/_control/faults", json=faults)).raise_for_status()
    sent = time.monotonic()
    refreshes = [
        asyncio.create_task(
            fleet.http.post(f"{fleet.replicas[n % len(fleet.replicas)].url}/v1/users/{uid}/refresh", headers=HEADERS)
        )
        for n, (uid, _athlete) in enumerate(fleet.due)
    ]
    # Each replica keeps at most TOKENSVC_STRAVA_TOKEN_CONCURRENCY token calls at Strava; the rest wait their turn.
    per_replica = [len(fleet.due[i :: len(fleet.replicas)]) for i in range(len(fleet.replicas))]
    at_strava = sum(min(n, args.token_concurrency) for n in per_replica)
    held_after = await wait_all_held(fleet, at_strava, refreshes)
    probes, window = await run_probes(
        fleet, asyncio.wait(refreshes, return_when=asyncio.FIRST_COMPLETED), writes=writes
    )
    answers = await asyncio.gather(*refreshes)
    print(
        f"   {due} refreshes in flight, {at_strava} of them at Strava ({held_after:.2f} s after sending; token "
        f"concurrency {args.token_concurrency} per replica); probed for {window:.2f} s, until the first answered; "
        f"all answered {time.monotonic() - sent:.2f} s after sending"
    )
    return baseline, probes, answers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def report(title: str, probes: Probes, targets: dict[str, float]) -> list[str]:
    failures: list[str] = []
    print(f"   {'request':<16} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}  target (p99)")
    for name, values in probes.latencies.items():
        if not values:
            failures.append(f"{title}: no {name} answer inside the window")
            continue
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        target = targets.get(name)
        verdict = "" if target is None else (f"< {target:.0f} ms ok" if p99 < target else f"< {target:.0f} ms MISSED")
        if target is not None and p99 >= target:
            failures.append(f"{title}: {name} p99 {p99:.1f} ms >= {target:.0f} ms")
        print(f"   {name:<16} {len(values):5} {p50:9.1f} {p99:9.1f} {max(values):9.1f}  {verdict}")
    failures.extend(f"{title}: {error}" for error in probes.errors[:20])
    return failures


async def verify_refreshes(fleet: Fleet, answers: list[httpx.Response], title: str) -> list[str]:
    failures = []
    for (uid, _athlete), answer in zip(fleet.due, answers, strict=True):
        if answer.status_code != 200 or answer.json().get("refreshed") is not True:
            failures.append(f"{title}: refresh {uid}: {answer.status_code} {answer.text[:200]}")
    stats = await sandbox_stats(fleet)
    by_athlete = stats["refresh_by_athlete"]
    wrong = {aid: by_athlete.get(str(aid), 0) for _uid, aid in fleet.due if by_athlete.get(str(aid), 0) != 1}
    extra = {aid: n for aid, n in by_athlete.items() if int(aid) not in {a for _u, a in fleet.due}}
    ok, calls = len(answers) - len(failures), stats["calls"].get("refresh", 0)
    print(
        f"   refreshes: {ok}/{len(answers)} answered 200 refreshed; sandbox refresh calls {calls}"
        f" (per due athlete exactly 1: {'yes' if not wrong else f'NO {wrong}'}; calls for other athletes: {extra or 0})"
    )
    if wrong or extra:
        failures.append(f"{title}: Strava refresh calls per athlete not exactly one: {wrong} {extra}")
    if stats.get("ledger_violations"):
        failures.append(f"{title}: ledger violations {stats['ledger_violations'][:5]}")
    return failures


async def run_fleet(
    database_url: str, out_dir: Path, args: argparse.Namespace, *, replicas: int, title: str
) -> list[str]:
    sandbox = start_sandbox(out_dir, "--client-id", SANDBOX_CLIENT_ID, cwd=out_dir)
    processes = [sandbox]
    try:
        env = replica_env(database_url, sandbox.url, generate_key(), args.token_concurrency_override)
        migrate(env, out_dir)
        servers = [start_replica(f"replica-{i}", out_dir, env) for i in range(replicas)]
        processes.extend(servers)
        # Every request on a new connection: a kept-alive one idle past uvicorn's 5 s keep-alive is closed by the
        # server and reads as a ReadError when reused (a client-side race, not what this measures).
        limits = httpx.Limits(max_connections=args.due + 64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            for server in servers:
                await wait_ready(server)
            fleet = Fleet(sandbox, servers, http)
            await seed(fleet, args.due, args.valid)
            if args.writes or replicas == 1:
                for _ in range(0, args.spare, 32):
                    fleet.spare += await asyncio.gather(*(new_athlete(fleet, 6 * 3600) for _ in range(32)))
            print(f"   seeded {args.valid} valid and {args.due} due users; Strava token latency {args.latency_ms} ms")
            baseline, probes, answers = await measure(fleet, args, writes=args.writes or replicas == 1)
            print(f"   baseline: nothing in flight, {args.baseline_seconds:.0f} s (no targets)")
            failures = report(f"{title} baseline", baseline, {})
            print(f"   while all {args.due} refreshes wait at Strava:")
            targets = TARGETS_MS | ({"import (write)": args.write_target_ms} if replicas == 1 else {})
            failures += report(title, probes, targets)
            failures += await verify_refreshes(fleet, answers, title)
        for server in servers:
            if not server.alive():
                failures.append(f"{title}: {server.name} exited: {server.log_tail(500)}")
        return failures
    finally:
        for process in reversed(processes):
            process.stop()


async def postgres_variant(args: argparse.Namespace, out_dir: Path) -> list[str]:
    title = f"Postgres, {args.replicas} replicas"
    print(f"== {title}")
    if args.pg:
        await recreate_database(args.pg, args.db_name)
        base = args.pg.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
        try:
            return await run_fleet(f"{base}/{args.db_name}", out_dir, args, replicas=args.replicas, title=title)
        finally:
            await drop_database(args.pg, args.db_name)
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise BenchError("no Postgres server binaries (initdb, pg_ctl); give --pg URL")
    cluster = Cluster(bin_dir)
    try:
        cluster.start()
        database = f"slow_{uuid.uuid4().hex[:8]}"
        cluster.psql(f"CREATE DATABASE {database}")
        return await run_fleet(cluster.url(database), out_dir, args, replicas=args.replicas, title=title)
    finally:
        cluster.destroy()


async def sqlite_variant(args: argparse.Namespace, out_dir: Path) -> list[str]:
    title = "SQLite, 1 process"
    print(f"== {title}")
    path = out_dir / "slowstrava.db"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    return await run_fleet(f"sqlite+aiosqlite:///{path}", out_dir, args, replicas=1, title=title)


async def run(args: argparse.Namespace, out_dir: Path) -> list[str]:
    failures: list[str] = []
    if not args.skip_postgres:
        failures += await postgres_variant(args, out_dir)
    if not args.skip_sqlite:
        failures += await sqlite_variant(args, out_dir)
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--due", type=int, default=50, help="users due, refreshed at once (default 50)")
    parser.add_argument("--valid", type=int, default=20, help="users with valid tokens the probes read (default 20)")
    parser.add_argument("--latency-ms", type=int, default=8000, help="sandbox latency per refresh (default 8000)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument(
        "--token-concurrency",
        type=int,
        default=None,
        help="set TOKENSVC_STRAVA_TOKEN_CONCURRENCY (default: the service's, 32)",
    )
    parser.add_argument("--baseline-seconds", type=float, default=5.0, help="probes with nothing in flight first")
    parser.add_argument("--write-target-ms", type=float, default=1000.0, help="SQLite import p99 target (default 1000)")
    parser.add_argument("--spare", type=int, default=640, help="athletes made beforehand for import probes")
    parser.add_argument("--writes", action="store_true", help="probe imports on Postgres too")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--pg", default=None, help="a Postgres server URL to use instead of a throwaway cluster")
    parser.add_argument("--db-name", default="tokensvc_slowstrava", help="database made and dropped on --pg")
    args = parser.parse_args(argv)
    args.token_concurrency_override = args.token_concurrency
    if args.token_concurrency is None:
        args.token_concurrency = Settings(_env_file=None).strava_token_concurrency
    print(f"machine: nproc {os.cpu_count()}, {cpu_model()}; python {sys.version.split()[0]}; tokensvc {git_revision()}")
    print(f"load average at start {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    out_dir = Path(tempfile.mkdtemp(prefix="tokensvc-slowstrava-"))
    try:
        with terminate_as_exit():
            failures = asyncio.run(run(args, out_dir))
    except BenchError as exc:
        print(f"BENCHMARK FAILED: {exc}")
        return 1
    print(f"logs: {out_dir}")
    for failure in failures:
        print(f"  FAILED: {failure}")
    print("OK" if not failures else "BENCHMARK FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
