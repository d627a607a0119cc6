"""What the image and a fresh clone install, checked without a Docker engine: the lock files satisfy pyproject.toml
(every dependency pinned and hashed), and the Dockerfile's HEALTHCHECK command, run as it is written, tells a live
`tokensvc serve` from a dead one. (`.ci/run` also installs a fresh virtualenv from the lock, hashes required.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import run_isolated
from tests.e2e.processes import Process, start_service, wait_ready

ROOT = Path(__file__).resolve().parents[1]
HEALTHCHECK_TIMEOUT = 30
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def locked(path: Path) -> dict[str, tuple[str, int]]:
    """`name -> (version, number of hashes)` of a `uv pip compile --generate-hashes` file."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        if match := _PIN.match(line):
            current = canonicalize_name(match.group(1))
            pins[current] = (match.group(2), 0)
        elif current is not None and line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def declared() -> tuple[list[Requirement], list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(text) for text in project["dependencies"]]
    dev = [Requirement(text) for text in project["optional-dependencies"]["dev"]]
    return runtime, dev


class TestLockFiles:
    @pytest.mark.parametrize("lock", ["requirements.txt", "requirements-dev.txt", "requirements-pip.txt"])
    def test_every_pin_is_hashed(self, lock: str) -> None:
        """`pip install --require-hashes` accepts nothing less."""
        pins = locked(ROOT / lock)
        assert pins
        assert [name for name, (_, hashes) in pins.items() if hashes == 0] == []

    def test_the_runtime_lock_satisfies_the_runtime_dependencies(self) -> None:
        """Each dependency of the service is pinned in requirements.txt to a version its bound allows (else: make
        lock)."""
        runtime, _dev = declared()
        pins = locked(ROOT / "requirements.txt")
        stale = [
            str(req)
            for req in runtime
            if canonicalize_name(req.name) not in pins
            or not req.specifier.contains(pins[canonicalize_name(req.name)][0], prereleases=True)
        ]
        assert stale == [], "run `make lock`"

    def test_the_dev_lock_satisfies_everything_and_agrees_with_the_runtime_lock(self) -> None:
        """requirements-dev.txt pins the dev tools as well, at the same versions as the runtime lock for the rest."""
        runtime, dev = declared()
        pins = locked(ROOT / "requirements-dev.txt")
        stale = [
            str(req)
            for req in [*runtime, *dev]
            if canonicalize_name(req.name) not in pins
            or not req.specifier.contains(pins[canonicalize_name(req.name)][0], prereleases=True)
        ]
        assert stale == [], "run `make lock`"
        runtime_pins = locked(ROOT / "requirements.txt")
        assert {name: pins[name][0] for name in runtime_pins} == {
            name: version for name, (version, _) in runtime_pins.items()
        }

    def test_the_image_installs_from_the_lock_with_hashes_required(self) -> None:
        """The Dockerfile's runtime dependencies come from requirements.txt, hashed; the project adds none."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        assert "pip install --require-hashes -r requirements-pip.txt" in dockerfile
        assert "pip install --require-hashes -r requirements.txt" in dockerfile
        assert re.search(r"pip install --no-deps /wheels/\S+\.whl", dockerfile)


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK, exec form, as written."""
    (line,) = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("HEALTHCHECK")]
    command: list[str] = json.loads(line.split(" CMD ", 1)[1])
    return command


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The command as the image runs it, but with this interpreter and the test service's port."""
    program, *args = healthcheck_command()
    assert program == "python"
    args = [arg.replace("127.0.0.1:8000/", f"127.0.0.1:{port}/") for arg in args]
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=HEALTHCHECK_TIMEOUT, check=False
    )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Process]:
    process = start_service(
        "tokensvc", tmp_path, {"TOKENSVC_DATABASE_URL": f"sqlite:///{tmp_path / 'tokensvc.db'}"}, "--sandbox"
    )
    try:
        run_isolated(wait_ready(process))
        yield process
    finally:
        process.stop()


class TestDockerHealthcheck:
    def test_it_probes_liveness_on_the_port_the_image_serves(self) -> None:
        """/healthz (liveness, no I/O), not /readyz: a database outage must not get healthy replicas restarted."""
        command = " ".join(healthcheck_command())
        assert "http://127.0.0.1:8000/healthz" in command
        assert '"--port", "8000"' in (ROOT / "Dockerfile").read_text()

    @pytest.mark.slow
    def test_the_command_passes_against_a_live_serve_and_fails_once_it_is_gone(self, service: Process) -> None:
        """Exit 0 while `tokensvc serve` answers; non-zero once it has stopped."""
        port = int(service.url.rsplit(":", 1)[1])
        alive = run_healthcheck(port)
        assert alive.returncode == 0, alive.stderr
        service.stop()
        dead = run_healthcheck(port)
        assert dead.returncode != 0
