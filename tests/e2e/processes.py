"""Real processes for end-to-end tests: the sandbox and `tokensvc serve` replicas, talking HTTP on loopback."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET

START_DEADLINE = 30.0


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any TOKENSVC_* setting that could leak in, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env | overrides


def start_sandbox(log_dir: Path, *extra: str, cwd: Path | None = None) -> Process:
    """`python -m tokensvc.sandbox --port 0`, ready once it printed SANDBOX_READY (`cwd`: where its state file
    goes, default this process's)."""
    log = log_dir / "sandbox.log"
    with log.open("wb") as sink:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            [sys.executable, "-m", "tokensvc.sandbox", "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=sink,
            env=clean_env(),
            cwd=cwd,
        )
    assert popen.stdout is not None
    # One line, printed once it listens (or the read ends when it exits): within the start deadline, not forever.
    readable, _, _ = select.select([popen.stdout], [], [], START_DEADLINE)
    line = popen.stdout.readline().decode().strip() if readable else f"nothing within {START_DEADLINE} s"
    if not line.startswith("SANDBOX_READY "):
        popen.kill()
        popen.wait()
        popen.stdout.close()
        raise RuntimeError(f"sandbox did not start: {line!r}; see {log}")
    return Process("sandbox", popen, line.split(" ", 1)[1], log)


def start_service(
    name: str, log_dir: Path, env: dict[str, str], *args: str, port: int | None = None, python: str = sys.executable
) -> Process:
    """`tokensvc serve` on `port` (default a free one) with `env` (TOKENSVC_* settings), run by `python` (another
    tree's interpreter, for a before/after measurement); call `wait_ready` before use."""
    port = port or free_port()
    log = log_dir / f"{name}.log"
    full_env = clean_env(**({"TOKENSVC_SWEEP_INTERVAL_SECONDS": "0"} | env))
    with log.open("wb") as sink:
        popen = subprocess.Popen(
            [python, "-m", "tokensvc", "serve", "--port", str(port), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=log_dir,
        )
    return Process(name, popen, f"http://127.0.0.1:{port}", log, full_env)


def service_env(database_url: str, strava_url: str, *, api_key: str, key: str, **extra: str) -> dict[str, str]:
    """What `tokensvc serve` cannot start without (the sandbox's credentials, keys, a session secret), nothing else
    set, plus `extra` (TOKENSVC_* settings)."""
    return {
        "TOKENSVC_DATABASE_URL": database_url,
        "TOKENSVC_STRAVA_BASE_URL": strava_url,
        "TOKENSVC_STRAVA_CLIENT_ID": SANDBOX_CLIENT_ID,
        "TOKENSVC_STRAVA_CLIENT_SECRET": SANDBOX_CLIENT_SECRET,
        "TOKENSVC_API_KEYS": api_key,
        "TOKENSVC_ENCRYPTION_KEYS": key,
        "TOKENSVC_SESSION_SECRET": "e2e-session-secret-" + "s" * 32,
        **extra,
    }


async def start_replicas(
    count: int, log_dir: Path, env: dict[str, str], *args: str, python: str = sys.executable, deadline: float = 120
) -> list[Process]:
    """`count` `tokensvc serve` (replica-0 …) on one database, ready; none is left running when one cannot start."""
    replicas = [start_service(f"replica-{n}", log_dir, env, *args, python=python) for n in range(count)]
    try:
        await wait_ready(*replicas, deadline=deadline)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient, *replicas: Process) -> Samples:
    """The replicas' `/metrics`, every sample summed across them, keyed by (name, labels)."""
    texts = await asyncio.gather(*(http.get(f"{replica.url}/metrics", timeout=10) for replica in replicas))
    total: Samples = {}
    for text in texts:
        for family in text_string_to_metric_families(text.text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                total[key] = total.get(key, 0.0) + sample.value
    return total


async def wait_ready(*processes: Process, deadline: float = START_DEADLINE, path: str = "/healthz") -> None:
    """Until every process answers `path` 200: retries connection errors only, within a deadline."""
    async with httpx.AsyncClient(timeout=2) as http:
        for process in processes:
            async with asyncio.timeout(deadline):
                while True:
                    if process.popen.poll() is not None:
                        raise RuntimeError(f"{process.name} exited: {process.log.read_text()[-2000:]}")
                    try:
                        if (await http.get(f"{process.url}{path}")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)


async def wait_for_log(process: Process, event: str, *, count: int = 1, deadline: float = START_DEADLINE) -> None:
    """Until `event` appears `count` times in the process's log (where a process's steps are observable from
    outside): a bounded condition wait, not a sleep."""
    async with asyncio.timeout(deadline):
        while True:
            if process.log.read_text(errors="replace").count(event) >= count:
                return
            await asyncio.sleep(0.05)


def _state(pid: int) -> str:
    """The process's state letter from /proc/PID/stat (`T`: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def wait_stopped(process: Process, deadline: float = START_DEADLINE) -> None:
    """Until the process is stopped (SIGSTOP), within a deadline."""
    async with asyncio.timeout(deadline):
        while True:
            if _state(process.popen.pid) == "T":
                return
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(*args: str, env: dict[str, str], deadline: float = 60, python: str = sys.executable) -> Completed:
    """`python -m tokensvc ARGS` to completion, without blocking the event loop (`python`: another tree's)."""
    process = await asyncio.create_subprocess_exec(
        python, "-m", "tokensvc", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(deadline):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())
