"""A million athletes on one Postgres, and what the operators' reads cost at that size.

    .venv/bin/python bench/growth.py --pg postgresql://postgres@127.0.0.1:5432   # ≈ 5 min; --users/--events to scale

COPYs `--users` encrypted `user_tokens` rows, `--events` audit rows over 100 days, the hourly rollup,
`--notifications` outbox rows and `--webhook-events` Strava events (triggers off: no NOTIFY per row); prints
`EXPLAIN (ANALYZE, BUFFERS)` of every statement behind `/metrics`, `/v1/stats`, the dashboard and the outbox,
webhook and sweeper claims, and fails (exit 1) on a Seq Scan over a big table; times the retention purge; starts
`--replicas` `tokensvc serve` (sweeper off) and times `/metrics`, `/v1/stats` and `/dashboard`, `--warm` access
tokens of distinct users, and each replica's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import sqlalchemy as sa
from benchlib import REPO_DIR, BenchError, header, memory_kib, percentile, run_main, scratch_database, table
from tests.e2e.processes import Process, service_env, start_replicas

from tokensvc.crypto import TokenCipher, generate_key
from tokensvc.db import make_engine, migrate
from tokensvc.service.dashboard import DashboardService
from tokensvc.service.gateway_stats import GatewayTally
from tokensvc.service.housekeeping import Housekeeping
from tokensvc.service.rate_budget import RateBudget
from tokensvc.service.stats import StatsService
from tokensvc.store import outbox, webhook_events
from tokensvc.store import tokens as token_store

API_KEY = "growth-key-0123456789"
BUFFER = 1800
RETENTION_DAYS = 90
HISTORY_DAYS = 100
BIG_TABLES = frozenset({"user_tokens", "token_events", "notifications", "strava_webhook_events", "refresh_counts"})
COPY_BATCH = 50_000
DAY = 86_400


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="server (admin, trust auth)")
    parser.add_argument("--db-name", default="tokensvc_growth")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--notifications", type=int, default=200_000)
    parser.add_argument("--webhook-events", type=int, default=300_000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per endpoint")
    parser.add_argument("--warm", type=int, default=5000, help="access tokens asked of the first replica")
    parser.add_argument("--out-dir", type=Path, default=REPO_DIR / "bench" / "out")
    return parser.parse_args(argv)


# -- load --------------------------------------------------------------------------------------------------


def user_rows(count: int, cipher: TokenCipher, now: int) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(1)
    created = datetime.fromtimestamp(now - 200 * DAY, UTC)
    for i in range(count):
        user_id = f"u{i:07d}"
        draw = rng.random()
        if draw < 0.01:
            expires_at = now - rng.randrange(1, 3600)
        elif draw < 0.09:
            expires_at = now + rng.randrange(1, BUFFER)
        else:
            expires_at = now + rng.randrange(BUFFER + 1, 21_600)
        flagged = rng.random() < 0.02
        reason = rng.choice(("refresh_token_invalid", "deauthorized")) if flagged else None
        access = (
            None if reason == "deauthorized" else cipher.encrypt(secrets.token_hex(20), user_id=user_id, field="access")
        )
        refresh = (
            None
            if reason == "deauthorized"
            else cipher.encrypt(secrets.token_hex(20), user_id=user_id, field="refresh")
        )
        updated = datetime.fromtimestamp(now - rng.randrange(0, 30 * DAY), UTC)
        yield (
            user_id,
            access,
            refresh,
            cipher.current_key_id,
            expires_at,
            1_000_000 + i,
            "read,activity:read_all",
            reason,
            updated,
            created,
            updated,
            1 + rng.randrange(0, 500),
            expires_at - BUFFER + rng.randrange(0, BUFFER // 2),
            0,
            None,
        )


USER_COLUMNS = tuple(
    "user_id access_token_enc refresh_token_enc key_id expires_at athlete_id scopes reauth_reason "
    "last_refreshed_at created_at updated_at version sweep_at failure_count last_error".split()
)

FAILURES = ("transient", "rate_limited", "rejected", "answer_lost", "misconfigured")


def event_rows(count: int, users: int, now: int) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(2)
    for i in range(count):
        occurred = datetime.fromtimestamp(now - rng.randrange(0, HISTORY_DAYS * DAY), UTC)
        user_id = f"u{rng.randrange(users):07d}"
        draw = rng.random()
        if draw < 0.5:  # a success row as written before 0008
            yield (i + 1, occurred, user_id, "refresh", "sweep", "succeeded", 200, 180, None)
        elif draw < 0.8:
            outcome = rng.choice(FAILURES)
            status = {"transient": 503, "rate_limited": 429, "rejected": 400}.get(outcome)
            yield (i + 1, occurred, user_id, "refresh", "sweep", outcome, status, 900, "Strava answered 503")
        elif draw < 0.95:
            yield (i + 1, occurred, user_id, rng.choice(("imported", "connected")), None, None, None, None, None)
        else:
            yield (i + 1, occurred, user_id, "needs_reauth", "sweep", None, None, None, "refresh_token_invalid")


EVENT_COLUMNS = ("id", "occurred_at", "user_id", "kind", "trigger", "outcome", "strava_status", "duration_ms", "detail")


def count_rows(now: int) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(3)
    first = now - now % 3600 - HISTORY_DAYS * DAY
    for hour in range(first, now + 1, 3600):
        for outcome in ("succeeded", *FAILURES):
            for slot in range(8):
                yield (
                    hour,
                    outcome,
                    slot,
                    rng.randrange(1, 30_000) if outcome == "succeeded" else rng.randrange(0, 40),
                )


def notification_rows(count: int, users: int, now: int) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(4)
    for i in range(count):
        created = datetime.fromtimestamp(now - rng.randrange(0, HISTORY_DAYS * DAY), UTC)
        delivered = None if rng.random() < 0.01 else created + timedelta(seconds=rng.randrange(1, 60))
        due = now - rng.randrange(0, 600) if delivered is None else int(created.timestamp())
        payload = json.dumps({"type": "token.needs_reauth", "data": {"user_id": f"u{rng.randrange(users):07d}"}})
        yield (
            f"msg_{i:032x}",
            "token.needs_reauth",
            f"u{rng.randrange(users):07d}",
            payload,
            created,
            due,
            1,
            delivered,
            None,
        )


NOTIFICATION_COLUMNS = tuple(
    "id event_type user_id payload created_at next_attempt_at attempts delivered_at last_error".split()
)


def webhook_rows(count: int, users: int, now: int) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(5)
    for i in range(count):
        received = datetime.fromtimestamp(now - rng.randrange(0, HISTORY_DAYS * DAY), UTC)
        pending = rng.random() < 0.01
        owner = 1_000_000 + rng.randrange(users)
        yield (
            i + 1,
            f"athlete:{owner}:{i}:1",
            owner,
            "athlete",
            "update",
            int(received.timestamp()),
            1,
            '{"authorized":"false"}',
            received,
            "pending" if pending else "confirmed",
            0 if pending else 1,
            now - rng.randrange(0, 600) if pending else int(received.timestamp()),
            None if pending else received + timedelta(seconds=5),
            None if pending else "confirmed",
        )


WEBHOOK_COLUMNS = tuple(
    "id dedupe_key owner_id object_type aspect_type event_time subscription_id payload received_at state "
    "attempts next_attempt_at processed_at result".split()
)


async def copy(conn: asyncpg.Connection, table: str, rows: Iterator[tuple[Any, ...]], columns: Sequence[str]) -> int:
    total = 0
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == COPY_BATCH:
            await conn.copy_records_to_table(table, records=batch, columns=list(columns))
            total += len(batch)
            batch = []
    if batch:
        await conn.copy_records_to_table(table, records=batch, columns=list(columns))
        total += len(batch)
    return total


async def load(dsn: str, args: argparse.Namespace, cipher: TokenCipher, now: int) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    seconds: dict[str, float] = {}
    try:
        await conn.execute("SET session_replication_role = replica")  # no NOTIFY trigger per loaded row
        for table, rows, columns in (
            ("user_tokens", user_rows(args.users, cipher, now), USER_COLUMNS),
            ("token_events", event_rows(args.events, args.users, now), EVENT_COLUMNS),
            ("refresh_counts", count_rows(now), ("hour", "outcome", "slot", "count")),
            ("notifications", notification_rows(args.notifications, args.users, now), NOTIFICATION_COLUMNS),
            ("strava_webhook_events", webhook_rows(args.webhook_events, args.users, now), WEBHOOK_COLUMNS),
        ):
            started = time.monotonic()
            loaded = await copy(conn, table, rows, columns)
            seconds[table] = time.monotonic() - started
            print(f"  {table}: {loaded:,} rows in {seconds[table]:.1f} s", flush=True)
        for table in ("token_events", "strava_webhook_events"):
            await conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        started = time.monotonic()
        await conn.execute("VACUUM ANALYZE")
        seconds["vacuum_analyze"] = time.monotonic() - started
        sizes = await conn.fetch(
            "SELECT relname, pg_total_relation_size(oid) AS bytes FROM pg_class WHERE relname = ANY($1::text[])",
            list(BIG_TABLES),
        )
        for row in sorted(sizes, key=lambda r: r["relname"]):
            print(f"  size {row['relname']}: {row['bytes'] / 2**20:,.0f} MiB")
    finally:
        await conn.close()
    return seconds


# -- plans -------------------------------------------------------------------------------------------------


async def capture_plans(database_url: str, now: int) -> list[tuple[str, str, list[str]]]:
    """(what, plan text, seq scans over big tables) for every statement the operators' reads and the claims send."""
    engine = make_engine(database_url)
    captured: list[tuple[str, str, Any]] = []
    label = ["?"]

    def record(_conn: object, _cursor: object, statement: str, parameters: Any, *_rest: object) -> None:
        if not statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "WITH")):
            return
        captured.append((label[0], statement, parameters))

    clock = lambda: float(now)  # noqa: E731 - the load's "now"
    budget = RateBudget(engine, limit_15min=200, limit_daily=2000, clock=clock)
    tally = GatewayTally(engine, clock=clock)
    stats = StatsService(engine, budget=budget, tally=tally, clock=clock, buffer_seconds=BUFFER)
    dashboard = DashboardService(engine=engine, budget=budget, clock=clock, buffer_seconds=BUFFER)
    sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        label[0] = "/metrics gauges job"
        await stats.update_gauges()
        label[0] = "/v1/stats"
        await stats.stats()
        label[0] = "/dashboard"
        await dashboard.view()
        for what, claim in (
            ("outbox claim", lambda c: outbox.claim_due(c, now=now, limit=4, lease_until=now + 25)),
            ("webhook claim", lambda c: webhook_events.claim_pending(c, now=now, limit=20, lease_until=now + 300)),
            ("sweeper claim", lambda c: token_store.claim_due(c, now=now, limit=100, lease_until=now + 300)),
        ):
            label[0] = what
            async with engine.connect() as conn:
                await claim(conn)
                await conn.rollback()
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", record)
    plans: list[tuple[str, str, list[str]]] = []
    try:
        async with engine.connect() as conn:
            for what, statement, parameters in captured:
                explain = f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}"
                raw = (await conn.exec_driver_sql(explain, parameters)).scalar_one()
                plan = json.loads(raw) if isinstance(raw, str) else raw
                text = "\n".join(
                    (await conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters)).scalars()
                )
                await conn.rollback()  # the claims' UPDATEs ran under ANALYZE: undo them
                plans.append((what, f"{statement.strip()}\n{text}", sorted(seq_scans(plan[0]["Plan"]))))
    finally:
        await engine.dispose()
    return plans


def seq_scans(node: dict[str, Any]) -> set[str]:
    found = set()
    if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in BIG_TABLES:
        found.add(str(node["Relation Name"]))
    for child in node.get("Plans", []):
        found |= seq_scans(child)
    return found


# -- servers -----------------------------------------------------------------------------------------------


def rss_mib(replicas: list[Process]) -> list[float]:
    return [round(memory_kib(r.pid).get("VmRSS", 0) / 1024, 1) for r in replicas]


async def time_endpoints(replica: Process, requests: int) -> dict[str, list[float]]:
    """`requests` sequential GETs of each operator read; the milliseconds each took."""
    figures: dict[str, list[float]] = {}
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for path in ("/metrics", "/v1/stats", "/dashboard"):
            durations = figures.setdefault(path, [])
            for _ in range(requests):
                started = time.perf_counter()
                response = await http.get(f"{replica.url}{path}")
                durations.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise BenchError(f"{path} answered {response.status_code}: {response.text[:300]}")
    return figures


async def warm(replica: Process, users: int, count: int) -> int:
    """Access tokens of `count` distinct valid users (the token cache keeps them); returns the 200s."""
    rng = random.Random(6)
    ok = 0
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        ids = rng.sample(range(users), min(count, users))

        async def one(i: int) -> int:
            response = await http.get(f"{replica.url}/v1/users/u{i:07d}/access-token?min_ttl=60")
            return int(response.status_code == 200)

        for start in range(0, len(ids), 256):
            ok += sum(await asyncio.gather(*(one(i) for i in ids[start : start + 256])))
    return ok


# -- main --------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    async with scratch_database(args.pg, args.db_name) as (dsn, version):
        header("bench/growth.py", f"users {args.users:,}, events {args.events:,}", postgres=version)
        await grow(args, dsn)


async def grow(args: argparse.Namespace, dsn: str) -> None:
    database_url = "postgresql+asyncpg://" + dsn.split("://", 1)[1]
    replicas: list[Process] = []
    try:
        engine = make_engine(database_url)
        await migrate(engine)
        await engine.dispose()
        key = generate_key()
        now = int(time.time())
        print("load (COPY):", flush=True)
        await load(dsn, args, TokenCipher([key]), now)

        print("\nplans (EXPLAIN ANALYZE of every statement sent):")
        plans = await capture_plans(database_url, int(time.time()))
        bad = []
        for what, text, scans in plans:
            print(f"\n-- {what}\n{text}")
            if scans:
                bad.append(f"{what}: Seq Scan on {', '.join(scans)}")

        print("\nretention purge (Housekeeping.run_once at defaults: batches of 5000):")
        engine = make_engine(database_url)
        try:
            housekeeping = Housekeeping(engine, clock=time.time, retention_days=RETENTION_DAYS, pass_seconds=3600)
            started = time.monotonic()
            report = await housekeeping.run_once()
            purge_seconds = time.monotonic() - started
        finally:
            await engine.dispose()
        mean = purge_seconds * 1000 / max(1, report.batches)
        print(
            f"  {report.events_purged:,} audit rows, {report.notifications_purged:,} notifications, "
            f"{report.webhook_events_purged:,} webhook events, {report.counts_purged:,} rollup rows in "
            f"{report.batches} batches, {purge_seconds:.1f} s (mean batch {mean:.0f} ms, slowest "
            f"{report.slowest_batch_ms:.0f} ms)"
        )
        print(f"\nservers: {args.replicas} x tokensvc serve (defaults; sweeper off)")
        # Strava is never called: no user is due for a read here (the sweeper would refresh the due tenth).
        env = service_env(database_url, "http://127.0.0.1:9", api_key=API_KEY, key=key, TOKENSVC_LOG_LEVEL="WARNING")
        replicas = await start_replicas(args.replicas, args.out_dir, env, "--no-migrate")
        rss_started = rss_mib(replicas)
        timings = await time_endpoints(replicas[0], args.requests)
        rows = [[path, percentile(ms, 50), percentile(ms, 99), max(ms)] for path, ms in timings.items()]
        print(table(["endpoint", "p50 ms", "p99 ms", "max ms"], rows))
        warmed = await warm(replicas[0], args.users, args.warm)
        print(f"  access tokens asked of {replicas[0].name}: {args.warm} ({warmed} x 200)")
        for replica, started, after in zip(replicas, rss_started, rss_mib(replicas), strict=True):
            print(f"  RSS {replica.name}: {started:.0f} MiB after start, {after:.0f} MiB after the reads")
        if bad:
            raise BenchError("Seq Scan over a big table:\n  " + "\n  ".join(bad))
        print("\nno Seq Scan over a big table in any plan")
    finally:
        for replica in replicas:
            replica.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
