"""Helpers shared by the benchmarks: the machine, Postgres databases and the profiler. Processes (the sandbox,
`tokensvc serve`, their environment and readiness) are the tests' own: tests/e2e/processes.py."""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import FrameType

import asyncpg

REPO_DIR = Path(__file__).resolve().parent.parent
READY_DEADLINE_SECONDS = 60.0

sys.path.insert(0, str(REPO_DIR))  # the repository root: tests.e2e.processes

from tests.e2e import processes  # noqa: E402
from tests.e2e.processes import Process  # noqa: E402


class BenchError(Exception):
    """The benchmark cannot go on, its numbers cannot be trusted, or a verification failed; the message says why."""


class ProfilerError(Exception):
    """py-spy could not record (the measurements stand; the profile is missing)."""


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not dirty:
        return head
    # Others edit src/ while benches run: name the exact tree the figures came from.
    digest = hashlib.sha256()
    for path in sorted((REPO_DIR / "src").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{head} + uncommitted src/ changes (src/**/*.py sha256 {digest.hexdigest()[:12]})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def process_ticks(pid: int) -> int | None:
    """utime + stime of one process in clock ticks (None when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after the comm


def postgres_ticks() -> dict[int, int]:
    """CPU ticks of every local process named `postgres` (the server and its backends)."""
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        value = process_ticks(int(entry.name))
        if value is not None:
            ticks[int(entry.name)] = value
    return ticks


def quoted_identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise BenchError(f"--db-name must be a plain lower-case identifier, got {name!r}")
    return f'"{name}"'


async def recreate_database(admin_url: str, name: str) -> str:
    """Drop (forcibly) and create `name`; returns the server's version string."""
    conn = await asyncpg.connect(admin_url)
    try:
        version = str(await conn.fetchval("SHOW server_version"))
        await conn.execute(f"DROP DATABASE IF EXISTS {quoted_identifier(name)} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {quoted_identifier(name)}")
    finally:
        await conn.close()
    return version


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quoted_identifier(name)} WITH (FORCE)")
    finally:
        await conn.close()


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run through the normal `finally` clean-up, like Ctrl-C does."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


async def wait_ready(process: Process, *, path: str = "/readyz") -> float:
    """tests/e2e/processes.wait_ready for one process, within READY_DEADLINE_SECONDS; the seconds it took. Raises
    BenchError with the process's log tail when it exited or did not answer in time."""
    started = time.monotonic()
    try:
        await processes.wait_ready(process, deadline=READY_DEADLINE_SECONDS, path=path)
    except (RuntimeError, TimeoutError) as exc:
        raise BenchError(f"{process.name} did not answer {path} ({exc!r}):\n{process.log_tail()}") from None
    return time.monotonic() - started
