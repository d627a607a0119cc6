"""What the benchmarks share beyond the tests' process helpers (tests/e2e/processes.py): the header naming the
machine and the tree, percentiles and tables, CPU and memory from /proc, scratch databases, and py-spy."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from importlib import metadata
from pathlib import Path
from types import FrameType

import asyncpg

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))  # the repository root: tests.e2e.processes

from tests.e2e import processes  # noqa: E402
from tests.e2e.processes import Process  # noqa: E402

PACKAGES = ("uvicorn", "fastapi", "sqlalchemy", "asyncpg", "httpx", "uvloop", "httptools", "cryptography")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot go on, its numbers cannot be trusted, or a verification failed; the message says why."""


# -- the header --------------------------------------------------------------------------------------------


def git_revision() -> str:
    """HEAD, and a digest of src/ when it has uncommitted changes (others edit src/ while benches run)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    if not git("status", "--porcelain", "--", "src"):
        return head
    digest = hashlib.sha256()
    for path in sorted((REPO_DIR / "src").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{head} + uncommitted src/ changes (sha256 {digest.hexdigest()[:12]})"


def proc_field(path: str, prefix: str) -> str:
    try:
        line = next(line for line in Path(path).read_text().splitlines() if line.startswith(prefix))
    except (OSError, StopIteration):
        return "?"
    return line.split(":", 1)[1].strip()


def load_average() -> str:
    """The load average, and the share of the last 10 s some runnable task waited for a CPU (PSI)."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        pressure = Path("/proc/pressure/cpu").read_text().split()[1].removeprefix("avg10=")
    except (OSError, IndexError):
        return load
    return f"{load}, CPU pressure {pressure} %"


def header(title: str, settings: str, *, postgres: str | None = None) -> None:
    """What every figure must be read with: the tree, the machine and how busy it was, the versions, the settings."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    memory = proc_field("/proc/meminfo", "MemTotal").split()[0]
    print(f"== {title}")
    print(f"tokensvc {git_revision()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(
        f"machine: nproc {len(os.sched_getaffinity(0))}, {proc_field('/proc/cpuinfo', 'model name')}, "
        f"{int(memory) / 2**20 if memory.isdigit() else 0:.1f} GiB; load {load_average()}"
    )
    print(
        f"python {sys.version.split()[0]}"
        + (f", postgres {postgres}" if postgres else "")
        + "; "
        + " ".join(f"{name} {version(name)}" for name in PACKAGES)
    )
    print(f"settings: {settings}", flush=True)


# -- figures -----------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The `p`th percentile (0-100), interpolated between the closest ranks."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[min(998, max(0, round(p * 10) - 1))]


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns as wide as their widest cell: the first left-aligned, numbers right-aligned (floats to 2 places)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [list(head), *([cell(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# -- /proc: CPU and memory ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5), counted after the comm


def postgres_seconds(postmaster: int | None = None) -> float:
    """CPU of the Postgres processes alive now: a cluster's `postmaster` and the backends it forked, or every local
    process named `postgres`."""
    total = 0.0 if postmaster is None else cpu_seconds(postmaster)
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, _, rest = entry.read_text().rpartition(")")
        except OSError:
            continue  # gone meanwhile
        fields = rest.split()
        if (int(fields[1]) == postmaster) if postmaster is not None else comm.endswith("(postgres"):
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def machine_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def children_seconds() -> float:
    """CPU of the children this process has waited for (wrk)."""
    times = os.times()
    return times.children_user + times.children_system


class CpuMeter:
    """CPU over an interval, in % of one core, of named sources (each a reader of CPU seconds), the whole machine
    and `rest`: the machine outside the sources (other engineers' work, exited Postgres backends)."""

    def __init__(self, sources: dict[str, Callable[[], float]]) -> None:
        self.sources = sources | {"machine": machine_seconds}
        self.start()

    def start(self) -> None:
        self.started = time.monotonic()
        self.before = {name: read() for name, read in self.sources.items()}

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.started, 1e-9)
        usage = {name: (read() - self.before[name]) / wall * 100 for name, read in self.sources.items()}
        usage["rest"] = max(0.0, usage["machine"] - sum(v for k, v in usage.items() if k != "machine"))
        usage["seconds"] = wall
        return usage


def describe_cpu(usage: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f}%" for name, value in usage.items() if name != "seconds") + (
        f" (of {len(os.sched_getaffinity(0)) * 100}%)"
    )


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start, or since a reset) of `pid` in KiB; empty when it is gone."""
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return values


# -- databases and runs ------------------------------------------------------------------------------------


@asynccontextmanager
async def scratch_database(pg: str, name: str) -> AsyncIterator[tuple[str, str]]:
    """Database `name` on server `pg`, dropped (forcibly) and created, one run at a time on this machine (a lock
    file), dropped at the end; yields (its URL, the server's version)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise BenchError(f"--db-name must be a plain lower-case identifier, got {name!r}")
    admin = f"{pg.rstrip('/')}/postgres"

    async def admin_sql(*statements: str) -> str:
        conn = await asyncpg.connect(admin)
        try:
            for statement in statements:
                await conn.execute(statement)
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    with exclusive(name):
        version = await admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
        try:
            yield f"{pg.rstrip('/')}/{name}", version
        finally:
            try:
                await admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except (OSError, asyncpg.PostgresError) as exc:
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


@contextmanager
def exclusive(name: str) -> Iterator[None]:
    path = Path(f"/tmp/tokensvc-bench-{name}.lock")
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(f"another run is using database {name} ({path} is locked): wait, or --db-name") from None
        yield


async def migrate(env: dict[str, str], python: str = sys.executable) -> None:
    done = await processes.run_cli("migrate", env=processes.clean_env(**env), python=python, deadline=120)
    if done.returncode != 0:
        raise BenchError(f"`tokensvc migrate` failed ({done.returncode}): {done.stderr[-1500:]}")


def run_main(main: Callable[[], int]) -> int:
    """`main` with SIGTERM and SIGHUP ending it through its `finally` clean-up like Ctrl-C; a BenchError is exit 1."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    try:
        return main()
    except BenchError as exc:
        print(f"\nBENCH FAILED: {exc}", file=sys.stderr)
        return 1


async def wait_ready(*servers: Process, path: str = "/readyz", deadline: float = 60.0) -> None:
    try:
        await processes.wait_ready(*servers, deadline=deadline, path=path)
    except (RuntimeError, TimeoutError) as exc:
        raise BenchError(f"not ready on {path} ({exc!r}): {[(s.name, s.log_tail(500)) for s in servers]}") from None


# -- py-spy ------------------------------------------------------------------------------------------------

# Each sample goes to the phase of its innermost frame that matches one, in this order (specific first), so a
# stdlib helper counts for the library that called it; robust to the stacks py-spy cannot show whole (SQLAlchemy's
# greenlet half, --nonblocking stacks cut short at the root).
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Postgres connect/close (pool churn)", ("asyncpg/connect_utils.py",)),
    ("asyncpg (protocol, Python part)", ("asyncpg/",)),
    ("SQLAlchemy: compile, cache key, coercions", ("sqlalchemy/sql/",)),
    ("SQLAlchemy: pool", ("sqlalchemy/pool/",)),
    ("SQLAlchemy: greenlet bridge", ("sqlalchemy/util/concurrency", "sqlalchemy/util/_concurrency", "greenlet")),
    ("SQLAlchemy: engine, events, results, asyncpg adapter", ("sqlalchemy/",)),
    ("AES-GCM (tokensvc.crypto, cryptography)", ("tokensvc/crypto.py", "cryptography/")),
    ("tokensvc sandbox (emulator code)", ("tokensvc/sandbox/",)),
    ("tokensvc: api/service/store/providers", ("tokensvc/",)),
    ("stamina (retry wrapper around each Strava POST)", ("stamina/", "tenacity/")),
    ("threadpool hops (anyio to_thread, worker threads)", ("anyio/to_thread", "starlette/concurrency.py")),
    ("httpx/httpcore/h11 (Strava client)", ("httpx/", "httpcore/", "h11/", "anyio/", "sniffio/")),
    ("python-multipart (form parsing)", ("multipart/", "python_multipart/")),
    ("FastAPI: dependencies, params, security", ("fastapi/dependencies/", "fastapi/params", "fastapi/security")),
    ("FastAPI: app, routing", ("fastapi/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("Starlette", ("starlette/",)),
    ("uvicorn + httptools", ("uvicorn/", "httptools/")),
    ("logging / metrics", ("structlog/", "prometheus_client/", "logging/")),
    ("json", ("json/",)),
    ("asyncio (Python part)", ("asyncio/", "uvloop/")),
)
FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = subprocess.run(["which", "py-spy"], capture_output=True, text=True, check=False).stdout.strip()
    return found or None


def profile_report(title: str, raw: str, top: int = 20) -> str:
    """Where the time goes in py-spy's raw output (`frame;frame;... count`, root first): by phase, by the frame on
    CPU (self) and by every frame on the stack (in: what a step costs with all it calls)."""
    samples, phases, frames, cumulative = 0, Counter[str](), Counter[str](), Counter[str]()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parsed = [(m["func"], m["file"]) if (m := FRAME_RE.match(part)) else (part, "") for part in stack.split(";")]
        roots = ("asyncio/runners.py", "asyncio/base_events.py")  # the start-up frames every sample shares
        loop = max((i for i, (_, f) in enumerate(parsed) if f.endswith(roots)), default=-1)
        stack_frames = [f for f in parsed[loop + 1 :] if f[1].endswith(".py")]
        samples += count
        if not stack_frames:
            phases["event loop / C only (no Python frame above the loop)"] += count
            continue
        frames[f"{stack_frames[-1][0]} ({stack_frames[-1][1]})"] += count
        cumulative.update(dict.fromkeys({f"{func} ({file})" for func, file in stack_frames}, count))
        found = (
            label for _, path in reversed(stack_frames) for label, needles in PHASES if any(n in path for n in needles)
        )
        phases[next(found, "stdlib with no library frame above (cut-short stacks)")] += count
    rows = [(label, round(100 * n / max(samples, 1), 1)) for label, n in phases.most_common()]
    rows += [(f"  self: {where}", round(100 * n / max(samples, 1), 1)) for where, n in frames.most_common(top)]
    rows += [(f"  in: {where}", round(100 * n / max(samples, 1), 1)) for where, n in cumulative.most_common(top)]
    return f"-- {title}: {samples} samples holding the GIL (idle excluded)\n" + table(
        ["where the time goes", "%"], rows
    )


@asynccontextmanager
async def profiled(targets: dict[str, int], out_dir: Path, *, rate: int = 200) -> AsyncIterator[None]:
    """py-spy (non-blocking: unbiased; `--gil`: idle threads do not count as busy) on each named pid while the
    block runs, then where the time went. A profiler that fails is reported, not raised: the figures stand."""
    py_spy = find_py_spy()
    if py_spy is None:
        raise BenchError("py-spy is not installed: `.venv/bin/pip install py-spy` (or skip the profile)")
    raws = {name: out_dir / f"profile-{name}.raw.txt" for name in targets}
    spies = {}
    for name, pid in targets.items():
        argv = ["record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(raws[name])]
        spies[name] = await asyncio.create_subprocess_exec(
            py_spy, *argv, "--gil", "--nonblocking", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    await asyncio.sleep(1.0)  # py-spy attaches before the load starts: a start-up wait, not a synchronisation
    try:
        yield
    finally:
        for name, spy in spies.items():
            spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
            output, _ = await spy.communicate()
            if raws[name].exists():
                print(profile_report(f"{name} (pid {targets[name]}, {rate} Hz)", raws[name].read_text()))
            else:
                print(f"WARNING: py-spy on {name} wrote nothing: {output.decode()[-500:]}", file=sys.stderr)
