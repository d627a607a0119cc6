"""The Strava API gateway (`GET /v1/users/{id}/strava/{path}`) against calling the sandbox directly (issue 13).

    .venv/bin/python bench/gateway.py   # = --calls 72 --connections 16 --seconds 10 --rounds 2 --strava-latency-ms 100

A throwaway Postgres cluster (tests/reliability/cluster.py), two sandboxes (A behind the gateway, B called
directly: each has its own read window) and `tokensvc serve`. 1. Latency at defaults: `--calls` sequential
`GET /athlete/activities` a side, interleaved with the order alternating, timed to the last body byte. 2. RSS at
defaults: a 20 MB activity's streams to a fast and a 4 MB/s reader and a 20 MB upload, VmRSS sampled every 5 ms
from a reset VmHWM. 3. CAPACITY (limits raised, not defaults): wrk rounds of (direct, gateway), then again with the
sandbox holding each call `--strava-latency-ms`. Every answer is checked; exit 1 on a failed check (goals are
printed, not enforced). Needs wrk and the Postgres server binaries; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    BenchError,
    CpuMeter,
    children_seconds,
    cpu_seconds,
    header,
    load_average,
    memory_kib,
    percentile,
    postgres_seconds,
    run_main,
    table,
    wait_ready,
)
from tests.e2e.processes import Process, service_env, start_sandbox, start_service
from tests.reliability.cluster import Cluster, postgres_bin_dir

from tokensvc.config import Settings
from tokensvc.crypto import generate_key
from tokensvc.service.rate_budget import GATEWAY_SHARES

API_KEY = "gwbench-key-0123456789abcdef"
USER = "gwbench-user"
SCOPE = "read,activity:read_all,activity:write"
ACTIVITIES = 30
STREAM_POINTS = 300_000  # ~20.5 MB of streams (68 bytes a point)
UPLOAD_BYTES = 20 * 1024 * 1024
SLOW_READER_BYTES_PER_SECOND = 4 * 1024 * 1024
RAISED = 10_000_000
WARMUP_CALLS = 3
THROUGHPUT_GOAL = 0.7
CHUNK = 64 * 1024


@dataclass
class Side:
    """One way of reaching Strava's API: through the gateway or straight to a sandbox."""

    name: str
    base: str  # the URL `/athlete/activities` etc. are appended to
    headers: dict[str, str]
    process: Process


@dataclass
class Stack:
    out: Path
    cluster: Cluster
    http: httpx.AsyncClient
    sandboxes: list[Process] = field(default_factory=list)
    services: list[Process] = field(default_factory=list)

    def stop(self) -> None:
        for process in [*self.services, *self.sandboxes]:
            process.stop()


async def start_tokensvc(stack: Stack, name: str, sandbox: Process, **extra: str) -> Process:
    """A replica at default settings (the sweep's default interval too, which start_service would turn off)."""
    stack.cluster.psql(f"CREATE DATABASE {name}")
    interval = str(Settings.model_fields["sweep_interval_seconds"].default)
    env = service_env(stack.cluster.url(name), sandbox.url, api_key=API_KEY, key=generate_key(), **extra)
    process = start_service(name, stack.out, env | {"TOKENSVC_SWEEP_INTERVAL_SECONDS": interval})
    stack.services.append(process)
    await wait_ready(process, path="/healthz")
    return process


async def connect_athlete(http: httpx.AsyncClient, sandbox: Process) -> dict[str, Any]:
    """An athlete in the sandbox with `ACTIVITIES` uploaded activities (control calls: not rate-counted)."""
    answer = await http.post(f"{sandbox.url}/_control/athletes", json={"scope": SCOPE})
    check(answer, 200, "connect athlete")
    athlete: dict[str, Any] = answer.json()
    for _ in range(ACTIVITIES):
        uploaded = await http.post(f"{sandbox.url}/_control/athletes/{athlete['athlete_id']}/activities")
        check(uploaded, 200, "upload activity")
    return athlete


async def import_tokens(http: httpx.AsyncClient, service: Process, athlete: dict[str, Any]) -> None:
    body = {k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")} | {"scope": SCOPE}
    answer = await http.put(f"{service.url}/v1/users/{USER}/tokens", json=body, headers=auth(API_KEY))
    check(answer, 200, "import tokens")


def gateway_side(service: Process) -> Side:
    return Side("gateway", f"{service.url}/v1/users/{USER}/strava", auth(API_KEY), service)


def direct_side(sandbox: Process, athlete: dict[str, Any]) -> Side:
    return Side("direct", f"{sandbox.url}/api/v3", auth(athlete["access_token"]), sandbox)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def check(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        raise BenchError(f"{what}: {response.status_code} {response.text[:300]}")


# --- phase 1: latency at defaults ------------------------------------------------------------------------------


async def timed_get(client: httpx.AsyncClient, side: Side, path: str) -> tuple[float, int]:
    """Seconds from send to the last body byte, and the body's size."""
    start = time.perf_counter()
    response = await client.get(f"{side.base}{path}", headers=side.headers)
    elapsed = time.perf_counter() - start
    check(response, 200, f"{side.name} GET {path}")
    return elapsed, len(response.content)


async def latency_phase(gateway: Side, direct: Side, calls: int) -> dict[str, list[float]]:
    """`calls` sequential GETs per side, interleaved (order alternating), after `WARMUP_CALLS` each; one client
    (one keep-alive connection) per side, configured alike."""
    timings: dict[str, list[float]] = {gateway.name: [], direct.name: []}
    sizes: dict[str, set[int]] = {gateway.name: set(), direct.name: set()}
    path = "/athlete/activities"
    async with httpx.AsyncClient(timeout=30) as via_gateway, httpx.AsyncClient(timeout=30) as straight:
        pairs = [(gateway, via_gateway), (direct, straight)]
        for n in range(WARMUP_CALLS + calls):
            for side, client in pairs if n % 2 == 0 else pairs[::-1]:
                elapsed, size = await timed_get(client, side, path)
                if n >= WARMUP_CALLS:
                    timings[side.name].append(elapsed)
                    sizes[side.name].add(size)
    if len(sizes[gateway.name] | sizes[direct.name]) > 2 or min(map(len, sizes.values())) != 1:
        raise BenchError(f"bodies differ between calls: {sizes}")
    return timings


def latency_report(timings: dict[str, list[float]]) -> list[str]:
    gateway, direct = timings["gateway"], timings["direct"]
    rows = [
        [name, len(ms), *(percentile(ms, p) for p in (50, 90, 99)), max(ms), statistics.fmean(ms)]
        for name, ms in ((name, [v * 1000 for v in values]) for name, values in timings.items())
    ]
    lines = [table(["side", "calls", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"], rows)]
    added = [(g - d) * 1000 for g, d in zip(gateway, direct, strict=True)]
    lines.append(
        f"added by the gateway: p50 {(percentile(gateway, 50) - percentile(direct, 50)) * 1000:.2f} ms, "
        f"p99 {(percentile(gateway, 99) - percentile(direct, 99)) * 1000:.2f} ms "
        f"(per interleaved pair: median {statistics.median(added):.2f} ms, p90 {percentile(added, 90):.2f} ms)"
    )
    return lines


# --- phase 2: RSS while 20 MB stream -------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """VmRSS of `pid` every `interval` seconds in a thread of its own (the event loop is busy streaming), from a
    reset VmHWM, so `peak_kib` is the true high-water mark during the transfer."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stopping = threading.Event()
        self.samples: list[int] = []
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start_kib = memory_kib(pid)["VmRSS"]

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append(memory_kib(self.pid).get("VmRSS", 0))
            self.stopping.wait(self.interval)

    def finish(self) -> dict[str, float]:
        self.stopping.set()
        self.join()
        memory = memory_kib(self.pid)
        peak = max([*self.samples, memory["VmRSS"], memory["VmHWM"] if self.hwm_reset else 0])
        return {
            "start_mib": self.start_kib / 1024,
            "peak_mib": peak / 1024,
            "growth_mib": (peak - self.start_kib) / 1024,
            "end_mib": memory["VmRSS"] / 1024,
            "samples": len(self.samples),
        }


async def stream_body(client: httpx.AsyncClient, side: Side, path: str, *, bytes_per_second: float | None) -> int:
    """GET `path` and read the body as it comes (paced to `bytes_per_second` when set); its size."""
    received = 0
    start = time.perf_counter()
    async with client.stream("GET", f"{side.base}{path}", headers=side.headers) as response:
        if response.status_code != 200:
            await response.aread()
            check(response, 200, f"{side.name} stream {path}")
        async for chunk in response.aiter_raw(CHUNK):
            received += len(chunk)
            if bytes_per_second is not None:
                ahead = received / bytes_per_second - (time.perf_counter() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)  # a slow reader: the pace is the load, not a synchronisation
    return received


async def upload_body(client: httpx.AsyncClient, side: Side, size: int) -> httpx.Response:
    """POST `/uploads` with a multipart body of about `size` bytes, generated chunk by chunk."""
    boundary = "gwbench-boundary-0123456789"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="data_type"\r\n\r\nfit\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="ride.fit"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = bytes(range(256)) * (CHUNK // 256)
    blocks, rest = divmod(size, CHUNK)

    async def chunks() -> Any:
        yield head
        for _ in range(blocks):
            yield block
        yield block[:rest]
        yield tail

    headers = side.headers | {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + size + len(tail)),
    }
    return await client.post(f"{side.base}/uploads", content=chunks(), headers=headers)


async def transfer(pid: int, run: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
    sampler = RssSampler(pid)
    sampler.start()
    start = time.perf_counter()
    try:
        result = await run()
    finally:
        memory = sampler.finish()
    return result, time.perf_counter() - start, memory


async def big_activity(http: httpx.AsyncClient, sandbox: Process, athlete: dict[str, Any], points: int) -> int:
    spec = {"points": points, "elapsed_time": points, "distance": points * 3.0}
    answer = await http.post(f"{sandbox.url}/_control/athletes/{athlete['athlete_id']}/activities", json=spec)
    check(answer, 200, "upload a big activity")
    activity_id: int = answer.json()["id"]
    return activity_id


async def rss_phase(stack: Stack, gateway: Side, direct: Side, athletes: dict[str, dict[str, Any]]) -> list[str]:
    """Streams and an upload of ~20 MB through the gateway (and straight, for the time), the server's RSS each."""
    sandbox_a = stack.sandboxes[0]  # the one behind the gateway
    ids = {
        "gateway": await big_activity(stack.http, sandbox_a, athletes["gateway"], STREAM_POINTS),
        "direct": await big_activity(stack.http, direct.process, athletes["direct"], STREAM_POINTS),
    }
    small = await big_activity(stack.http, sandbox_a, athletes["gateway"], 600)
    pid = gateway.process.popen.pid
    lines = [f"{'transfer':<34}{'MB':>7}{'s':>7}{'RSS start':>10}{'peak':>8}{'growth':>8}{'end':>8}  (MiB)"]
    async with httpx.AsyncClient(timeout=300) as client:
        await stream_body(client, gateway, f"/activities/{small}/streams", bytes_per_second=None)  # warm-up
        cases: list[tuple[str, Side, Callable[[], Any]]] = [
            ("streams, gateway, fast reader", gateway, lambda: stream(client, gateway, ids["gateway"], None)),
            (
                "streams, gateway, 4 MB/s reader",
                gateway,
                lambda: stream(client, gateway, ids["gateway"], SLOW_READER_BYTES_PER_SECOND),
            ),
            ("streams, direct, fast reader", direct, lambda: stream(client, direct, ids["direct"], None)),
        ]
        cases += [
            ("upload 20 MB, gateway", gateway, lambda: uploaded(client, gateway)),
            ("upload 20 MB, direct", direct, lambda: uploaded(client, direct)),
        ]
        for name, side, run in cases:
            size, seconds, memory = await transfer(side.process.popen.pid, run)
            who = "tokensvc" if side.process.popen.pid == pid else "sandbox"
            lines.append(
                f"{name:<34}{size / 1e6:>7.1f}{seconds:>7.2f}{memory['start_mib']:>10.1f}{memory['peak_mib']:>8.1f}"
                f"{memory['growth_mib']:>8.1f}{memory['end_mib']:>8.1f}  {who} ({int(memory['samples'])} samples)"
            )
    return lines


async def stream(client: httpx.AsyncClient, side: Side, activity_id: int, pace: float | None) -> int:
    size = await stream_body(client, side, f"/activities/{activity_id}/streams", bytes_per_second=pace)
    if size < 20_000_000:
        raise BenchError(f"{side.name}: the streams body was {size} bytes, not ~20 MB")
    return size


async def uploaded(client: httpx.AsyncClient, side: Side) -> int:
    answer = await upload_body(client, side, UPLOAD_BYTES)
    check(answer, 201, f"{side.name} upload")
    size: int = answer.json()["bytes_received"]
    if size < UPLOAD_BYTES:
        raise BenchError(f"{side.name}: the sandbox received {size} bytes of the upload, not {UPLOAD_BYTES}+")
    return size


# --- phase 3: capacity, limits raised ----------------------------------------------------------------------------


@dataclass
class WrkRun:
    side: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    bytes_read: float
    cpu: dict[str, float]


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_SIZES = {"B": 1.0, "KB": 1024.0, "MB": 1024.0**2, "GB": 1024.0**3}


def parse_wrk(side: str, text: str, cpu: dict[str, float]) -> WrkRun:
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    if bad or errors:
        raise BenchError(f"wrk {side}: {bad.group(0) if bad else ''} {errors.group(0) if errors else ''}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    done = re.search(r"(\d+) requests in [\d.]+\w+, ([\d.]+)(\w+) read", text)
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", text, re.MULTILINE))
    if rate is None or done is None or set(latency) != {"50", "99"}:
        raise BenchError(f"wrk {side}: output not understood:\n{text}")

    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
        return float(number) * _UNITS[unit]

    return WrkRun(
        side,
        float(rate.group(1)),
        ms(latency["50"]),
        ms(latency["99"]),
        int(done.group(1)),
        float(done.group(2)) * _SIZES[done.group(3)],
        cpu,
    )


Readers = dict[str, Callable[[], float]]


def run_wrk(side: Side, others: Readers, args: argparse.Namespace, seconds: int, out: Path) -> WrkRun:
    """One wrk run against `side`'s `/athlete/activities`, with the CPU (% of one core) of the processes named in
    `others`, of wrk and of the machine over the run."""
    command = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    command += ["-H", f"Authorization: {side.headers['Authorization']}", f"{side.base}/athlete/activities"]
    meter = CpuMeter(others | {"wrk": children_seconds})
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    cpu = meter.stop()
    (out / f"wrk-{side.name}-{int(time.time() * 1000)}.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise BenchError(f"wrk {side.name} exited {done.returncode}: {done.stderr[-500:]}")
    return parse_wrk(side.name, done.stdout, cpu)


async def capacity_phase(stack: Stack, sandbox: Process, athlete: dict[str, Any], args: argparse.Namespace) -> Any:
    """wrk rounds of (direct, gateway) against one sandbox, both sides' limits raised."""
    raised = dict.fromkeys(("limit_15min", "limit_daily", "read_limit_15min", "read_limit_daily"), RAISED)
    check(await stack.http.post(f"{sandbox.url}/_control/rate-limit", json=raised), 200, "raise sandbox limits")
    limit = f"{RAISED},{RAISED}"
    service = await start_tokensvc(
        stack, "gw_capacity", sandbox, TOKENSVC_STRAVA_RATE_LIMIT=limit, TOKENSVC_STRAVA_READ_RATE_LIMIT=limit
    )
    await import_tokens(stack.http, service, athlete)
    gateway, direct = gateway_side(service), direct_side(sandbox, athlete)
    postmaster = int((stack.cluster.data / "postmaster.pid").read_text().split()[0])
    others: Readers = {
        "tokensvc": lambda: cpu_seconds(service.pid),
        "sandbox": lambda: cpu_seconds(sandbox.pid),
        "postgres": lambda: postgres_seconds(postmaster),
    }
    for side in (direct, gateway):
        await asyncio.to_thread(run_wrk, side, others, args, args.warmup, stack.out)
    runs = {"": await rounds((direct, gateway), others, args, stack.out)}
    if args.strava_latency_ms:
        # Strava is not answered from memory: every list call now waits `--strava-latency-ms` in the sandbox first.
        fault = {"endpoint": "activities", "kind": "latency", "latency_ms": args.strava_latency_ms, "count": RAISED}
        check(await stack.http.post(f"{sandbox.url}/_control/faults", json=fault), 200, "queue latency")
        runs[f"the sandbox answering after {args.strava_latency_ms} ms"] = await rounds(
            (direct, gateway), others, args, stack.out
        )
        check(await stack.http.delete(f"{sandbox.url}/_control/faults"), 200, "clear latency")
    return runs


async def rounds(sides: tuple[Side, Side], others: Readers, args: argparse.Namespace, out: Path) -> Any:
    """`--rounds` rounds of one wrk run a side, the order alternating."""
    runs: list[WrkRun] = []
    for n in range(args.rounds):
        for side in sides if n % 2 == 0 else sides[::-1]:
            runs.append(await asyncio.to_thread(run_wrk, side, others, args, args.seconds, out))
    return runs


def cpu_ms(run: WrkRun, process: str) -> float:
    """CPU milliseconds `process` spent per request answered during the run."""
    return run.cpu[process] / 100 * 1000 / max(run.requests_per_second, 1e-9)


def capacity_report(runs: list[WrkRun], args: argparse.Namespace, *, ceilings: bool) -> list[str]:
    head = ["side", "req/s", "p50 ms", "p99 ms", "B/resp", "CPU %: tokensvc", "sandbox", "pg", "wrk", "all"]
    rows = [
        [run.side, round(run.requests_per_second), run.p50_ms, run.p99_ms, round(run.bytes_read / max(1, run.requests))]
        + [round(run.cpu[p]) for p in ("tokensvc", "sandbox", "postgres", "wrk", "machine")]
        + [cpu_ms(run, p) for p in ("tokensvc", "sandbox", "postgres")]
        for run in runs
    ]
    lines = [table([*head, "CPU ms/req: tokensvc", "sandbox", "pg"], rows)]
    rates = {s: [r.requests_per_second for r in runs if r.side == s] for s in ("gateway", "direct")}
    median = {s: statistics.median(v) for s, v in rates.items()}
    best = {s: max(v) for s, v in rates.items()}
    ratio = median["gateway"] / median["direct"]
    verdict = "met" if ratio >= THROUGHPUT_GOAL else "NOT met"
    lines.append(
        f"throughput gateway / direct at {args.connections} connections: median {median['gateway']:.0f} / "
        f"{median['direct']:.0f} = {ratio:.3f}; best {best['gateway']:.0f} / {best['direct']:.0f} = "
        f"{best['gateway'] / best['direct']:.3f} (goal >= {THROUGHPUT_GOAL}: {verdict})"
    )
    if not ceilings:
        return lines
    ceiling = {s: cpu_ceiling([r for r in runs if r.side == s]) for s in ("gateway", "direct")}
    lines.append(
        f"CPU-bound ceilings (an estimate from the CPU each request cost, for a machine with nothing else running: "
        f"each process one core at most, {os.cpu_count()} cores in all): gateway {ceiling['gateway']:.0f}/s, "
        f"direct {ceiling['direct']:.0f}/s, ratio {ceiling['gateway'] / ceiling['direct']:.3f}"
    )
    return lines


def cpu_ceiling(runs: list[WrkRun]) -> float:
    per_request = {p: statistics.median(cpu_ms(r, p) for r in runs) for p in ("tokensvc", "sandbox", "postgres", "wrk")}
    one_core = 1000 / max(per_request["tokensvc"], per_request["sandbox"])
    return min(one_core, 1000 * (os.cpu_count() or 1) / sum(per_request.values()))


# --- the run -------------------------------------------------------------------------------------------------------


def reads_that_fit(calls: int) -> None:
    """The latency and RSS phases spend read units of one default window at the default priority: refuse a
    `--calls` that cannot fit (it would measure 429s, not the gateway)."""
    settings = Settings(_env_file=None, database_url="postgresql+asyncpg://x@127.0.0.1/x")
    window = int(settings.read_rate_limits[0] * GATEWAY_SHARES["sync"])
    needed = WARMUP_CALLS + calls + 3  # + the RSS phase's three streams
    if needed > window:
        raise BenchError(f"--calls {calls}: {needed} gateway GETs do not fit the default sync share ({window})")


def emit(*lines: str) -> None:
    print("\n".join(lines), flush=True)


async def run(args: argparse.Namespace, stack: Stack) -> None:
    reads_that_fit(args.calls)
    for name in ("sandbox-a", "sandbox-b"):
        (stack.out / name).mkdir(exist_ok=True)
        stack.sandboxes.append(start_sandbox(stack.out / name))
    sandbox_a, sandbox_b = stack.sandboxes
    service = await start_tokensvc(stack, "gw_defaults", sandbox_a)
    athletes = {
        "gateway": await connect_athlete(stack.http, sandbox_a),
        "direct": await connect_athlete(stack.http, sandbox_b),
    }
    await import_tokens(stack.http, service, athletes["gateway"])
    gateway, direct = gateway_side(service), direct_side(sandbox_b, athletes["direct"])

    emit("", f"== 1. latency at defaults: {args.calls} sequential GET /athlete/activities a side, interleaved")
    emit(*latency_report(await latency_phase(gateway, direct, args.calls)))
    emit("", "== 2. RSS while ~20 MB streams, at defaults (the same tokensvc process)")
    emit(*await rss_phase(stack, gateway, direct, athletes))
    stats = (await stack.http.get(f"{sandbox_a.url}/_control/stats")).json()
    emit(f"sandbox A (behind the gateway) saw: {stats['calls']}")
    service.stop()

    emit(
        "",
        f"== 3. CAPACITY (NOT defaults: TOKENSVC_STRAVA_RATE_LIMIT and _READ_RATE_LIMIT {RAISED:,}, sandbox A's "
        f"limits likewise): wrk -t{args.threads} -c{args.connections}, {args.seconds} s runs, {args.rounds} rounds",
    )
    for label, runs in (await capacity_phase(stack, sandbox_a, athletes["gateway"], args)).items():
        if label:
            emit(f"-- CAPACITY again, {label} (a Strava-like answer time):")
        emit(*capacity_report(runs, args, ceilings=not label))
    emit(f"load at the end {load_average()}")


async def main_async(args: argparse.Namespace, cluster: Cluster, out: Path) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        stack = Stack(out, cluster, http)
        try:
            await run(args, stack)
        finally:
            stack.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=72, help="latency: measured GETs per side (at most 74)")
    parser.add_argument("--connections", type=int, default=16, help="capacity: wrk connections (fixed concurrency)")
    parser.add_argument("--threads", type=int, default=1, help="capacity: wrk threads")
    parser.add_argument("--seconds", type=int, default=10, help="capacity: seconds per measured wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="capacity: seconds of warm-up per side")
    parser.add_argument("--rounds", type=int, default=2, help="capacity: rounds of (direct, gateway)")
    parser.add_argument(
        "--strava-latency-ms", type=int, default=100, help="capacity: again with this sandbox latency (0: not)"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="logs and wrk output (default: a temporary dir)")
    args = parser.parse_args(argv)
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise BenchError("no Postgres server binaries (initdb, pg_ctl)")
    header("bench/gateway.py", " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None))
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="tokensvc-gwbench-"))
    out.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(bin_dir)
    try:
        cluster.start()
        asyncio.run(main_async(args, cluster, out))
    finally:
        cluster.destroy()
        print(f"logs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
