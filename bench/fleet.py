"""Ten replicas at defaults on one Postgres with max_connections = 100: the connection budget under mixed load.

    .venv/bin/python bench/fleet.py        # = --replicas 10 --seconds 120 --users 300 --clients 64

A throwaway cluster (tests/reliability/cluster.py) with `max_connections = 100`, the sandbox and `--replicas`
replicas at default connection settings, and `--clients` callers for `--seconds` (the load is tests/e2e/fleet.py,
which tests/e2e/test_fleet.py runs in CI). Exit 1 on any error or a peak of client backends in
`pg_stat_activity` above 80, or of one replica's sockets to Postgres above its connection budget.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from benchlib import BenchError, header, run_main
from tests.e2e.fleet import FleetReport, run_load, start_fleet
from tests.reliability.cluster import Cluster, postgres_bin_dir

from tokensvc.config import Settings

MAX_CONNECTIONS = 100
FLEET_PEAK_LIMIT = 80


async def run(args: argparse.Namespace, cluster: Cluster, out_dir: Path) -> FleetReport:
    database = f"fleet_{uuid.uuid4().hex[:8]}"
    cluster.psql(f"CREATE DATABASE {database}")
    sandbox, replicas = await start_fleet(cluster.url(database), args.replicas, out_dir)
    try:
        return await run_load(
            sandbox,
            replicas,
            dsn=cluster.url().replace("+asyncpg", ""),
            pg_port=cluster.port,
            users=args.users,
            clients=args.clients,
            seconds=args.seconds,
        )
    finally:
        for process in [*replicas, sandbox]:
            process.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--clients", type=int, default=64, help="concurrent callers across the fleet")
    args = parser.parse_args(argv)
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise BenchError("no Postgres server binaries (initdb, pg_ctl)")
    budget = Settings(_env_file=None, database_url="postgresql+asyncpg://x@127.0.0.1/x").connection_budget
    settings = f"replicas {args.replicas}, {args.seconds:.0f} s, users {args.users}, clients {args.clients}"
    header("bench/fleet.py", settings)
    cluster = Cluster(bin_dir, max_connections=MAX_CONNECTIONS)
    out_dir = Path(tempfile.mkdtemp(prefix="tokensvc-fleet-"))
    try:
        cluster.start()
        print(f"cluster max_connections={MAX_CONNECTIONS}; connection budget per replica at defaults: {budget}")
        report = asyncio.run(run(args, cluster, out_dir))
    finally:
        cluster.destroy()
    print(report.summary())
    for error in report.errors[:20]:
        print(f"  error: {error}")
    ok = (
        not report.errors
        and report.peak_total <= min(FLEET_PEAK_LIMIT, args.replicas * budget)
        and max(report.peak_per_replica, default=0) <= budget
    )
    print(f"logs: {out_dir}")
    print("OK" if ok else "BENCH FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
