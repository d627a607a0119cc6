"""The React example (examples/react) for browser tests: built on demand, served by `vite preview`."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import httpx

from tests.e2e.processes import START_DEADLINE, Process, clean_env, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "react"
CHROMIUM = Path("/usr/bin/chromium")
# Flags that let Debian's Chromium start quickly on a closed network; Playwright adds a fresh --user-data-dir.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_TIMEOUT = 600
BUILD_TIMEOUT = 300


def missing_tools() -> list[str]:
    """What the browser tests need and this machine lacks."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if shutil.which("npm") is None:
        missing.append("npm (Node.js)")
    return missing


def _newest_mtime(paths: Iterable[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def _sources() -> list[Path]:
    top = ["index.html", "vite.config.ts", "tsconfig.json", "package.json", "package-lock.json"]
    return [*(EXAMPLE / name for name in top), *EXAMPLE.glob("src/**/*"), *EXAMPLE.glob("server/**/*")]


def _run(command: list[str], timeout: float) -> None:
    try:
        done = subprocess.run(command, cwd=EXAMPLE, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{' '.join(command)}` in {EXAMPLE} took longer than {timeout}s") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"`{' '.join(command)}` in {EXAMPLE} failed ({done.returncode}):\n{output}")


def build_example() -> Path:
    """`npm ci` when node_modules is missing or older than the lock file, `npm run build` when dist is stale; one
    build at a time (pytest-xdist workers may each ask for it)."""
    (ROOT / "build").mkdir(exist_ok=True)
    with (ROOT / "build" / "example-react.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_example()


def _build_example() -> Path:
    installed = EXAMPLE / "node_modules" / ".package-lock.json"  # npm writes it at every install
    if not installed.exists() or installed.stat().st_mtime < (EXAMPLE / "package-lock.json").stat().st_mtime:
        _run(["npm", "ci", "--no-audit", "--no-fund"], INSTALL_TIMEOUT)
    built = EXAMPLE / "dist" / "index.html"
    if not built.exists() or built.stat().st_mtime < _newest_mtime(_sources()):
        _run(["npm", "run", "build"], BUILD_TIMEOUT)
    return built.parent


def start_preview(log_dir: Path, *, tokensvc_url: str, api_key: str, port: int | None = None) -> Process:
    """`vite preview` of the built example on 127.0.0.1, its backend pointed at tokensvc.

    The local vite binary, not `npx vite`: one process, so stopping it stops the server.
    """
    port = port or free_port()
    log = log_dir / "vite-preview.log"
    env = clean_env(TOKENSVC_URL=tokensvc_url, TOKENSVC_API_KEY=api_key, NO_COLOR="1")
    env.pop("STRAVA_API_URL", None)
    vite = str(EXAMPLE / "node_modules" / ".bin" / "vite")
    with log.open("wb") as sink:
        popen = subprocess.Popen(
            [vite, "preview", "--port", str(port), "--strictPort", "--host", "127.0.0.1"],
            cwd=EXAMPLE,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Process("vite-preview", popen, f"http://127.0.0.1:{port}", log, env)


async def wait_preview(process: Process, deadline: float = START_DEADLINE) -> None:
    """Until the example's backend answers `/api/config` (so its middleware is in place)."""
    async with httpx.AsyncClient(timeout=2) as http, asyncio.timeout(deadline):
        while True:
            if process.popen.poll() is not None:
                raise RuntimeError(f"vite preview exited: {process.log.read_text()[-2000:]}")
            try:
                if (await http.get(f"{process.url}/api/config")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


def require_browser() -> bool:
    """CI sets TOKENSVC_REQUIRE_BROWSER=1: then a missing tool fails the browser tests instead of skipping them."""
    return os.environ.get("TOKENSVC_REQUIRE_BROWSER") == "1"
