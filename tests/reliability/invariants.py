"""I1-I6 (/work/shared/RELIABILITY.md), checked from what the sandbox, the database and the processes show.

`Recorder` keeps every answer the service gave the test (the sandbox's own answers excepted); `Harness` knows the
world of one test (sandbox, cluster, database, encryption key, users) and `check` asserts the invariants.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx

from tests.e2e.processes import Process
from tests.reliability.cluster import Cluster
from tokensvc.crypto import TokenCipher
from tokensvc.db import make_engine
from tokensvc.store import claims
from tokensvc.store import tokens as store
from tokensvc.store.claims import Claim
from tokensvc.store.tokens import TokenRow

DEFAULT_MIN_TTL = 300  # the access-token endpoint's default
_TOKENISH = re.compile(r"[0-9a-f]{40}")  # the sandbox mints tokens as 40 hex digits


@dataclass(frozen=True)
class Answer:
    method: str
    url: httpx.URL
    status: int
    headers: httpx.Headers
    text: str
    at: float


class Recorder:
    """An HTTP client (service API key set) recording every answer that did not come from the sandbox."""

    def __init__(self, client: httpx.AsyncClient, *, sandbox_url: str) -> None:
        self.client = client
        self.sandbox_url = sandbox_url
        self.answers: list[Answer] = []
        client.event_hooks["response"].append(self._record)

    async def _record(self, response: httpx.Response) -> None:
        if str(response.request.url).startswith(self.sandbox_url):
            return
        await response.aread()
        request = response.request
        self.answers.append(
            Answer(request.method, request.url, response.status_code, response.headers, response.text, time.time())
        )

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.client.get(url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.client.post(url, **kwargs)

    async def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.client.put(url, **kwargs)

    # -- the sandbox's control API ----------------------------------------------------------------------------

    async def control(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.client.request(method, f"{self.sandbox_url}/_control{path}", **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    async def fault(self, **spec: Any) -> None:
        await self.control("POST", "/faults", json=spec)

    async def hold_refreshes(self) -> None:
        await self.control("POST", "/hold", json={"endpoint": "refresh"})

    async def wait_held(self, count: int = 1, deadline: float = 20) -> None:
        await self.control("GET", "/held", params={"count": count, "timeout": deadline})

    async def release(self) -> None:
        await self.control("POST", "/release")

    async def stats(self) -> Any:
        return await self.control("GET", "/stats")

    async def refresh_calls(self) -> int:
        calls: int = (await self.stats())["calls"]["refresh"]
        return calls


@dataclass
class Harness:
    """One test's world. `seed` connects an athlete at the sandbox and imports the pair through a replica."""

    http: Recorder
    sandbox: Process
    cluster: Cluster
    database: str
    encryption_key: str
    users: dict[str, int] = field(default_factory=dict)  # user id → athlete id
    clear_tokens: set[str] = field(default_factory=set)  # every token value the test saw in the clear

    async def seed(self, replica: Process, user_id: str, *, expires_in: int) -> dict[str, Any]:
        athlete: dict[str, Any] = await self.http.control("POST", "/athletes", json={"expires_in": expires_in})
        response = await self.http.put(
            f"{replica.url}/v1/users/{user_id}/tokens",
            json={k: athlete[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")},
        )
        assert response.status_code == 200, response.text
        self.users[user_id] = athlete["athlete_id"]
        self.clear_tokens |= {athlete["access_token"], athlete["refresh_token"]}
        return athlete

    async def newest(self, user_id: str) -> dict[str, Any]:
        """The sandbox's newest pair for the user (remembered for the secrecy scan)."""
        snapshot: dict[str, Any] = await self.http.control("GET", f"/athletes/{self.users[user_id]}")
        self.clear_tokens |= {snapshot["access_token"], snapshot["refresh_token"]}
        return snapshot

    async def rows(self) -> dict[str, TokenRow | None]:
        """Each seeded user's row, read through the store (the test's own engine, closed afterwards)."""
        engine = make_engine(self.cluster.url(self.database), pool_size=1)
        try:
            async with engine.connect() as conn:
                return {user_id: await store.get(conn, user_id) for user_id in self.users}
        finally:
            await engine.dispose()

    async def claim(self, user_id: str) -> Claim | None:
        """The user's refresh claim as the replicas see it (the test's own engine, closed afterwards)."""
        engine = make_engine(self.cluster.url(self.database), pool_size=1)
        try:
            async with engine.connect() as conn:
                return await claims.get(conn, user_id)
        finally:
            await engine.dispose()

    async def wait_claim_left(self, user_id: str, seconds: float, deadline: float = 60) -> None:
        """Until the user's claim has at most `seconds` of its lease left (or is gone): a bounded condition wait."""
        async with asyncio.timeout(deadline):
            while True:
                claim = await self.claim(user_id)
                if claim is None or claim.until / 1000 - time.time() <= seconds:
                    return
                await asyncio.sleep(0.1)

    async def stored_refresh_token(self, user_id: str) -> str:
        row = (await self.rows())[user_id]
        assert row is not None
        assert row.refresh_token_enc is not None
        return TokenCipher([self.encryption_key]).decrypt(row.refresh_token_enc, user_id=user_id, field="refresh")

    async def check(
        self,
        replicas: Collection[Process],
        *,
        stranded: Collection[str] = (),
        raced: Collection[str] = (),
        retried: Collection[str] = (),
    ) -> None:
        """Assert I1-I6 for every seeded user. `stranded` users are the ones a test knowingly cut off between
        Strava's answer and the commit: for them the old refresh token may be presented once more (and rejected)
        and the database cannot hold Strava's newest token, but they must be flagged `needs_reauth`. `raced` users
        had their token rotated behind tokensvc's back by the test while a refresh was at Strava: the sandbox notes
        the dead token's presentation, which is the race, not a second use (each token is still sent at most once).
        `retried` users had an owner frozen or cut off after Strava answered: whoever took over its lapsed claim may
        present the replaced token once more (rejected), but the owner's late pair must still be the one stored."""
        ledger: dict[str, list[dict[str, Any]]] = await self.http.control("GET", "/ledger")
        stats = await self.http.stats()
        rows = await self.rows()
        cipher = TokenCipher([self.encryption_key])
        for user_id, athlete_id in self.users.items():
            snapshot = await self.newest(user_id)
            entries = ledger[str(athlete_id)]
            # I1: one successor per refresh token (a stranded user's last token may be tried once more, not looped)
            limit = 2 if user_id in (*stranded, *retried) else 1
            overused = [e for e in entries if e["sent"] > limit]
            assert not overused, f"I1: {user_id}: refresh tokens presented more than {limit}x: {overused}"
            row = rows[user_id]
            assert row is not None, f"{user_id} has no row"
            assert row.refresh_token_enc is not None
            stored = cipher.decrypt(row.refresh_token_enc, user_id=user_id, field="refresh")
            stored_hash = hashlib.sha256(stored.encode()).hexdigest()
            by_hash = {e["sha256"]: e for e in entries}
            assert stored_hash in by_hash, f"{user_id}: the stored refresh token was never issued by Strava"
            stored_entry = by_hash[stored_hash]
            if user_id in stranded:
                assert stored_hash != entries[-1]["sha256"], f"{user_id} was meant to be stranded but is not"
                assert row.reauth_reason == "refresh_token_invalid", f"I3: stranded {user_id} not reported"
                assert stored_entry["sent"] == 2, f"{user_id}: the dead token was not tried exactly once more"
                continue
            # I2: latest wins
            assert stored_hash == entries[-1]["sha256"], (
                f"I2: {user_id}: the database holds refresh token #{stored_entry['index']}, "
                f"Strava's newest is #{entries[-1]['index']}"
            )
            # I3: no false alarms
            if row.reauth_reason is not None:
                really = snapshot["revoked"] or (not stored_entry["alive"] and stored_entry["sent"] >= 1)
                assert really, f"I3: {user_id} flagged {row.reauth_reason} but Strava never rejected its token"
        excused = {self.users[u] for u in (*stranded, *raced, *retried)}
        violators = {v["athlete_id"] for v in stats["ledger_violations"]}
        assert violators <= excused, f"I1: {stats['ledger_violations']}"
        self._check_answers()
        await self._check_secrecy(replicas, ledger)

    def _check_answers(self) -> None:
        for answer in self.http.answers:
            # I6: no 500; the only 5xx is a 503 that says when to come back
            if answer.status >= 500:
                assert answer.status == 503, f"I6: {answer.method} {answer.url} → {answer.status}: {answer.text}"
                assert answer.headers.get("retry-after", "").isdigit(), f"I6: 503 without Retry-After: {answer.url}"
            # I4: a handed-out token lives at least min_ttl and is not expired
            if answer.status == 200 and answer.url.path.endswith("/access-token"):
                body = json.loads(answer.text)
                min_ttl = int(parse_qs(answer.url.query.decode()).get("min_ttl", [str(DEFAULT_MIN_TTL)])[0])
                assert body["expires_in"] >= min_ttl, f"I4: {body['expires_in']} s left, {min_ttl} asked"
                assert body["expires_at"] > answer.at, "I4: an expired token was handed out"

    async def _check_secrecy(self, replicas: Collection[Process], ledger: dict[str, list[dict[str, Any]]]) -> None:
        """I5: no token in the processes' logs, in any error body, in /metrics, or in a dump of the database.
        Known tokens are matched directly; any other 40-hex string is matched against the ledger's hashes."""
        issued_hashes = {e["sha256"] for entries in ledger.values() for e in entries}
        texts: dict[str, str] = {f"log of {p.name}": p.log.read_text(errors="replace") for p in replicas}
        texts |= {f"error body of {a.url}": a.text for a in self.http.answers if a.status >= 400}
        for process in replicas:
            if process.popen.poll() is None:
                texts[f"/metrics of {process.name}"] = (await self.http.client.get(f"{process.url}/metrics")).text
        if not self.cluster.running:
            self.cluster.start()
        texts["pg_dump"] = await asyncio.to_thread(self.cluster.dump, self.database)
        for where, text in texts.items():
            leaked = {t for t in self.clear_tokens if t in text}
            leaked |= {m for m in _TOKENISH.findall(text) if hashlib.sha256(m.encode()).hexdigest() in issued_hashes}
            assert not leaked, f"I5: {len(leaked)} token(s) in the clear in the {where}"
