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

from tests.conftest import asyncpg_dsn, ciphertext_key_id
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
    return Counter(ciphertext_key_id(ciphertext) or "?" for row in rows for ciphertext in row.values() if ciphertext)


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


class Fleet:
    """Replicas behind a small load balancer: each request goes to the next replica in rotation; a replica leaves the
    rotation (its requests in flight drained) before it stops, and joins it once it answers."""

    def __init__(self, replicas: list[Process]) -> None:
        self.replicas = replicas
        self.retired: list[Process] = []
        self.rotation = list(replicas)
        self.in_flight: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._turn = 0
        self._drained = asyncio.Condition()

    async def request(self, http: httpx.AsyncClient, method: str, path: str) -> None:
        replica = self.rotation[self._turn % len(self.rotation)]
        self._turn += 1
        self.in_flight[replica.name] += 1
        try:
            response = await http.request(method, f"{replica.url}{path}")
        except httpx.TransportError as exc:
            self.failures.append(f"{replica.name}: {method} {path}: {type(exc).__name__}")
            return
        finally:
            self.in_flight[replica.name] -= 1
            async with self._drained:
                self._drained.notify_all()
        self.statuses[response.status_code] += 1
        if not response.is_success:
            self.failures.append(f"{replica.name}: {response.status_code} {response.text}")

    async def replace(self, index: int, tmp_path: Path, name: str, env: dict[str, str]) -> None:
        """The rolling restart of one replica: out of rotation, drained, stopped; its successor started with `env`,
        ready, in rotation."""
        old = self.replicas[index]
        self.rotation.remove(old)
        async with asyncio.timeout(30), self._drained:
            await self._drained.wait_for(lambda: self.in_flight[old.name] == 0)
        await asyncio.to_thread(old.stop)
        self.retired.append(old)
        new = start_service(name, tmp_path, env)
        await wait_ready(new)
        self.replicas[index] = new
        self.rotation.append(new)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


ROLLING_USERS = 30
ROLLING_REPLICAS = 3


class TestRollingRotation:
    async def test_a_new_key_rolls_out_decrypt_only_first_then_encrypts_then_the_old_one_goes(
        self, empty_pg_url: str, sandbox_process: Process, http: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """Three replicas under steady traffic (access tokens, statuses, forced refreshes) through four rolling
        restarts: the new key decrypt-only everywhere, then encrypting (the old one decrypt-only), rotate-keys,
        then the old key gone. Zero non-2xx, zero decrypt errors, every row under the new key. A replica that
        skipped the first step (old key only) cannot read what the others now write: the step is needed."""
        old, new = generate_key(), generate_key()
        old_id, new_id = TokenCipher([old]).current_key_id, TokenCipher([new]).current_key_id
        base = service_env(empty_pg_url, sandbox_process, TOKENSVC_ENCRYPTION_KEYS=old)
        fleet = Fleet([start_service(f"r{i}-old", tmp_path, base) for i in range(ROLLING_REPLICAS)])
        control: Process | None = None
        try:
            await wait_ready(*fleet.replicas)
            users = [f"user-{i:03d}" for i in range(ROLLING_USERS)]
            for i, user_id in enumerate(users):
                await seed_user(http, sandbox_process, fleet.replicas[i % ROLLING_REPLICAS], user_id, 7200)
            assert await key_ids_in_use(empty_pg_url) == Counter({old_id: 2 * ROLLING_USERS})

            done = asyncio.Event()
            # Forced refreshes write rows under whichever key a replica encrypts with; at default settings each one
            # takes a unit of the shared Strava budget (200 per 15 minutes), so they are rationed.
            refreshes_left = [150]

            async def traffic(worker: int) -> None:
                calls = 0
                while not done.is_set():
                    user_id = users[(worker * 7 + calls) % ROLLING_USERS]
                    if calls % 25 == 3 and refreshes_left[0] > 0:
                        refreshes_left[0] -= 1
                        await fleet.request(http, "POST", f"/v1/users/{user_id}/refresh?force=true")
                    elif calls % 2:
                        await fleet.request(http, "GET", f"/v1/users/{user_id}/token-status")
                    else:
                        await fleet.request(http, "GET", f"/v1/users/{user_id}/access-token")
                    calls += 1

            workers = [asyncio.create_task(traffic(w)) for w in range(WORKERS)]
            steps = [
                ("decrypt-only", {"TOKENSVC_ENCRYPTION_KEYS": old, "TOKENSVC_DECRYPTION_KEYS": new}),
                ("encrypting", {"TOKENSVC_ENCRYPTION_KEYS": new, "TOKENSVC_DECRYPTION_KEYS": old}),
            ]
            for step, keys in steps:
                for i in range(ROLLING_REPLICAS):
                    await fleet.replace(i, tmp_path, f"r{i}-{step}", base | keys)
            await fleet.request(http, "POST", f"/v1/users/{users[0]}/refresh?force=true")  # one row under new, surely
            assert new_id in await key_ids_in_use(empty_pg_url)

            control = start_service("control-old-key-only", tmp_path, base)
            await wait_ready(control)
            unreadable = 0
            for user_id in users:
                answer = await http.get(f"{control.url}/v1/users/{user_id}/access-token")
                unreadable += answer.status_code == 503 and answer.json()["code"] == "token_unreadable"
            assert unreadable > 0
            control.stop()

            rotation = await run_cli("rotate-keys", "--batch-size", "5", env=fleet.replicas[0].env)
            assert rotation.returncode == 0, rotation.stderr
            for i in range(ROLLING_REPLICAS):
                await fleet.replace(i, tmp_path, f"r{i}-new-only", base | {"TOKENSVC_ENCRYPTION_KEYS": new})
            done.set()
            await asyncio.gather(*workers)

            assert fleet.failures == [], fleet.failures[:5]
            assert set(fleet.statuses) == {200}
            assert sum(fleet.statuses.values()) > 100
            assert set(await key_ids_in_use(empty_pg_url)) == {new_id}
            for replica in fleet.replicas + fleet.retired:
                assert log_events(replica, "token.decrypt_failed") == [], replica.name
            again = await run_cli("rotate-keys", env=fleet.replicas[0].env)
            assert "re-encrypted 0 rows" in again.stdout
        finally:
            fleet.stop()
            if control is not None:
                control.stop()


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
