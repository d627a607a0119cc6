"""Slow Strava (issue 11): refreshes waiting 8 s at Strava must not take readiness, reads, webhooks or writes down.

    .venv/bin/python bench/slowstrava.py  # = --due 50 --valid 20 --latency-ms 8000 --replicas 3

On a throwaway cluster (tests/reliability/cluster.py, or `--pg URL`), then SQLite with one process: the replicas
at defaults (but the sweep, off: the refreshes measured are the ones sent here, and the webhook verify token),
`--valid` valid and `--due` due users; an idle baseline of probes; then the due users' on-demand refreshes against
a `--latency-ms` Strava and, while they all wait, probe loops (`/readyz`, a valid user's access-token, a token-status
read, Strava's webhook POST; on SQLite also another user's import). Exit 1 unless every probe answered 2xx, every
refresh 200 with exactly one Strava call per due athlete, and the p99 targets held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from benchlib import BenchError, header, migrate, percentile, run_main, scratch_database, table
from tests.e2e.processes import Process, service_env, start_replicas, start_sandbox
from tests.reliability.cluster import Cluster, postgres_bin_dir

from tokensvc.config import Settings
from tokensvc.crypto import generate_key

API_KEY = "slow-key-0123456789abcdef"
VERIFY_TOKEN = "slow-verify-token"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
TARGETS_MS = {"readyz": 1000.0, "access-token": 100.0, "webhook": 500.0}
IMPORT_TARGET_MS = 1000.0  # SQLite: another user's import is not blocked
SPARE_ATHLETES = 640  # made beforehand for the import probes
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


def report(title: str, probes: Probes, targets: dict[str, float]) -> list[str]:
    failures: list[str] = []
    rows = []
    for name, values in probes.latencies.items():
        if not values:
            failures.append(f"{title}: no {name} answer inside the window")
            continue
        p99, target = percentile(values, 99), targets.get(name)
        if target is not None and p99 >= target:
            failures.append(f"{title}: {name} p99 {p99:.1f} ms >= {target:.0f} ms")
        verdict = "" if target is None else f"< {target:.0f} ms {'ok' if p99 < target else 'MISSED'}"
        rows.append([name, len(values), percentile(values, 50), p99, max(values), verdict])
    print(table(["request", "n", "p50 ms", "p99 ms", "max ms", "target (p99)"], rows))
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
    print(f"== {title}")
    sandbox = start_sandbox(out_dir, cwd=out_dir)
    servers: list[Process] = []
    try:
        extra = {"TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN": VERIFY_TOKEN, "TOKENSVC_LOG_LEVEL": "WARNING"}
        if args.token_concurrency_override is not None:
            extra["TOKENSVC_STRAVA_TOKEN_CONCURRENCY"] = str(args.token_concurrency_override)
        env = service_env(database_url, sandbox.url, api_key=API_KEY, key=generate_key(), **extra)
        await migrate(env)
        servers = await start_replicas(replicas, out_dir, env, "--no-migrate")
        writes = replicas == 1  # SQLite: a held write lock would block other users' imports
        # Every request on a new connection: a kept-alive one idle past uvicorn's 5 s keep-alive is closed by the
        # server and reads as a ReadError when reused (a client-side race, not what this measures).
        limits = httpx.Limits(max_connections=args.due + 64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            fleet = Fleet(sandbox, servers, http)
            await seed(fleet, args.due, args.valid)
            if writes:
                for _ in range(0, SPARE_ATHLETES, 32):
                    fleet.spare += await asyncio.gather(*(new_athlete(fleet, 6 * 3600) for _ in range(32)))
            print(f"   seeded {args.valid} valid and {args.due} due users; Strava token latency {args.latency_ms} ms")
            baseline, probes, answers = await measure(fleet, args, writes=writes)
            print(f"   baseline: nothing in flight, {args.baseline_seconds:.0f} s (no targets)")
            failures = report(f"{title} baseline", baseline, {})
            print(f"   while all {args.due} refreshes wait at Strava:")
            failures += report(title, probes, TARGETS_MS | ({"import (write)": IMPORT_TARGET_MS} if writes else {}))
            failures += await verify_refreshes(fleet, answers, title)
        failures += [f"{title}: {s.name} exited: {s.log_tail(500)}" for s in servers if not s.alive()]
        return failures
    finally:
        for process in [*servers, sandbox]:
            process.stop()


@asynccontextmanager
async def postgres(args: argparse.Namespace) -> AsyncIterator[str]:
    """The `--pg` server's scratch database, or a throwaway cluster's."""
    if args.pg:
        async with scratch_database(args.pg, args.db_name) as (url, _version):
            yield url.replace("postgresql://", "postgresql+asyncpg://")
        return
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise BenchError("no Postgres server binaries (initdb, pg_ctl); give --pg URL")
    cluster = Cluster(bin_dir)
    try:
        cluster.start()
        database = f"slow_{uuid.uuid4().hex[:8]}"
        cluster.psql(f"CREATE DATABASE {database}")
        yield cluster.url(database)
    finally:
        cluster.destroy()


async def run(args: argparse.Namespace, out_dir: Path) -> list[str]:
    async with postgres(args) as url:
        failures = await run_fleet(
            url, out_dir, args, replicas=args.replicas, title=f"Postgres, {args.replicas} replicas"
        )
    path = out_dir / "slowstrava.db"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    return failures + await run_fleet(
        f"sqlite+aiosqlite:///{path}", out_dir, args, replicas=1, title="SQLite, 1 process"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--due", type=int, default=50, help="users due, refreshed at once")
    parser.add_argument("--valid", type=int, default=20, help="users with valid tokens the probes read")
    parser.add_argument("--latency-ms", type=int, default=8000, help="sandbox latency per refresh")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--token-concurrency", type=int, default=None, help="set TOKENSVC_STRAVA_TOKEN_CONCURRENCY")
    parser.add_argument("--baseline-seconds", type=float, default=5.0, help="probes with nothing in flight first")
    parser.add_argument("--pg", default=None, help="a Postgres server URL to use instead of a throwaway cluster")
    parser.add_argument("--db-name", default="tokensvc_slowstrava", help="database made and dropped on --pg")
    args = parser.parse_args(argv)
    args.token_concurrency_override = args.token_concurrency
    if args.token_concurrency is None:
        args.token_concurrency = Settings(_env_file=None).strava_token_concurrency
    settings = f"due {args.due}, valid {args.valid}, Strava latency {args.latency_ms} ms, replicas {args.replicas}"
    header("bench/slowstrava.py", f"{settings}, token concurrency {args.token_concurrency}")
    out_dir = Path(tempfile.mkdtemp(prefix="tokensvc-slowstrava-"))
    failures = asyncio.run(run(args, out_dir))
    print(f"logs: {out_dir}")
    for failure in failures:
        print(f"  FAILED: {failure}")
    print("OK" if not failures else "BENCH FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
