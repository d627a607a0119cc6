"""Helpers shared by the benchmarks: the machine, processes, Postgres databases and the profiler."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType

import asyncpg
import httpx

REPO_DIR = Path(__file__).resolve().parent.parent
STOP_GRACE_SECONDS = 15.0
READY_DEADLINE_SECONDS = 60.0


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any TOKENSVC_* setting that could leak in, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env | overrides


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


@dataclass
class Process:
    """A child process the benchmark started: its log file, and the URL it serves once ready."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def start_sandbox(out_dir: Path, *, client_id: str) -> Process:
    """`python -m tokensvc.sandbox --port 0`, ready once it printed `SANDBOX_READY <url>` (bounded wait)."""
    log = out_dir / "sandbox.log"
    with log.open("wb") as sink:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            [sys.executable, "-m", "tokensvc.sandbox", "--port", "0", "--client-id", client_id],
            stdout=subprocess.PIPE,
            stderr=sink,
            env=clean_env(),
            cwd=out_dir,
        )
    process = Process("sandbox", popen, "", log)
    assert popen.stdout is not None
    ready, _, _ = select.select([popen.stdout], [], [], READY_DEADLINE_SECONDS)
    line = popen.stdout.readline().decode().strip() if ready else ""
    if not line.startswith("SANDBOX_READY "):
        process.stop()
        raise BenchError(f"the sandbox did not start ({line!r}):\n{process.log_tail()}")
    process.url = line.split(" ", 1)[1]
    return process


async def wait_ready(process: Process, *, path: str = "/readyz", http: httpx.AsyncClient | None = None) -> float:
    """Poll `path` until it answers 200 (connection errors only, within a deadline); the seconds it took."""
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        client: httpx.AsyncClient = (
            http if http is not None else await stack.enter_async_context(httpx.AsyncClient(timeout=2))
        )
        try:
            async with asyncio.timeout(READY_DEADLINE_SECONDS):
                while True:
                    if not process.alive():
                        raise BenchError(
                            f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}"
                        )
                    try:
                        if (await client.get(f"{process.url}{path}")).status_code == 200:
                            return time.monotonic() - started
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise BenchError(f"{process.name} did not answer {path} in time:\n{process.log_tail()}") from None
    raise AssertionError("unreachable")
