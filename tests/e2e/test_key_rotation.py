"""Key rotation under traffic, and ciphertext integrity, with real processes: `tokensvc serve` on Postgres, the
sandbox as Strava, `tokensvc rotate-keys` as a CLI process, real HTTP in between."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import asyncpg_dsn
from tests.e2e.conftest import seed_user, service_env
from tests.e2e.processes import Process, run_cli, start_service, wait_ready
from tokensvc.crypto import TokenCipher, generate_key

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

USERS = 40
DUE = 8  # of them inside the refresh buffer: access-token refreshes them in the background during the rotation
WORKERS = 8


def log_events(process: Process, event: str) -> list[dict[str, object]]:
    """The JSON log lines of `process` whose event is `event`."""
    found = []
    for line in process.log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


async def key_ids_in_use(database_url: str) -> Counter[str]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch("SELECT access_token_enc, refresh_token_enc FROM user_tokens")
    finally:
        await conn.close()
    return Counter(
        TokenCipher.key_id_of(ciphertext) or "?" for row in rows for ciphertext in row.values() if ciphertext
    )


async def restart(process: Process, tmp_path: Path, name: str, **env: str) -> Process:
    process.stop()
    replacement = start_service(name, tmp_path, process.env | env)
    await wait_ready(replacement)
    return replacement


class TestRotationUnderTraffic:
    async def test_rotation_while_serving_then_the_old_key_is_removed(
        self, empty_pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """Reads and refreshes flow while `rotate-keys` runs: zero non-2xx, zero decrypt errors; afterwards the
        service with only the new key serves every user, and a second run re-encrypts nothing."""
        old, new = generate_key(), generate_key()
        env = service_env(empty_pg_url, sandbox_process, TOKENSVC_ENCRYPTION_KEYS=old)
        service = start_service("old-key", tmp_path, env)
        try:
            await wait_ready(service)
            users = [f"user-{i:03d}" for i in range(USERS)]
            for i, user_id in enumerate(users):
                await seed_user(http, sandbox_process, service, user_id, expires_in=600 if i < DUE else 7200)
            old_id, new_id = TokenCipher([old]).current_key_id, TokenCipher([new]).current_key_id
            assert await key_ids_in_use(empty_pg_url) == Counter({old_id: 2 * USERS})

            service = await restart(service, tmp_path, "both-keys", TOKENSVC_ENCRYPTION_KEYS=f"{new},{old}")
            statuses: Counter[int] = Counter()
            failures: list[str] = []
            rotation = asyncio.create_task(
                run_cli("rotate-keys", "--batch-size", "5", env=service.env | {"TOKENSVC_LOG_LEVEL": "INFO"})
            )

            async def hammer(worker: int) -> None:
                calls = 0
                # At least two rounds over the users, and on until the rotation has finished.
                while calls < 2 * USERS or not rotation.done():
                    user_id = users[(worker + calls * WORKERS) % USERS]
                    if calls % 3 == 0:
                        response = await http.get(f"{service.url}/v1/users/{user_id}/token-status")
                    elif calls % 25 == 7:
                        response = await http.post(f"{service.url}/v1/users/{user_id}/refresh?force=true")
                    else:
                        response = await http.get(f"{service.url}/v1/users/{user_id}/access-token")
                    statuses[response.status_code] += 1
                    if not response.is_success:
                        failures.append(f"{response.status_code} {response.text}")
                    calls += 1

            await asyncio.gather(*(hammer(w) for w in range(WORKERS)))
            result = await rotation

            assert result.returncode == 0, result.stderr
            assert "re-encrypted" in result.stdout
            assert failures == [], failures[:5]
            assert set(statuses) == {200}
            assert log_events(service, "token.decrypt_failed") == []
            assert log_events(service, "request.unhandled_error") == []
            assert set(await key_ids_in_use(empty_pg_url)) == {new_id}

            service = await restart(service, tmp_path, "new-key-only", TOKENSVC_ENCRYPTION_KEYS=new)
            answers = await asyncio.gather(*(http.get(f"{service.url}/v1/users/{u}/access-token") for u in users))
            assert [a.status_code for a in answers] == [200] * USERS, [a.text for a in answers if not a.is_success]
            assert log_events(service, "token.decrypt_failed") == []

            again = await run_cli("rotate-keys", env=service.env)
            assert again.returncode == 0, again.stderr
            assert "re-encrypted 0 rows" in again.stdout
        finally:
            service.stop()


async def overwrite(database_url: str, sql: str, *args: object) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


class TestCiphertextIntegrity:
    async def test_swapped_and_tampered_ciphertexts_are_refused_loudly(
        self, empty_pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """Alice's ciphertext copied into Bob's row, and a flipped byte in Carol's: each is 503 `token_unreadable`
        (never Alice's token), logged as `token.decrypt_failed`; Alice is still served; rotate-keys names both."""
        service = start_service("service", tmp_path, service_env(empty_pg_url, sandbox_process))
        service_key = service.env["TOKENSVC_ENCRYPTION_KEYS"]
        try:
            await wait_ready(service)
            alice = await seed_user(http, sandbox_process, service, "alice", expires_in=7200)
            await seed_user(http, sandbox_process, service, "bob", expires_in=7200)
            await seed_user(http, sandbox_process, service, "carol", expires_in=7200)
            await overwrite(
                empty_pg_url,
                "UPDATE user_tokens SET access_token_enc = "
                "(SELECT access_token_enc FROM user_tokens WHERE user_id = 'alice') WHERE user_id = 'bob'",
            )
            await overwrite(
                empty_pg_url,
                # One base64 character inside the sealed body (after `v1.<key id>.`) changed: authentication fails.
                "UPDATE user_tokens SET access_token_enc = overlay(access_token_enc placing "
                "CASE WHEN substr(access_token_enc, 30, 1) = 'A' THEN 'B' ELSE 'A' END from 30 for 1) "
                "WHERE user_id = 'carol'",
            )

            for user_id in ("bob", "carol"):
                response = await http.get(f"{service.url}/v1/users/{user_id}/access-token")
                assert response.status_code == 503, response.text
                assert response.headers["content-type"] == "application/problem+json"
                assert response.json()["code"] == "token_unreadable"
                assert "Retry-After" in response.headers
                assert alice["access_token"] not in response.text
            still_alice = await http.get(f"{service.url}/v1/users/alice/access-token")
            assert still_alice.status_code == 200
            assert still_alice.json()["access_token"] == alice["access_token"]

            logged = log_events(service, "token.decrypt_failed")
            assert {(r["user_id"], r["field"], r["level"]) for r in logged} == {
                ("bob", "access", "error"),
                ("carol", "access", "error"),
            }
            assert alice["access_token"] not in service.log.read_text()

            # Rotating to a new key reads every row: the two bad ones are named, and left as they are.
            report = await run_cli(
                "rotate-keys", env=service.env | {"TOKENSVC_ENCRYPTION_KEYS": f"{generate_key()},{service_key}"}
            )
            assert report.returncode == 1
            assert "bob, carol" in report.stderr
            assert "cannot be decrypted" in report.stderr
            assert "re-encrypted 1 rows" in report.stdout  # alice
            assert alice["access_token"] not in report.stderr + report.stdout
        finally:
            service.stop()
