"""Soak: three `tokensvc serve` replicas with their sweepers, mixed traffic and injected Strava faults for N minutes,
then the reliability invariants I1-I6 (RELIABILITY.md) checked against the sandbox's ledger and the database.

    .venv/bin/python bench/soak.py --minutes 10      # development: --minutes 0.5 --users 30 --concurrency 6

`--concurrency` workers send access-token, refresh, the browser's refresh and status calls to random replicas;
meanwhile deauthorization webhooks (genuine, duplicated, forged) and reconnects, a fault on Strava's refresh calls
every 6 s and one SIGKILL and restart of a replica. Then it settles (on observable state, with a deadline) and
checks I1-I6 per user: see bench/README.md. Exit 1 when an invariant fails. No token is ever printed: tokens are
compared by value in memory and by sha256 against the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
import httpx
from benchlib import BenchError, header, migrate, run_main, scratch_database, wait_ready
from tests.e2e.processes import Process, free_port, service_env, start_sandbox, start_service

from tokensvc.crypto import TokenCipher, generate_key

BENCH_DIR = Path(__file__).resolve().parent
API_KEY = "soak-key-0123456789ab"
VERIFY_TOKEN = "soak-verify"
USER_PREFIX = "soak-user-"
SCOPES = "read,activity:read_all"
REPLICAS = 3
BUFFER_SECONDS = 60  # the smallest refresh buffer the service accepts
SWEEP_INTERVAL_SECONDS = 5
STRAVA_TIMEOUT_SECONDS = 3
LOST_ANSWER_HANG_SECONDS = 5.0  # longer than the service's Strava timeout: the answer never arrives
POOL_SIZE = 5  # the default (config.check_connection_budget: the sweep is not held against the pool)
MIN_TTLS = (10, 30, 60, 120)
SETTLE_DEADLINE_SECONDS = 150.0
REQUEST_TIMEOUT_SECONDS = 60.0  # above the longest wait the service may make a caller sit out: a claim, 45 s
FAULT_EVERY_SECONDS = 6.0
CHAOS_EVERY_SECONDS = 4.0
RECONNECT_AFTER_SECONDS = 15.0
RESTART_AFTER_SECONDS = 3.0
NO_RETRY_AFTER_WINDOW = 25  # a 429 without Retry-After pauses until the quarter hour: only inject it this close
HEX40 = re.compile(rb"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def user_id(n: int) -> str:
    return f"{USER_PREFIX}{n:05d}"


# -- processes -----------------------------------------------------------------------------------------------


@dataclass
class ReplicaConfig:
    database_url: str
    sandbox_url: str
    key: str
    session_secret: str
    out_dir: Path


def start_replica(config: ReplicaConfig, index: int, port: int, name: str) -> Process:
    """Replica `index` on `port`; a restarted one gets a `name` (and a log) of its own, for the I5 scan."""
    settings = {
        "TOKENSVC_STRAVA_TIMEOUT_SECONDS": str(STRAVA_TIMEOUT_SECONDS),
        "TOKENSVC_SESSION_SECRET": config.session_secret,  # one secret: a session minted on one replica works on all
        "TOKENSVC_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TOKENSVC_REFRESH_BUFFER_SECONDS": str(BUFFER_SECONDS),
        "TOKENSVC_SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL_SECONDS),
        "TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN": VERIFY_TOKEN,
        "TOKENSVC_DB_POOL_SIZE": str(POOL_SIZE),
        "TOKENSVC_LOG_LEVEL": "INFO",  # the logs are scanned for tokens (I5): let them say as much as they do
    }
    env = service_env(config.database_url, config.sandbox_url, api_key=API_KEY, key=config.key) | settings
    return start_service(name, config.out_dir, env, "--no-migrate", port=port)


# -- the world as the soak knows it ----------------------------------------------------------------------------


@dataclass
class User:
    uid: str
    athlete_id: int
    revoked: bool = False
    revocations: list[list[float]] = field(default_factory=list)  # [revoked_at, reconnected_at or inf]
    session: str | None = None
    reconnecting: bool = False
    # When a response (from any replica) first showed the current revocation in the database: from then on no
    # replica may hand out the dead token (each replica's token cache is dropped by Postgres NOTIFY on the change).
    change_seen_at: float | None = None

    def revoked_during(self, start: float, end: float) -> bool:
        return any(a <= end and b >= start for a, b in self.revocations)


@dataclass
class Tally:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    i6: list[str] = field(default_factory=list)
    i4: list[str] = field(default_factory=list)
    i5_bodies: list[str] = field(default_factory=list)
    unexpected_reauth: list[tuple[str, str, float]] = field(default_factory=list)  # (uid, endpoint, answered at)
    served: int = 0
    checked_at_sandbox: int = 0
    served_after_revocation: int = 0  # a dead token handed out after we revoked, before the service learned of it
    stale_after_change: list[str] = field(default_factory=list)  # … handed out after a replica had reported it
    inconclusive: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    faults_skipped: Counter[str] = field(default_factory=Counter)
    webhooks: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    down_windows: list[list[float]] = field(default_factory=list)  # per replica kill: [killed_at, ready_at]
    down_replica: int | None = None
    reconnects: int = 0
    revocations: int = 0


class Soak:
    def __init__(
        self,
        args: argparse.Namespace,
        replicas: list[Process],
        sandbox: Process,
        config: ReplicaConfig,
        users: list[User],
    ) -> None:
        self.args = args
        self.replicas = replicas
        self.sandbox = sandbox
        self.config = config
        self.users = users
        self.by_athlete = {u.athlete_id: u for u in users}
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.known_access: set[str] = set()  # sha256 of every access token the soak has seen
        self.verified: set[str] = set()
        self.check_slots = asyncio.Semaphore(4)
        self.stop = asyncio.Event()
        self.last_stats: dict[str, Any] = {}
        self.lost_users: dict[str, float] = {}  # from the audit trail once traffic stopped: uid -> first lost answer
        self.refreshes_accepted: dict[str, int] = {}
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
        # One client per replica: a killed replica's pooled connections go with its client, so the restarted
        # process is not blamed for the old one's dead sockets.
        self.clients = [self.new_client() for _ in range(REPLICAS)]
        self.http = self.clients[0]
        self.strava = httpx.AsyncClient(base_url=sandbox.url, timeout=REQUEST_TIMEOUT_SECONDS, limits=limits)

    @staticmethod
    def new_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_SECONDS,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=50),
            headers={"Authorization": f"Bearer {API_KEY}"},
        )

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        await self.strava.aclose()

    # -- sandbox control --

    async def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.strava.request(method, f"/_control{path}", json=body)
        if response.status_code != 200:
            raise BenchError(f"sandbox {method} /_control{path}: {response.status_code} {response.text[:200]}")
        return response.json()

    # -- one request, classified --

    def replica_url(self, index: int | None = None) -> tuple[int, str]:
        i = self.rng.randrange(REPLICAS) if index is None else index
        return i, self.replicas[i].url

    def replica_down(self, index: int, start: float, end: float) -> bool:
        if self.tally.down_replica != index:
            return False
        return any(a <= end and b >= start for a, b in self.tally.down_windows)

    async def call(
        self, endpoint: str, user: User | None, method: str, path: str, *, index: int | None = None, **kw: Any
    ) -> tuple[httpx.Response | None, float]:
        i, base = self.replica_url(index)
        start = time.time()
        try:
            response = await self.clients[i].request(method, f"{base}{path}", **kw)
        except httpx.TransportError as exc:
            end = time.time()
            if self.replica_down(i, start, end) or (self.tally.down_replica == i and not self.replicas[i].alive()):
                self.tally.requests[(endpoint, "replica down")] += 1
            else:
                self.tally.requests[(endpoint, "transport error")] += 1
                self.tally.i6.append(f"{endpoint} on replica {i}: no answer ({type(exc).__name__})")
            return None, start
        self.classify(endpoint, user, response, start)
        return response, start

    def classify(self, endpoint: str, user: User | None, response: httpx.Response, start: float) -> None:
        status = response.status_code
        end = time.time()
        if user is not None and user.revoked and user.change_seen_at is None and self.shows_deauthorized(response):
            user.change_seen_at = end
        if status >= 400:
            self.scan_body(endpoint, response)
        if 200 <= status < 300:
            self.tally.requests[(endpoint, "2xx")] += 1
        elif status in (409, 401) and self.needs_reauth(response):
            if user is not None and user.revoked_during(start, end):
                self.tally.requests[(endpoint, f"{status} revoked user")] += 1
            else:
                self.tally.requests[(endpoint, f"{status} unexpected reauth")] += 1
                if user is not None:
                    self.tally.unexpected_reauth.append((user.uid, endpoint, end))
        elif status == 503 and response.headers.get("retry-after"):
            self.tally.requests[(endpoint, "503 + Retry-After")] += 1
        elif 400 <= status < 500:
            self.tally.requests[(endpoint, f"{status}")] += 1
            if endpoint != "webhook":  # every other call the soak makes is well formed
                self.tally.i6.append(f"{endpoint}: unexpected {status} {response.text[:160]}")
        else:
            self.tally.requests[(endpoint, f"{status} (I6)")] += 1
            self.tally.i6.append(f"{endpoint}: {status} without Retry-After: {response.text[:160]}")

    @staticmethod
    def shows_deauthorized(response: httpx.Response) -> bool:
        """The answer reveals that the deauthorization reached the database (a 409/401, or a status)."""
        try:
            body = response.json()
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        nested = body.get("token_status")
        status: dict[str, Any] = nested if isinstance(nested, dict) else body
        return body.get("reauth_reason") == "deauthorized" or status.get("reauth_reason") == "deauthorized"

    @staticmethod
    def needs_reauth(response: httpx.Response) -> bool:
        try:
            body = response.json()
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("needs_reauth") is True

    def scan_body(self, endpoint: str, response: httpx.Response) -> None:
        for match in HEX40.findall(response.content):
            if sha(match.decode()) in self.known_access:
                self.tally.i5_bodies.append(f"{endpoint}: an access token in a {response.status_code} body")

    # -- traffic --

    async def access_token(self, user: User, index: int | None = None) -> None:
        min_ttl = self.rng.choice(MIN_TTLS)
        response, start = await self.call(
            "access-token", user, "GET", f"/v1/users/{user.uid}/access-token", params={"min_ttl": min_ttl}, index=index
        )
        if response is None or response.status_code != 200:
            return
        await self.check_token(user, response, min_ttl, start)

    async def check_token(self, user: User, response: httpx.Response, min_ttl: int, start: float) -> None:
        """I4: the token has the life asked for, is not expired, and is one the sandbox issued for this athlete."""
        self.tally.served += 1
        body = response.json()
        token, expires_at, expires_in = body["access_token"], int(body["expires_at"]), int(body["expires_in"])
        digest = sha(token)
        self.known_access.add(digest)
        received = time.time()
        if "no-store" not in response.headers.get("cache-control", ""):
            self.tally.i4.append(f"{user.uid}: access token without Cache-Control: no-store")
        if expires_in < min_ttl or expires_at < int(start) + min_ttl - 1 or expires_at <= received:
            self.tally.i4.append(f"{user.uid}: expires_in {expires_in} for min_ttl {min_ttl}")
        if body.get("athlete_id") not in (None, user.athlete_id):
            self.tally.i4.append(f"{user.uid}: token for athlete {body.get('athlete_id')}, not {user.athlete_id}")
        if digest in self.verified and not user.revocations:
            return
        async with self.check_slots:
            answer = await self.strava.get("/api/v3/athlete", headers={"Authorization": f"Bearer {token}"})
        self.tally.checked_at_sandbox += 1
        if answer.status_code == 200 and answer.json().get("id") == user.athlete_id:
            self.verified.add(digest)
        elif answer.status_code == 200:
            self.tally.i4.append(f"{user.uid}: the sandbox says the token belongs to another athlete")
        elif user.revoked_during(start, time.time()):
            if user.change_seen_at is not None and start > user.change_seen_at:
                self.tally.stale_after_change.append(
                    f"{user.uid}: a revoked token handed out {start - user.change_seen_at:.3f} s after a replica"
                    " had reported the deauthorization"
                )
            else:
                self.tally.served_after_revocation += 1
        elif expires_at <= time.time() + 1:
            self.tally.inconclusive += 1  # it expired between the answer and the check
        else:
            self.tally.i4.append(f"{user.uid}: the sandbox rejects the token handed out ({answer.status_code})")

    async def refresh(self, user: User) -> None:
        force = self.rng.random() < 0.5
        endpoint = "refresh force" if force else "refresh"
        await self.call(endpoint, user, "POST", f"/v1/users/{user.uid}/refresh", params={"force": str(force).lower()})

    async def browser(self, user: User) -> None:
        if user.session is None:
            response, _ = await self.call("session", user, "POST", f"/v1/users/{user.uid}/session")
            if response is None or response.status_code != 200:
                return
            user.session = response.json()["session_token"]
        i, base = self.replica_url()
        # The browser's own call: cookie, JSON, no API key.
        headers = {
            "Authorization": "",
            "Content-Type": "application/json",
            "Origin": base,
            "Cookie": f"tokensvc_session={user.session}",
        }
        await self.call(
            "browser",
            user,
            "POST",
            "/proactive-token-refresh",
            index=i,
            content=b"{}",
            headers=headers,
        )

    async def status(self, user: User) -> None:
        await self.call("token-status", user, "GET", f"/v1/users/{user.uid}/token-status")

    async def worker(self) -> None:
        while not self.stop.is_set():
            user = self.rng.choice(self.users)
            roll = self.rng.random()
            if roll < 0.08:  # the same user on every replica at the same moment
                async with asyncio.TaskGroup() as group:
                    for i in range(REPLICAS):
                        for _ in range(2):
                            group.create_task(self.access_token(user, i))
            elif roll < 0.55:
                await self.access_token(user)
            elif roll < 0.65:
                await self.refresh(user)
            elif roll < 0.80:
                await self.browser(user)
            else:
                await self.status(user)

    # -- webhooks, revocations, reconnects --

    def webhook_event(self, athlete_id: int) -> dict[str, Any]:
        return {
            "object_type": "athlete",
            "object_id": athlete_id,
            "aspect_type": "update",
            "updates": {"authorized": "false"},
            "owner_id": athlete_id,
            "subscription_id": 1,
            "event_time": int(time.time()),
        }

    async def send_webhook(self, user: User, kind: str) -> None:
        response, _ = await self.call(
            "webhook", None, "POST", "/v1/webhooks/strava", json=self.webhook_event(user.athlete_id)
        )
        if response is not None:
            self.tally.webhooks[f"{kind} → {response.status_code}"] += 1

    async def revoke(self, user: User) -> None:
        user.revoked = True
        user.revocations.append([time.time(), float("inf")])
        await self.control("POST", f"/athletes/{user.athlete_id}/revoke")
        self.tally.revocations += 1
        await self.send_webhook(user, "genuine")
        if self.rng.random() < 0.3:
            await self.send_webhook(user, "duplicate")

    async def reconnect(self, user: User) -> None:
        """The athlete connects again (sandbox: a new pair) and the app imports the new tokens."""
        seeded = await self.control(
            "POST", "/athletes", {"athlete_id": user.athlete_id, "expires_in": self.args.token_lifetime}
        )
        self.known_access.add(sha(seeded["access_token"]))
        body = {
            "access_token": seeded["access_token"],
            "refresh_token": seeded["refresh_token"],
            "expires_at": seeded["expires_at"],
            "athlete_id": user.athlete_id,
            "scopes": SCOPES.split(","),
        }
        response, _ = await self.call("import", user, "PUT", f"/v1/users/{user.uid}/tokens", json=body)
        if response is not None and response.status_code == 200:
            user.revoked = False
            user.change_seen_at = None
            user.revocations[-1][1] = time.time()
            self.tally.reconnects += 1

    async def chaos(self) -> None:
        tick = 0
        while not self.stop.is_set():
            await self.sleep(CHAOS_EVERY_SECONDS)
            if self.stop.is_set():
                return
            tick += 1
            live = [u for u in self.users if not u.revoked]
            if tick % 2 == 1 and live:
                await self.revoke(self.rng.choice(live))
            elif live:
                target = self.rng.choice(live)
                await self.send_webhook(target, "forged")
            now = time.time()
            for user in self.users:
                if user.revoked and now - user.revocations[-1][0] > RECONNECT_AFTER_SECONDS:
                    await self.reconnect(user)

    # -- faults --

    async def inject(self, name: str, spec: dict[str, Any]) -> None:
        await self.control("POST", "/faults", {"endpoint": "refresh", **spec})
        self.tally.faults[name] += spec.get("count", 1)

    async def faults(self) -> None:
        schedule = ["5xx burst", "lost answer", "latency", "malformed", "429 + Retry-After", "5xx burst", "latency"]
        tick = 0
        while not self.stop.is_set():
            await self.sleep(FAULT_EVERY_SECONDS)
            if self.stop.is_set():
                return
            kind = schedule[tick % len(schedule)]
            tick += 1
            if kind == "5xx burst":
                await self.inject(kind, {"kind": "status", "status": self.rng.choice((500, 502, 503)), "count": 4})
            elif kind == "latency":
                await self.inject(kind, {"kind": "latency", "latency_ms": 1500, "count": 5})
            elif kind == "malformed":
                await self.inject(kind, {"kind": "malformed", "count": 2})
            elif kind == "429 + Retry-After":
                await self.inject(kind, {"kind": "status", "status": 429, "retry_after": 2, "count": 1})
            elif kind == "lost answer":
                await self.inject(kind, {"kind": "lost_answer", "hang_seconds": LOST_ANSWER_HANG_SECONDS})
            # Without Retry-After the service rightly pauses every replica until the next quarter hour: inject it
            # only just before one, so that the pause is short and the rest of the run still refreshes.
            to_window = 900 - int(time.time()) % 900
            if to_window <= NO_RETRY_AFTER_WINDOW and not self.tally.faults["429 without Retry-After"]:
                await self.inject("429 without Retry-After", {"kind": "status", "status": 429, "count": 1})

    async def killer(self, at: float) -> None:
        await self.sleep(at)
        if self.stop.is_set():
            return
        index = REPLICAS - 1
        victim = self.replicas[index]
        port = int(victim.url.rsplit(":", 1)[1])
        self.tally.down_replica = index
        window = [time.time(), float("inf")]
        self.tally.down_windows.append(window)
        victim.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.popen.wait)
        await self.sleep(RESTART_AFTER_SECONDS)
        replacement = start_replica(self.config, index, port, f"{victim.name}-restarted")
        self.replicas[index] = replacement
        stale, self.clients[index] = self.clients[index], self.new_client()
        await stale.aclose()
        await wait_ready(replacement)
        window[1] = time.time()
        self.tally.restarts += 1

    async def sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self.stop.wait()
        except TimeoutError:
            pass

    async def run(self, seconds: float) -> None:
        tasks = [asyncio.create_task(self.worker()) for _ in range(self.args.concurrency)]
        tasks += [
            asyncio.create_task(self.chaos()),
            asyncio.create_task(self.faults()),
            asyncio.create_task(self.killer(seconds * 0.4)),
        ]
        await self.sleep(seconds)
        self.stop.set()
        await asyncio.gather(*tasks)


# -- after the run ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    uid: str
    refresh_sha: str | None
    access_sha: str | None
    athlete_id: int | None
    reauth_reason: str | None


async def read_rows(database_url: str, key: str) -> dict[str, Row]:
    cipher = TokenCipher([key])
    conn = await asyncpg.connect(database_url)
    try:
        records = await conn.fetch(
            "SELECT user_id, access_token_enc, refresh_token_enc, athlete_id, reauth_reason FROM user_tokens"
        )
    finally:
        await conn.close()
    rows = {}
    for r in records:
        uid = r["user_id"]

        def plain(value: str | None, field: Literal["access", "refresh"], uid: str = uid) -> str | None:
            if value is None:
                return None
            return sha(cipher.decrypt(value, user_id=uid, field=field))

        rows[uid] = Row(
            uid,
            plain(r["refresh_token_enc"], "refresh"),
            plain(r["access_token_enc"], "access"),
            r["athlete_id"],
            r["reauth_reason"],
        )
    return rows


async def answer_lost_users(database_url: str) -> dict[str, float]:
    """Users whose refresh answer was lost, with the epoch of the first such attempt (from the audit trail)."""
    conn = await asyncpg.connect(database_url)
    try:
        records = await conn.fetch(
            "SELECT user_id, min(occurred_at) AS first FROM token_events WHERE outcome = 'answer_lost' GROUP BY user_id"
        )
    finally:
        await conn.close()
    return {r["user_id"]: r["first"].timestamp() for r in records}


async def settle(soak: Soak, database_url: str, key: str) -> float:
    """Wait until every user holds the sandbox's newest refresh token or is flagged (deadline; nudges the slow)."""
    started = time.monotonic()
    nudged: set[str] = set()
    while True:
        rows = await read_rows(database_url, key)
        ledger = await soak.control("GET", "/ledger")
        pending = []
        for user in soak.users:
            row = rows.get(user.uid)
            entries = ledger.get(str(user.athlete_id), [])
            if row is None or not entries or row.reauth_reason is not None:
                continue
            if row.refresh_sha != entries[-1]["sha256"]:
                pending.append(user)
        elapsed = time.monotonic() - started
        if not pending or elapsed > SETTLE_DEADLINE_SECONDS:
            return elapsed
        if elapsed > 10:
            for user in pending:
                if user.uid not in nudged:  # its next attempt tells (a lost answer's user is flagged by it)
                    nudged.add(user.uid)
                    await soak.call("refresh force", user, "POST", f"/v1/users/{user.uid}/refresh?force=true")
        await asyncio.sleep(1.0)


@dataclass
class Verdict:
    ok: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    false_reauth: list[str] = field(default_factory=list)
    stranded_lost_answer: list[str] = field(default_factory=list)
    stranded_kill: list[str] = field(default_factory=list)
    stranded_unflagged: list[str] = field(default_factory=list)
    revoked_flagged: list[str] = field(default_factory=list)
    revoked_unflagged: list[str] = field(default_factory=list)
    i1: list[str] = field(default_factory=list)
    i1_explained: int = 0
    # Users stranded at some point of the run (a lost answer or the kill), whatever became of them afterwards (a
    # revocation and a reconnect heal a stranded user): their 409s while stranded were the truth.
    stranded_earlier: set[str] = field(default_factory=set)


def judge(
    soak: Soak, rows: dict[str, Row], ledger: dict[str, list[dict[str, Any]]], lost_users: dict[str, float]
) -> Verdict:
    """I2/I3 per user, and I1 from the ledger, with every exception named by its cause."""
    v = Verdict()
    killed = soak.tally.restarts > 0
    stranded: dict[int, int] = {}  # athlete id -> the index of the token the service was left holding
    for user in soak.users:
        row = rows.get(user.uid)
        entries = ledger.get(str(user.athlete_id), [])
        if row is None or not entries:
            v.lost.append(f"{user.uid}: no row or no ledger")
            continue
        index = {e["sha256"]: e["index"] for e in entries}.get(row.refresh_sha or "")
        newest = entries[-1]
        flagged = row.reauth_reason is not None
        if user.revoked:
            (v.revoked_flagged if flagged else v.revoked_unflagged).append(user.uid)
            continue
        if row.refresh_sha is None and flagged:
            # Tokens discarded by a deauthorization event (a forged one, for a user a lost answer or the kill had
            # already stranded: with its access token expired, Strava's rejection was the only answer). Stranded
            # all the same if Strava's newest token was never presented.
            if newest["sent"] == 0 and (user.uid in lost_users or killed):
                stranded[user.athlete_id] = newest["index"] - 1
                (v.stranded_lost_answer if user.uid in lost_users else v.stranded_kill).append(user.uid)
            else:
                v.lost.append(f"{user.uid}: tokens discarded ({row.reauth_reason}) with no revocation or lost answer")
            continue
        if index == newest["index"]:
            (v.false_reauth if flagged else v.ok).append(user.uid)
            continue
        # The service holds an older token: Strava rotated and the service never stored the successor.
        successor_unused = index is not None and index == newest["index"] - 1 and newest["sent"] == 0
        if successor_unused and user.uid in lost_users:
            stranded[user.athlete_id] = index if index is not None else -1
            (v.stranded_lost_answer if flagged else v.stranded_unflagged).append(user.uid)
        elif successor_unused and killed:
            stranded[user.athlete_id] = index if index is not None else -1
            (v.stranded_kill if flagged else v.stranded_unflagged).append(user.uid)
        else:
            v.lost.append(f"{user.uid}: holds token #{index}, Strava's newest is #{newest['index']}")
    users_by_athlete = {user.athlete_id: user.uid for user in soak.users}
    for violation in soak.last_stats.get("ledger_violations", []):
        athlete, index = violation["athlete_id"], violation["index"]
        uid = users_by_athlete.get(athlete, "")
        successor = next((e for e in ledger.get(str(athlete), []) if e["index"] == index + 1), None)
        # Stranded at the time, however the user ends: the token's successor was issued by Strava but never
        # presented by anyone (its answer was lost, or the process died before storing it).
        stranded_then = successor is not None and successor["sent"] == 0 and (uid in lost_users or killed)
        if stranded.get(athlete) == index or stranded_then:
            v.i1_explained += 1  # the stranded token presented again: how the service learns it is dead
            v.stranded_earlier.add(uid)
        else:
            v.i1.append(f"athlete {athlete}: token #{index} ({violation['died']}) resent")
    return v


def scan_secrets(paths: list[Path], dump: bytes, refresh_hashes: set[str], access_hashes: set[str]) -> list[str]:
    hits = []
    every = refresh_hashes | access_hashes
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found = sum(1 for m in HEX40.findall(data) if sha(m.decode()) in every)
        if found:
            hits.append(f"{path.name}: {found} token(s) in clear")
    found = sum(1 for m in HEX40.findall(dump) if sha(m.decode()) in every)
    if found:
        hits.append(f"pg_dump: {found} token(s) in clear")
    return hits


def pg_dump(pg: str, db_name: str) -> bytes:
    done = subprocess.run(
        ["pg_dump", "--dbname", f"{pg.rstrip('/')}/{db_name}"], capture_output=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"pg_dump failed: {done.stderr.decode(errors='replace')[-500:]}")
    return done.stdout


# -- output ----------------------------------------------------------------------------------------------------


def print_summary(soak: Soak, v: Verdict, i5: list[str], settle_s: float, stats: dict[str, Any]) -> dict[str, bool]:
    t = soak.tally
    print("\n== requests by endpoint and class")
    endpoints = sorted({e for e, _ in t.requests})
    for endpoint in endpoints:
        classes = {c: n for (e, c), n in t.requests.items() if e == endpoint}
        total = sum(classes.values())
        print(f"  {endpoint:14} {total:7,}  " + ", ".join(f"{c} {n:,}" for c, n in sorted(classes.items())))
    print(f"  total          {sum(t.requests.values()):7,}")
    print("  ('unexpected reauth': a user the soak had not revoked; judged below, once stranded users are known)")
    calls = stats.get("calls", {})
    ledger_sent = sum(soak.refreshes_accepted.values())
    print("\n== Strava (sandbox)")
    print(
        f"  refresh calls {calls.get('refresh', 0):,} (accepted {ledger_sent:,}: refresh tokens rotated),"
        f" athlete calls {calls.get('athlete', 0):,} (token checks and webhook confirmations),"
        f" per user: {ledger_sent / max(1, len(soak.users)):.1f} rotations"
    )
    print("\n== faults injected (occurrences queued on Strava's refresh calls)")
    for kind, n in sorted(t.faults.items()):
        print(f"  {kind:26} {n}")
    if not t.faults["429 without Retry-After"]:
        print("  429 without Retry-After    0 (no quarter-hour boundary came up during the run: not injected)")
    print(f"  (left unconsumed when traffic stopped: {t.faults_skipped['unconsumed']})")
    down = ", ".join(f"{b - a:.1f} s" for a, b in t.down_windows)
    print(f"  replica SIGKILL + restart  {t.restarts} (down {down or '-'})")
    print("\n== webhooks")
    for kind, n in sorted(t.webhooks.items()):
        print(f"  {kind:26} {n}")
    print(f"  revocations {t.revocations}, reconnects (re-import) {t.reconnects}")
    print("\n== access tokens handed out (I4)")
    print(
        f"  {t.served:,} served, {t.checked_at_sandbox:,} checked at the sandbox; {len(t.i4)} problems;"
        f" dead after our revocation, before the service learned of it: {t.served_after_revocation};"
        f" expired before the check (inconclusive): {t.inconclusive}"
    )
    print(
        f"  revoked tokens handed out after a replica had already reported the deauthorization (stale cache):"
        f" {len(t.stale_after_change)}   (must be 0)"
    )
    for line in t.stale_after_change[:5]:
        print(f"    {line}")
    stranded_users = set(v.stranded_lost_answer + v.stranded_kill) | v.stranded_earlier
    killed_at = t.down_windows[0][0] if t.down_windows else float("inf")

    def stranded_by(uid: str, at: float) -> bool:
        """A 409 is the truth only once the user was stranded: after its lost answer (or the kill)."""
        return uid in stranded_users and at >= min(soak.lost_users.get(uid, float("inf")), killed_at) - 1.0

    explained = [(u, e) for u, e, at in t.unexpected_reauth if stranded_by(u, at)]
    false_responses = len(t.unexpected_reauth) - len(explained)
    print(f"\n== outcome per user (DB against the sandbox, after settling for {settle_s:.1f} s)")
    print(f"  holding Strava's newest refresh token   {len(v.ok)}")
    print(f"  revoked by the soak, flagged            {len(v.revoked_flagged)}")
    print(f"  revoked by the soak, not yet flagged    {len(v.revoked_unflagged)}")
    print(f"  stranded by a lost answer (flagged)     {len(v.stranded_lost_answer)}")
    print(f"  stranded by the SIGKILL (flagged)       {len(v.stranded_kill)}")
    print(f"  stranded, NOT flagged                   {len(v.stranded_unflagged)}")
    print(f"  LOST refresh tokens                     {len(v.lost)}   (must be 0)")
    print(
        f"  FALSE needs_reauth                      {len(v.false_reauth)} users,"
        f" {false_responses} responses   (must be 0)"
    )
    print("  (stranded: Strava rotated but its answer never reached the service; truthfully needs_reauth, allowed)")
    for line in (v.lost + v.false_reauth + v.stranded_unflagged)[:10]:
        print(f"    {line}")
    if v.revoked_unflagged:
        print(f"    revoked, unflagged: {v.revoked_unflagged[:10]}")
    verdicts = {
        "I1 one successor": not v.i1,
        "I2 latest wins": not v.lost and not v.stranded_unflagged,
        "I3 no false alarms": not v.false_reauth and false_responses == 0,
        "I4 token life, nothing stale": not t.i4 and not t.stale_after_change,
        "I5 no secret in the clear": not i5 and not t.i5_bodies,
        "I6 no 500": not t.i6,
    }
    print("\n== invariants")
    print(f"  I1: ledger violations {len(v.i1) + v.i1_explained} ({v.i1_explained} the stranded token re-sent once)")
    for line in v.i1[:5]:
        print(f"    {line}")
    for line in t.i4[:5]:
        print(f"    I4: {line}")
    for line in (i5 + t.i5_bodies)[:5]:
        print(f"    I5: {line}")
    for line in t.i6[:8]:
        print(f"    I6: {line}")
    for name, ok in verdicts.items():
        print(f"  {name:28} {'PASS' if ok else 'FAIL'}")
    return verdicts


# -- the run ---------------------------------------------------------------------------------------------------


async def seed_users(soak_args: argparse.Namespace, sandbox_url: str, replica_url: str) -> list[User]:
    """Athletes at the sandbox, imported with staggered expiry so the sweeper has work from the first minute."""
    rng = random.Random(soak_args.seed)
    users: list[User] = []
    semaphore = asyncio.Semaphore(10)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as http:

        async def one(n: int) -> None:
            async with semaphore:
                expires_in = rng.randint(BUFFER_SECONDS + 30, soak_args.token_lifetime)
                response = await http.post(f"{sandbox_url}/_control/athletes", json={"expires_in": expires_in})
                seeded = response.json()
                uid = user_id(n)
                body = {
                    "access_token": seeded["access_token"],
                    "refresh_token": seeded["refresh_token"],
                    "expires_at": seeded["expires_at"],
                    "athlete_id": seeded["athlete_id"],
                    "scopes": SCOPES.split(","),
                }
                imported = await http.put(f"{replica_url}/v1/users/{uid}/tokens", json=body)
                if imported.status_code != 200:
                    raise BenchError(f"import {uid}: {imported.status_code} {imported.text[:200]}")
                users.append(User(uid, int(seeded["athlete_id"])))

        async with asyncio.TaskGroup() as group:
            for n in range(soak_args.users):
                group.create_task(one(n))
    users.sort(key=lambda u: u.uid)
    return users


async def soak_main(args: argparse.Namespace, database_url: str, sandbox: Process, out_dir: Path) -> bool:
    key = generate_key()
    config = ReplicaConfig(database_url, sandbox.url, key, secrets.token_urlsafe(32), out_dir)
    replicas: list[Process] = []
    soak: Soak | None = None
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            limits = {"limit_15min": 10**7, "limit_daily": 10**8, "read_limit_15min": 10**7, "read_limit_daily": 10**8}
            await http.post(f"{sandbox.url}/_control/rate-limit", json=limits)
            for i in range(REPLICAS):
                replicas.append(start_replica(config, i, free_port(), f"replica-{i}"))
            await wait_ready(*replicas)
        users = await seed_users(args, sandbox.url, replicas[0].url)
        print(f"imported {len(users)} sandbox athletes (expiring in {BUFFER_SECONDS + 30}..{args.token_lifetime} s)")
        soak = Soak(args, replicas, sandbox, config, users)
        for user in users:
            snap = await soak.control("GET", f"/athletes/{user.athlete_id}")
            soak.known_access.add(sha(snap["access_token"]))
        await soak.control("POST", "/access-lifetime", {"expires_in": args.token_lifetime})
        seconds = args.minutes * 60
        print(f"\n== traffic for {seconds:.0f} s ...", flush=True)
        started = time.monotonic()
        await soak.run(seconds)
        print(f"traffic stopped after {time.monotonic() - started:.1f} s; clearing faults and settling", flush=True)
        pending = (await soak.control("GET", "/faults"))["pending"]
        soak.tally.faults_skipped["unconsumed"] = sum(int(f["remaining"]) for f in pending)
        await soak.control("DELETE", "/faults")
        await soak.control("POST", "/release")
        settle_s = await settle(soak, database_url, key)

        rows = await read_rows(database_url, key)
        ledger: dict[str, list[dict[str, Any]]] = await soak.control("GET", "/ledger")
        stats: dict[str, Any] = await soak.control("GET", "/stats")
        soak.last_stats = stats
        soak.refreshes_accepted = {a: sum(1 for e in es if e["accepted"]) for a, es in ledger.items()}
        for user in users:
            snap = await soak.control("GET", f"/athletes/{user.athlete_id}")
            soak.known_access.add(sha(snap["access_token"]))
        soak.lost_users = lost_users = await answer_lost_users(database_url)
        verdict = judge(soak, rows, ledger, lost_users)
        dump = await asyncio.to_thread(pg_dump, args.pg, args.db_name)
        refresh_hashes = {e["sha256"] for es in ledger.values() for e in es}
        logs = await asyncio.to_thread(lambda: sorted(out_dir.glob("replica-*.log")))  # the killed one's too
        i5 = scan_secrets(logs, dump, refresh_hashes, soak.known_access)
        verdicts = print_summary(soak, verdict, i5, settle_s, stats)
        return all(verdicts.values())
    finally:
        if soak is not None:
            await soak.close()
        for replica in soak.replicas if soak is not None else replicas:
            replica.stop()


# -- command line ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the traffic runs")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=12, help="traffic workers")
    parser.add_argument(
        "--token-lifetime", type=int, default=180, help="seconds each access token the sandbox mints lives"
    )
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="Postgres server URL")
    parser.add_argument("--db-name", default="tokensvc_soak", help="database to (re)create and drop")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "out" / "soak", help="logs and results")
    args = parser.parse_args(argv)
    if args.token_lifetime < BUFFER_SECONDS + 60 or args.token_lifetime > 3600:
        parser.error(f"--token-lifetime must be {BUFFER_SECONDS + 60}..3600")
    return args


async def run(args: argparse.Namespace, out_dir: Path) -> bool:
    async with scratch_database(args.pg, args.db_name) as (database_url, pg_version):
        settings = (
            f"{args.minutes} min, {args.users} users, {args.concurrency} workers, {REPLICAS} replicas (sweeper every"
            f" {SWEEP_INTERVAL_SECONDS} s, buffer {BUFFER_SECONDS} s, Strava timeout {STRAVA_TIMEOUT_SECONDS} s, pool"
            f" {POOL_SIZE}), sandbox access tokens live {args.token_lifetime} s, min_ttl in {MIN_TTLS},"
            f" seed {args.seed}"
        )
        header("bench/soak.py", settings, postgres=pg_version)
        await migrate({"TOKENSVC_DATABASE_URL": database_url, "TOKENSVC_LOG_LEVEL": "WARNING"})
        sandbox = start_sandbox(out_dir, cwd=out_dir)
        try:
            return await soak_main(args, database_url, sandbox, out_dir)
        finally:
            sandbox.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("replica-*.log"):
        old.unlink()  # the I5 scan reads these: only this run's
    passed = asyncio.run(run(args, out_dir))
    print(f"\nlogs: {out_dir}")
    if not passed:
        print("SOAK FAILED: an invariant failed (see above)", file=sys.stderr)
        return 1
    print("SOAK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
