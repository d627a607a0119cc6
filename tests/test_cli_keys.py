"""`tokensvc rotate-keys` as users run it (a subprocess) on SQLite: counts printed, idempotent, unreadable rows named
by user id and exit 1, never a token in the output. (Postgres and live traffic: tests/e2e/test_key_rotation.py.)"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.e2e.processes import clean_env, run_cli
from tokensvc.crypto import generate_key

TOKENS = {f"user-{i}": (f"{i:040x}", f"{i + 100:040x}") for i in range(3)}


def env_for(tmp_path: Path, keys: str) -> dict[str, str]:
    return clean_env(
        TOKENSVC_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'tokensvc.db'}", TOKENSVC_ENCRYPTION_KEYS=keys
    )


async def import_users(tmp_path: Path, key: str) -> None:
    lines = [
        json.dumps({"user_id": u, "access_token": a, "refresh_token": r, "expires_at": int(time.time()) + 200 * 86_400})
        for u, (a, r) in TOKENS.items()
    ]
    source = tmp_path / "tokens.jsonl"
    source.write_text("\n".join(lines) + "\n")
    imported = await run_cli("import", str(source), env=env_for(tmp_path, key))
    assert imported.returncode == 0, imported.stderr


def assert_no_token(text: str) -> None:
    for access, refresh in TOKENS.values():
        assert access not in text
        assert refresh not in text


class TestRotateKeysCommand:
    async def test_rotation_prints_batches_and_a_second_run_does_nothing(self, tmp_path: Path) -> None:
        """Batches of --batch-size are reported as they commit; the rerun re-encrypts 0 rows; exit 0 both times."""
        old, new = generate_key(), generate_key()
        await import_users(tmp_path, old)

        first = await run_cli("rotate-keys", "--batch-size", "2", env=env_for(tmp_path, f"{new},{old}"))
        again = await run_cli("rotate-keys", env=env_for(tmp_path, new))

        assert first.returncode == 0, first.stderr
        assert "batch: re-encrypted 2 rows (2 so far)" in first.stdout
        assert "batch: re-encrypted 1 rows (3 so far)" in first.stdout
        assert "re-encrypted 3 rows under key" in first.stdout
        assert again.returncode == 0, again.stderr
        assert "re-encrypted 0 rows" in again.stdout
        assert_no_token(first.stdout + first.stderr + again.stdout + again.stderr)

    async def test_rows_no_configured_key_opens_are_named_and_the_exit_code_is_1(self, tmp_path: Path) -> None:
        """With the old key gone too early, every user is named on stderr (never a ciphertext), and nothing changes."""
        await import_users(tmp_path, generate_key())

        result = await run_cli("rotate-keys", env=env_for(tmp_path, f"{generate_key()},{generate_key()}"))

        assert result.returncode == 1
        assert "cannot be decrypted with any configured key" in result.stderr
        assert "user-0, user-1, user-2" in result.stderr
        assert not re.search(r"v1\.[0-9a-f]{8}\.", result.stdout + result.stderr)  # no ciphertext either
        assert "re-encrypted 0 rows" in result.stdout
        assert_no_token(result.stdout + result.stderr)
