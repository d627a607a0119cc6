"""PgBouncer in transaction mode in front of a Postgres server, for tests that run the service behind a pooler.

PgBouncer refuses to run as root: as root it runs as the `postgres` OS user (`runuser`), in a temporary directory
that user owns.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.e2e.processes import free_port

START_DEADLINE = 15.0


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )


class Pooler:
    """One PgBouncer (`pool_mode = transaction`, a few server connections per database); `url(database_url)` is
    the same database reached through it."""

    def __init__(self, binary: str, server_url: str, *, pool_size: int = 4, ignore: tuple[str, ...] = ()) -> None:
        server = make_url(server_url)
        self.root = Path(tempfile.mkdtemp(prefix="tokensvc-pgbouncer-"))
        self.port = free_port()
        self.log = self.root / "pgbouncer.log"
        (self.root / "users.txt").write_text(f'"{server.username or "postgres"}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={server.host or '127.0.0.1'} port={server.port or 5432}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self.root / 'users.txt'}",
                    "pool_mode = transaction",
                    f"default_pool_size = {pool_size}",
                    "max_client_conn = 500",
                    f"ignore_startup_parameters = {','.join(('extra_float_digits', *ignore))}",
                    f"logfile = {self.log}",
                    f"pidfile = {self.root / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        prefix: list[str] = []
        if os.geteuid() == 0:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
            prefix = ["runuser", "-u", "postgres", "--"]
        self.process = subprocess.Popen(
            [*prefix, binary, str(self.root / "pgbouncer.ini")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)  # a bounded wait for the process to listen (no event to wait on)
        raise RuntimeError(f"pgbouncer did not listen in time: {self.log_text()}")

    def url(self, database_url: str) -> str:
        """`database_url` (a database of the server behind), through the pooler."""
        return make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
