"""The `tokensvc` command line, driven as users drive it: the real console script in a subprocess, and Typer's
CliRunner for the cases that stop before any logging or I/O is set up."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from alembic.script import ScriptDirectory
from pydantic import SecretStr
from typer.testing import CliRunner

from tests.conftest import asyncpg_dsn, run_isolated
from tokensvc.app import open_resources
from tokensvc.cli import _print_sandbox_tour, app
from tokensvc.config import Settings, encryption_keys, prepare
from tokensvc.crypto import TokenCipher, generate_key
from tokensvc.db import alembic_config
from tokensvc.schemas import TokenStatus

# Generous bounds: a cold interpreter plus Alembic takes a second or two; these only stop a hung test.
CLI_TIMEOUT = 60.0
STARTUP_DEADLINE = 30.0
SHUTDOWN_TIMEOUT = 20.0
# A token that stays `valid` for the test's run, yet plausible epoch seconds (an import more than a year ahead is 422).
FAR_FUTURE = int(time.time()) + 200 * 86_400
UNREACHABLE_PG = "postgresql://postgres@127.0.0.1:1/nowhere"  # any connection attempt would fail at once

runner = CliRunner()


# --- helpers -------------------------------------------------------------------------------------------------------


# CliRunner runs in this process: no TOKENSVC_* from the caller's shell, no `.env` to pick up.
pytestmark = pytest.mark.usefixtures("no_tokensvc_env")


def cli_env(**values: str) -> dict[str, str]:
    """The caller's environment without any TOKENSVC_* variable, plus `TOKENSVC_<NAME>` for each value given."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKENSVC_")}
    env.update({f"TOKENSVC_{name.upper()}": value for name, value in values.items()})
    return env


def tokensvc(args: Sequence[str], *, env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `tokensvc ARGS` as a user would, to completion."""
    return subprocess.run(
        [sys.executable, "-m", "tokensvc", *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def alembic_head() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def sqlite_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        rows: list[tuple[Any, ...]] = conn.execute(sql).fetchall()
        return rows
    finally:
        conn.close()


def pg_rows(url: str, sql: str) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql)
        finally:
            await conn.close()
        return rows

    result: list[asyncpg.Record] = run_isolated(fetch())
    return result


def statuses(database_url: str, keys: list[str], user_ids: Sequence[str]) -> dict[str, TokenStatus]:
    """Read users back through the service, decrypting with `keys` (what the CLI used)."""
    settings = Settings(_env_file=None, database_url=database_url, encryption_keys=[SecretStr(k) for k in keys])

    async def read() -> dict[str, TokenStatus]:
        async with open_resources(settings) as res:
            return {user_id: await res.service.status(user_id) for user_id in user_ids}

    result: dict[str, TokenStatus] = run_isolated(read())
    return result


def stderr_failures(stderr: str) -> dict[int, str]:
    """`line N: reason` lines from the import's stderr, by line number."""
    found: dict[int, str] = {}
    for text in stderr.splitlines():
        if text.startswith("line "):
            number, _, reason = text[len("line ") :].partition(":")
            found[int(number)] = reason.strip()
    return found


_DROP = object()  # a field value meaning "leave this field out"


def token_line(user_id: object, /, **fields: object) -> str:
    record: dict[str, object] = {
        "user_id": user_id,
        "access_token": f"{user_id}-access-plaintext",
        "refresh_token": f"{user_id}-refresh-plaintext",
        "expires_at": FAR_FUTURE,
    }
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not _DROP})


# --- gen-key -------------------------------------------------------------------------------------------------------


class TestGenKey:
    def test_prints_a_key_the_cipher_accepts(self) -> None:
        """`gen-key` prints one key on stdout that encrypts and decrypts."""
        result = runner.invoke(app, ["gen-key"])
        assert result.exit_code == 0, result.output
        key = result.stdout.strip()
        assert "\n" not in key
        cipher = TokenCipher([key])
        sealed = cipher.encrypt("plain", user_id="u1", field="refresh")
        assert cipher.decrypt(sealed, user_id="u1", field="refresh") == "plain"

    def test_every_call_prints_a_new_key(self) -> None:
        """Two calls never print the same key."""
        keys = {runner.invoke(app, ["gen-key"]).stdout.strip() for _ in range(5)}
        assert len(keys) == 5

    def test_the_console_script_prints_a_usable_key(self, tmp_path: Path) -> None:
        """The installed entry point works end to end."""
        result = tokensvc(["gen-key"], env=cli_env(), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        TokenCipher([result.stdout.strip()])


# --- migrate -------------------------------------------------------------------------------------------------------


class TestMigrateOnSqlite:
    def test_creates_the_schema_in_a_new_file(self, tmp_path: Path) -> None:
        """A plain `sqlite:///` URL to a missing file ends with `user_tokens` and Alembic at head."""
        db = tmp_path / "fresh.db"
        result = tokensvc(["migrate"], env=cli_env(database_url=f"sqlite:///{db}"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "newest schema" in result.stdout
        tables = {row[0] for row in sqlite_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"user_tokens", "alembic_version"} <= tables
        assert sqlite_rows(db, "SELECT version_num FROM alembic_version") == [(alembic_head(),)]

    def test_migrating_again_changes_nothing_and_keeps_the_data(self, tmp_path: Path) -> None:
        """A second `migrate` exits 0, stays at head, and leaves existing rows alone."""
        db = tmp_path / "app.db"
        env = cli_env(database_url=f"sqlite+aiosqlite:///{db}")
        assert tokensvc(["migrate"], env=env, cwd=tmp_path).returncode == 0
        conn = sqlite3.connect(db)
        with conn:
            conn.execute(
                "INSERT INTO user_tokens (user_id, expires_at, scopes, created_at, updated_at, version, sweep_at, "
                "failure_count) VALUES ('kept', 1, '', '2026-01-01 00:00:00', '2026-01-01 00:00:00', 1, 1, 0)"
            )
        conn.close()

        again = tokensvc(["migrate"], env=env, cwd=tmp_path)

        assert again.returncode == 0, again.stderr
        assert sqlite_rows(db, "SELECT version_num FROM alembic_version") == [(alembic_head(),)]
        assert sqlite_rows(db, "SELECT user_id FROM user_tokens") == [("kept",)]

    def test_no_line_names_another_dialect(self, tmp_path: Path) -> None:
        """Alembic prints each migration's first docstring paragraph on every dialect: none of them, nor any note a
        migration logs, speaks of Postgres (or its NOTIFY) to a SQLite user."""
        db = tmp_path / "app.db"
        result = tokensvc(["migrate"], env=cli_env(database_url=f"sqlite:///{db}"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Running upgrade 0004 -> 0005" in result.stderr
        assert "postgres" not in result.stderr.lower()
        assert "notify" not in result.stderr.lower()

    def test_migrate_needs_no_encryption_key(self, tmp_path: Path) -> None:
        """Schema work does not touch tokens, so no key file is generated."""
        db = tmp_path / "app.db"
        assert tokensvc(["migrate"], env=cli_env(database_url=f"sqlite:///{db}"), cwd=tmp_path).returncode == 0
        assert not (tmp_path / "app.db.key").exists()


@pytest.mark.postgres
class TestMigrateOnPostgres:
    def test_creates_the_schema_in_an_empty_database(self, empty_pg_url: str, tmp_path: Path) -> None:
        """A `postgresql://` URL (no driver) is migrated to head, and a second run is a no-op."""
        env = cli_env(database_url=asyncpg_dsn(empty_pg_url))
        first = tokensvc(["migrate"], env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        second = tokensvc(["migrate"], env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr

        tables = {r["tablename"] for r in pg_rows(empty_pg_url, "SELECT tablename FROM pg_tables")}
        assert {"user_tokens", "alembic_version"} <= tables
        versions = [r["version_num"] for r in pg_rows(empty_pg_url, "SELECT version_num FROM alembic_version")]
        assert versions == [alembic_head()]

    def test_the_postgres_note_is_printed_on_postgres(self, empty_pg_url: str, tmp_path: Path) -> None:
        """What only Postgres gets (0005's NOTIFY trigger) is said where it happens."""
        result = tokensvc(["migrate"], env=cli_env(database_url=empty_pg_url), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Postgres: a trigger NOTIFYs tokensvc_token_changes" in result.stderr

    def test_two_replicas_migrating_at_once_both_succeed(self, empty_pg_url: str, tmp_path: Path) -> None:
        """Two `tokensvc migrate` started together take turns on the advisory lock: both exit 0, schema at head."""
        env = cli_env(database_url=empty_pg_url)
        command = [sys.executable, "-m", "tokensvc", "migrate"]
        replicas = [
            subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        try:
            outputs = [replica.communicate(timeout=CLI_TIMEOUT) for replica in replicas]
        finally:
            for replica in replicas:
                if replica.poll() is None:
                    replica.kill()
                    replica.wait()

        for replica, (_, stderr) in zip(replicas, outputs, strict=True):
            assert replica.returncode == 0, stderr
        versions = [r["version_num"] for r in pg_rows(empty_pg_url, "SELECT version_num FROM alembic_version")]
        assert versions == [alembic_head()]


# --- import --------------------------------------------------------------------------------------------------------

GOOD_IDS = ("alice", "bob.smith-2_x")
MIXED_LINES = [
    token_line("alice"),  # 1
    "{this is not json",  # 2
    json.dumps(["an", "array"]),  # 3
    token_line("a b"),  # 4
    token_line("x" * 65),  # 5
    token_line("carol", refresh_token=_DROP),  # 6
    token_line("dave", expires_at="tomorrow"),  # 7
    "",  # 8: blank, ignored
    "   ",  # 9: blank, ignored
    token_line("bob.smith-2_x", athlete_id=134815, scopes="read,activity:read_all"),  # 10
    token_line(42),  # 11
    token_line(None, user_id=_DROP),  # 12: no user_id at all
    token_line("erin", athlete_id=134815),  # 13: bob's athlete (one athlete, one user)
    token_line(".."),  # 14: a dot segment, not a user id
]
BAD_LINES = {2, 3, 4, 5, 6, 7, 11, 12, 13, 14}
# Token values on the bad lines: none may be echoed back.
BAD_TOKENS = ["a b-access-plaintext", "a b-refresh-plaintext", "carol-access-plaintext", "dave-access-plaintext"]
BAD_TOKENS += ["dave-refresh-plaintext", "42-access-plaintext", "42-refresh-plaintext", f"{'x' * 65}-access"]


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class TestImportOnSqlite:
    def test_good_lines_are_imported_and_each_bad_line_is_reported(self, sqlite_url: str, tmp_path: Path) -> None:
        """Good lines land encrypted; every bad line is `line N: …` on stderr; counts printed; exit 1."""
        source = write_lines(tmp_path / "tokens.jsonl", MIXED_LINES)

        result = tokensvc(["import", str(source)], env=cli_env(database_url=sqlite_url), cwd=tmp_path)

        assert result.returncode == 1, result.stderr
        assert f"imported 2, failed {len(BAD_LINES)}" in result.stdout
        failures = stderr_failures(result.stderr)
        assert set(failures) == BAD_LINES
        assert "JSON" in failures[2]
        assert "object" in failures[3]
        assert "user_id" in failures[4]
        assert "user_id" in failures[5]
        assert "refresh_token" in failures[6]
        assert "expires_at" in failures[7]
        assert "user_id" in failures[11]
        assert "user_id" in failures[12]
        assert "athlete 134815 is connected to another user" in failures[13]
        assert "user_id" in failures[14]

        db = tmp_path / "tokensvc.db"
        stored = sqlite_rows(db, "SELECT user_id, access_token_enc, refresh_token_enc FROM user_tokens ORDER BY 1")
        assert [row[0] for row in stored] == sorted(GOOD_IDS)
        for user_id, access_enc, refresh_enc in stored:
            assert access_enc.startswith("v1.")
            assert refresh_enc.startswith("v1.")
            assert f"{user_id}-access-plaintext" not in access_enc

        keys = encryption_keys(Settings(_env_file=None, database_url=sqlite_url))
        read_back = statuses(sqlite_url, keys, [*GOOD_IDS, "carol"])
        assert read_back["alice"].status == "valid"
        assert read_back["alice"].expires_at == FAR_FUTURE
        assert read_back["bob.smith-2_x"].athlete_id == 134815
        assert read_back["bob.smith-2_x"].scopes == ["read", "activity:read_all"]
        assert read_back["carol"].status == "missing"

    def test_no_token_value_is_echoed_or_stored_in_plain_text(self, sqlite_url: str, tmp_path: Path) -> None:
        """Neither the output nor the database files contain any token given on any line."""
        source = write_lines(tmp_path / "tokens.jsonl", MIXED_LINES)

        result = tokensvc(["import", str(source)], env=cli_env(database_url=sqlite_url), cwd=tmp_path)

        assert result.returncode == 1
        good_tokens = [f"{u}-{kind}-plaintext" for u in GOOD_IDS for kind in ("access", "refresh")]
        for secret in [*BAD_TOKENS, *good_tokens]:
            assert secret not in result.stdout
            assert secret not in result.stderr
        database_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("tokensvc.db*"))
        for secret in good_tokens:
            assert secret.encode() not in database_bytes

    def test_a_clean_file_exits_0_and_importing_it_again_replaces(self, sqlite_url: str, tmp_path: Path) -> None:
        """No bad line: `imported 2, failed 0`, exit 0; a second run overwrites instead of duplicating."""
        source = write_lines(tmp_path / "tokens.jsonl", [token_line("alice"), "", token_line("bob.smith-2_x")])
        env = cli_env(database_url=sqlite_url)

        first = tokensvc(["import", str(source)], env=env, cwd=tmp_path)
        second = tokensvc(["import", str(source)], env=env, cwd=tmp_path)

        for result in (first, second):
            assert result.returncode == 0, result.stderr
            assert "imported 2, failed 0" in result.stdout
            assert stderr_failures(result.stderr) == {}
        assert sqlite_rows(tmp_path / "tokensvc.db", "SELECT count(*) FROM user_tokens") == [(2,)]

    def test_a_pair_older_than_the_stored_one_is_skipped_and_named_unless_replace(
        self, sqlite_url: str, tmp_path: Path
    ) -> None:
        """v1.1: imports never go backwards. An older pair (earlier expiry, another refresh token) is skipped,
        named on stderr, exit 1; the stored pair stays. With --replace it is stored and the exit is 0."""
        env = cli_env(database_url=sqlite_url)
        current = write_lines(tmp_path / "now.jsonl", [token_line("alice", refresh_token="alice-rt-2")])
        assert tokensvc(["import", str(current)], env=env, cwd=tmp_path).returncode == 0
        old_lines = [token_line("alice", expires_at=FAR_FUTURE - 3600), token_line("bob.smith-2_x")]
        old = write_lines(tmp_path / "old.jsonl", old_lines)

        skipped = tokensvc(["import", str(old)], env=env, cwd=tmp_path)

        assert skipped.returncode == 1, skipped.stderr
        assert "imported 1, failed 0, skipped as stale 1" in skipped.stdout
        failures = stderr_failures(skipped.stderr)
        assert set(failures) == {1}
        assert "alice" in failures[1]
        assert "stale" in failures[1]
        assert "--replace" in skipped.stderr
        db = tmp_path / "tokensvc.db"
        expiry = "SELECT expires_at FROM user_tokens WHERE user_id = 'alice'"
        assert sqlite_rows(db, expiry) == [(FAR_FUTURE,)]

        replaced = tokensvc(["import", "--replace", str(old)], env=env, cwd=tmp_path)

        assert replaced.returncode == 0, replaced.stderr
        assert "imported 2, failed 0" in replaced.stdout
        assert sqlite_rows(db, expiry) == [(FAR_FUTURE - 3600,)]

    def test_an_expiry_in_milliseconds_is_a_bad_line_that_says_so(self, sqlite_url: str, tmp_path: Path) -> None:
        source = write_lines(tmp_path / "tokens.jsonl", [token_line("alice", expires_at=FAR_FUTURE * 1000)])
        result = tokensvc(["import", str(source)], env=cli_env(database_url=sqlite_url), cwd=tmp_path)
        assert result.returncode == 1
        assert "milliseconds" in stderr_failures(result.stderr)[1]

    def test_stdout_carries_only_the_counts(self, sqlite_url: str, tmp_path: Path) -> None:
        """Log lines (the key-file notice included) go to stderr, so stdout is just `imported X, failed Y`."""
        source = write_lines(tmp_path / "tokens.jsonl", [token_line("alice")])

        result = tokensvc(["import", str(source)], env=cli_env(database_url=sqlite_url), cwd=tmp_path)

        assert result.returncode == 0, result.stderr
        assert (tmp_path / "tokensvc.db.key").is_file()  # this run generated the key, and said so
        assert result.stdout.strip() == "imported 1, failed 0"

    def test_a_user_id_with_a_trailing_newline_is_refused(self, sqlite_url: str, tmp_path: Path) -> None:
        """`"alice\\n"` is not 1..64 of [A-Za-z0-9._-] (the API could never address it), so the line fails."""
        source = write_lines(tmp_path / "tokens.jsonl", [token_line("alice\n"), token_line("x" * 64 + "\n")])

        result = tokensvc(["import", str(source)], env=cli_env(database_url=sqlite_url), cwd=tmp_path)

        assert result.returncode == 1, result.stdout
        assert "imported 0, failed 2" in result.stdout
        assert set(stderr_failures(result.stderr)) == {1, 2}
        assert sqlite_rows(tmp_path / "tokensvc.db", "SELECT count(*) FROM user_tokens") == [(0,)]

    def test_a_database_without_the_schema_is_not_a_traceback(self, tmp_path: Path) -> None:
        """Importing before `migrate` either migrates first or refuses with exit 2 naming `tokensvc migrate`.

        Exit 1 is reserved for "some lines were bad", and a traceback helps no operator.
        """
        source = write_lines(tmp_path / "tokens.jsonl", [token_line("alice")])
        db = tmp_path / "unmigrated.db"

        result = tokensvc(["import", str(source)], env=cli_env(database_url=f"sqlite:///{db}"), cwd=tmp_path)

        assert "Traceback" not in result.stderr
        if result.returncode == 0:
            assert "imported 1, failed 0" in result.stdout
        else:
            assert result.returncode == 2, result.stderr
            assert "tokensvc migrate" in result.stderr


@pytest.mark.postgres
class TestImportOnPostgres:
    def test_good_lines_are_imported_encrypted_with_the_configured_key(self, pg_url: str, tmp_path: Path) -> None:
        """With TOKENSVC_ENCRYPTION_KEYS set, good lines land as `v1.` ciphertext under that key."""
        key = generate_key()
        source = write_lines(tmp_path / "tokens.jsonl", MIXED_LINES)

        result = tokensvc(["import", str(source)], env=cli_env(database_url=pg_url, encryption_keys=key), cwd=tmp_path)

        assert result.returncode == 1, result.stderr
        assert f"imported 2, failed {len(BAD_LINES)}" in result.stdout
        assert set(stderr_failures(result.stderr)) == BAD_LINES
        rows = pg_rows(pg_url, "SELECT user_id, access_token_enc, refresh_token_enc, key_id FROM user_tokens")
        assert sorted(r["user_id"] for r in rows) == sorted(GOOD_IDS)
        current_key_id = TokenCipher([key]).current_key_id
        for row in rows:
            assert row["access_token_enc"].startswith(f"v1.{current_key_id}.")
            assert row["refresh_token_enc"].startswith(f"v1.{current_key_id}.")
            assert row["key_id"] == current_key_id
        read_back = statuses(pg_url, [key], GOOD_IDS)
        assert {s.status for s in read_back.values()} == {"valid"}

    def test_without_encryption_keys_it_refuses_before_touching_the_database(self, tmp_path: Path) -> None:
        """The console script on a Postgres URL without keys exits 2 with the sentence saying what to set."""
        source = write_lines(tmp_path / "tokens.jsonl", [token_line("alice")])

        result = tokensvc(["import", str(source)], env=cli_env(database_url=UNREACHABLE_PG), cwd=tmp_path)

        assert result.returncode == 2
        assert "TOKENSVC_ENCRYPTION_KEYS" in result.stderr
        assert "tokensvc gen-key" in result.stderr
        assert "Traceback" not in result.stderr


class TestImportWithoutKeysForPostgres:
    def test_import_refuses_with_exit_2(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Non-SQLite and no keys: exit 2, stderr says to set TOKENSVC_ENCRYPTION_KEYS, nothing imported."""
        source = write_lines(tmp_path / "tokens.jsonl", [token_line("alice")])
        monkeypatch.setenv("TOKENSVC_DATABASE_URL", UNREACHABLE_PG)

        result = runner.invoke(app, ["import", str(source)])

        assert result.exit_code == 2
        assert "TOKENSVC_ENCRYPTION_KEYS" in result.stderr
        assert "imported" not in result.stdout


# --- serve: refusing to start ------------------------------------------------------------------------------------


def assert_refused(result: subprocess.CompletedProcess[str], db: Path | None = None) -> None:
    """Exit 2 with a message, no traceback, no server, and (for SQLite) no database file created."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tokensvc: ") or "\ntokensvc: " in result.stderr
    assert "Traceback" not in result.stderr
    assert "server.listening" not in result.stderr
    if db is not None:
        assert not db.exists()


class TestServeRefusesToStart:
    def test_without_sandbox_and_without_strava_credentials(self, tmp_path: Path) -> None:
        """No --sandbox and no Strava app: exit 2 saying to set TOKENSVC_STRAVA_CLIENT_ID or use --sandbox."""
        db = tmp_path / "app.db"
        result = tokensvc(
            ["serve", "--port", str(free_port())], env=cli_env(database_url=f"sqlite:///{db}"), cwd=tmp_path
        )
        assert_refused(result, db)
        assert "TOKENSVC_STRAVA_CLIENT_ID" in result.stderr
        assert "--sandbox" in result.stderr

    @pytest.mark.parametrize("sandbox", [False, True])
    def test_with_a_postgres_url_and_no_encryption_keys(self, tmp_path: Path, sandbox: bool) -> None:
        """Postgres without TOKENSVC_ENCRYPTION_KEYS: exit 2 naming it and `tokensvc gen-key`, no connection tried."""
        env = cli_env(
            database_url=UNREACHABLE_PG,
            strava_client_id="12345",
            strava_client_secret="s3cret",
            api_keys="key-1-0123456789abc",
        )
        args = ["serve", "--port", str(free_port()), *(["--sandbox"] if sandbox else [])]
        result = tokensvc(args, env=env, cwd=tmp_path)
        assert_refused(result)
        assert "TOKENSVC_ENCRYPTION_KEYS" in result.stderr
        assert "tokensvc gen-key" in result.stderr

    def test_with_a_refresh_buffer_below_the_range(self, tmp_path: Path) -> None:
        """TOKENSVC_REFRESH_BUFFER_SECONDS=30 refuses even in the sandbox, naming the variable."""
        db = tmp_path / "app.db"
        env = cli_env(database_url=f"sqlite:///{db}", refresh_buffer_seconds="30")
        result = tokensvc(["serve", "--sandbox", "--port", str(free_port())], env=env, cwd=tmp_path)
        assert_refused(result, db)
        assert "TOKENSVC_REFRESH_BUFFER_SECONDS" in result.stderr

    def test_with_a_pool_that_leaves_the_sweep_nothing(self, tmp_path: Path) -> None:
        """TOKENSVC_DB_POOL_SIZE=1 against the connection kept for on-demand work: exit 2 with the sentence, no
        connection tried."""
        env = cli_env(database_url=UNREACHABLE_PG, encryption_keys=generate_key(), db_pool_size="1")
        result = tokensvc(["serve", "--sandbox", "--port", str(free_port())], env=env, cwd=tmp_path)
        assert_refused(result)
        assert "TOKENSVC_DB_POOL_SIZE=1 leaves the sweep no connection" in result.stderr
        assert "TOKENSVC_DB_POOL_SIZE to at least 2" in result.stderr

    def test_with_its_port_in_use_it_says_so_before_any_work(self, tmp_path: Path) -> None:
        """Another server on the port: one sentence naming the port and --port, exit 2, and nothing done first (no
        database file, no migration, no key file)."""
        db = tmp_path / "app.db"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = tokensvc(
                ["serve", "--sandbox", "--port", str(port)], env=cli_env(database_url=f"sqlite:///{db}"), cwd=tmp_path
            )
        assert_refused(result, db)
        assert result.stderr.strip().splitlines() == [
            f"tokensvc: port {port} on 127.0.0.1 is already in use (another tokensvc, or another server): stop that "
            "one, or choose another port with --port (make run PORT=...)"
        ]
        assert not (tmp_path / "app.db.key").exists()

    @pytest.mark.parametrize("value", ["59", "3601", "abc"])
    def test_every_bad_refresh_buffer_is_named_in_the_message(
        self, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        """Out of range or not a number: exit 2 and the message names TOKENSVC_REFRESH_BUFFER_SECONDS."""
        monkeypatch.setenv("TOKENSVC_REFRESH_BUFFER_SECONDS", value)
        result = runner.invoke(app, ["serve", "--sandbox"])
        assert result.exit_code == 2
        assert "TOKENSVC_REFRESH_BUFFER_SECONDS" in result.stderr


# --- serve: the sandbox really serves --------------------------------------------------------------------------------


def wait_until_serving(server: subprocess.Popen[bytes], http: httpx.Client, url: str) -> httpx.Response:
    """GET `url` until the server answers; fail if it exits first or the deadline passes."""
    deadline = time.monotonic() + STARTUP_DEADLINE
    while True:
        try:
            return http.get(url)
        except httpx.TransportError:
            if server.poll() is not None:
                pytest.fail(f"the server exited with {server.returncode} before answering {url}")
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from {url} within {STARTUP_DEADLINE}s")
            # Waiting on the process doubles as the pause between attempts and notices an early exit at once.
            try:
                server.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass


class TestServeSandbox:
    def test_serves_the_api_and_stops_cleanly_on_sigterm(self, tmp_path: Path) -> None:
        """`serve --sandbox` migrates a new SQLite file, answers health and API calls, and shuts down on SIGTERM."""
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        db = tmp_path / "served.db"
        stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            server = subprocess.Popen(
                [sys.executable, "-m", "tokensvc", "serve", "--sandbox", "--port", str(port)],
                env=cli_env(database_url=f"sqlite:///{db}"),
                cwd=tmp_path,
                stdout=out,
                stderr=err,
            )
        try:
            with httpx.Client(base_url=base, timeout=5.0, trust_env=False) as http:
                health = wait_until_serving(server, http, "/healthz")
                assert health.status_code == 200
                assert health.json() == {"status": "ok"}

                ready = http.get("/readyz")
                assert ready.status_code == 200
                assert ready.json() == {"status": "ok"}

                status = http.get("/v1/users/42/token-status", headers={"Authorization": "Bearer sandbox-key"})
                assert status.status_code == 200
                assert status.json()["status"] == "missing"
                assert http.get("/v1/users/42/token-status").status_code == 401
                assert http.get("/docs").status_code == 200

            startup = stderr_path.read_text()
            assert "sandbox" in startup
            assert f"{base}/docs" in startup
            assert (tmp_path / "served.db.key").is_file()

            server.send_signal(signal.SIGTERM)
            returncode = server.wait(timeout=SHUTDOWN_TIMEOUT)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

        # Uvicorn re-raises the SIGTERM it handled once shutdown is complete, so the parent sees the signal.
        assert returncode in (0, -signal.SIGTERM)
        stderr = stderr_path.read_text()
        assert "service.stopped" in stderr
        assert f'"port": {port}' in stderr  # server.listening names where it listens
        assert "Traceback" not in stderr


def start_sandbox_serve(tmp_path: Path, **settings: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`tokensvc serve --sandbox --port 0` (any free port) on SQLite; its stderr goes to a file."""
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "tokensvc", "serve", "--sandbox", "--port", "0"],
            env=cli_env(database_url=f"sqlite:///{tmp_path / 'served.db'}", **settings),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return server, stderr_path


def wait_for_banner(server: subprocess.Popen[bytes], stderr_path: Path) -> str:
    """The start-up banner, once it has been printed in full."""
    deadline = time.monotonic() + STARTUP_DEADLINE
    while "API docs: " not in (text := stderr_path.read_text()):
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}: {text[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no banner within {STARTUP_DEADLINE}s")
        try:
            server.wait(timeout=0.1)  # the pause between looks, and notices an early exit at once
        except subprocess.TimeoutExpired:
            pass
    return text[text.index("tokensvc is starting on ") :]


class TestSandboxBanner:
    def test_its_commands_run_as_pasted_and_do_what_they_say(self, tmp_path: Path) -> None:
        """The banner's lines, pasted into bash: the sandbox's athlete is imported with its scopes, then status,
        an access token refreshed for min_ttl=900, and a forced refresh; on the port chosen for --port 0."""
        server, stderr_path = start_sandbox_serve(tmp_path)
        try:
            banner = wait_for_banner(server, stderr_path)
            base = banner.split("tokensvc is starting on ", 1)[1].split(" ", 1)[0]
            assert not base.endswith(":0")
            with httpx.Client(timeout=5.0, trust_env=False) as http:
                wait_until_serving(server, http, f"{base}/healthz")
            script = banner.split("Try it (paste into a shell):\n", 1)[1].split("API docs: ", 1)[0]
            ran = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT,
                check=False,
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=SHUTDOWN_TIMEOUT)
        assert ran.returncode == 0, ran.stderr
        imported, status, token, refreshed = (json.loads(line) for line in ran.stdout.splitlines())
        assert imported["status"] == "expiring_soon"
        assert imported["scopes"] == ["read", "activity:read_all"]
        assert status["user_id"] == "42"
        assert token["expires_in"] >= 900
        assert refreshed["refreshed"] is True

    def test_a_configured_key_and_a_database_password_are_not_printed(self, tmp_path: Path) -> None:
        """Only the sandbox's public `sandbox-key` appears in the banner; an operator's key is a placeholder, and the
        database URL is shown without its password."""
        settings = Settings(
            _env_file=None,
            database_url="postgresql+asyncpg://svc:hunter2-db-password@db.internal/tokensvc",
            api_keys=[SecretStr("operators-own-secret-key")],
            encryption_keys=[SecretStr(generate_key())],
        )
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            _print_sandbox_tour(prepare(settings, sandbox=True, port=8123))
        banner = err.getvalue()
        assert "operators-own-secret-key" not in banner
        assert "hunter2-db-password" not in banner
        assert "Bearer <one of TOKENSVC_API_KEYS>" in banner
        assert "postgresql+asyncpg://svc:***@db.internal/tokensvc" in banner

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            _print_sandbox_tour(prepare(Settings(_env_file=None, database_url="sqlite://"), sandbox=True, port=8123))
        assert "A='authorization: Bearer sandbox-key'" in err.getvalue()


class TestStravaSubscription:
    def test_create_without_a_verify_token_says_what_to_set(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """No TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN: exit 2 with the variable's name, before any Strava call."""
        monkeypatch.setenv("TOKENSVC_STRAVA_CLIENT_ID", "cid")
        monkeypatch.setenv("TOKENSVC_STRAVA_CLIENT_SECRET", "secret")
        result = runner.invoke(app, ["strava-subscription", "create", "--callback-url", "https://x.test/cb"])
        assert result.exit_code == 2
        assert "TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN" in result.output

    def test_without_app_credentials_every_subcommand_says_what_to_set(self) -> None:
        for command in (["create"], ["show"], ["delete"]):
            result = runner.invoke(app, ["strava-subscription", *command])
            assert result.exit_code == 2
            assert "TOKENSVC_STRAVA_CLIENT_ID" in result.output
