"""A throwaway Postgres cluster the tests own (`initdb` + `pg_ctl` in a temporary directory), so a test can stop and
start it mid-refresh without touching the machine's shared server.

Postgres refuses to run as root: as root, every binary runs as the `postgres` OS user (`runuser`), and the
directory belongs to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.e2e.processes import free_port

COMMAND_DEADLINE = 60


def postgres_bin_dir() -> Path | None:
    """The newest installed server's binaries (Debian: /usr/lib/postgresql/<major>/bin), or None."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    found = candidates[-1] if candidates else shutil.which("initdb")
    return Path(found).parent if found else None


class Cluster:
    """One cluster: `url(db)`, `stop()`, `start()`, `restart()`, `dump(db)`, `create_database(name)`, `destroy()`."""

    def __init__(self, bin_dir: Path, *, max_connections: int = 200) -> None:
        self.bin_dir = bin_dir
        self.max_connections = max_connections
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="tokensvc-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.logfile = self.root / "postgres.log"
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-sync")
        self.running = False

    def _run(self, binary: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        done = subprocess.run(
            [*prefix, str(self.bin_dir / binary), *args],
            capture_output=True,
            timeout=COMMAND_DEADLINE,
            check=False,
            cwd=self.root,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{binary} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
        return done

    def start(self) -> None:
        """Start and wait until it accepts connections (`pg_ctl -w`)."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += f" -c max_connections={self.max_connections}"
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.logfile), "-o", options)
        self.running = True

    def stop(self) -> None:
        """Stop now (`-m fast`: open transactions are rolled back, clients are disconnected)."""
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))
        self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str) -> None:
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql)

    def dump(self, database: str) -> str:
        """`pg_dump` of one database, as plain SQL text."""
        done = self._run("pg_dump", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", database)
        return done.stdout.decode()

    def destroy(self) -> None:
        if self.running:
            try:
                self.stop()
            except RuntimeError:
                self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data))
        shutil.rmtree(self.root, ignore_errors=True)
