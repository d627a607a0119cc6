"""Helpers shared by the benchmarks: the machine, processes, Postgres databases and the profiler."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import FrameType

import asyncpg


class BenchError(Exception):
    """The benchmark cannot go on, its numbers cannot be trusted, or a verification failed; the message says why."""


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
