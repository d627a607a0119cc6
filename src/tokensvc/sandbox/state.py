"""The sandbox's in-memory world: athletes, codes, tokens, call counters and the refresh-token ledger.

Every mutation is synchronous and runs on the event loop thread (all routes are `async def`), so no two
mutations interleave and no lock is needed; the only awaits (hold, latency, hang) happen outside them.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, NotRequired

import httpx
from typing_extensions import TypedDict  # FastAPI (pydantic) rejects typing.TypedDict before Python 3.12

from . import errors
from .faults import Endpoint, FaultQueue, FaultSpec, Gate
from .push import Push
from .ratelimit import RateLimiter

logger = logging.getLogger(__name__)

ACCESS_TOKEN_LIFETIME: Final = 21600
CODE_LIFETIME: Final = 600
ONE_HOUR: Final = 3600
FIRST_ATHLETE_ID: Final = 100001
DEFAULT_SCOPE: Final = "read,activity:read_all"
SCOPES: Final = (
    "read",
    "read_all",
    "profile:read_all",
    "profile:write",
    "activity:read",
    "activity:read_all",
    "activity:write",
)
CALL_KINDS: Final[tuple[Endpoint, ...]] = (
    "authorize",
    "exchange",
    "refresh",
    "deauthorize",
    "athlete",
    "subscriptions",
)

Death = Literal["rotated", "reconnected", "revoked"]


class UnknownAthleteError(LookupError):
    """A control call named an athlete the sandbox has never connected."""


class SeededAthlete(TypedDict):
    athlete_id: int
    access_token: str
    refresh_token: str
    expires_at: int
    scope: str


class AthleteSnapshot(TypedDict):
    athlete_id: int
    access_token: str
    refresh_token: str
    expires_at: int
    revoked: bool
    refresh_tokens_issued: int


class TokenResponse(TypedDict):
    token_type: str
    access_token: str
    expires_at: int
    expires_in: int
    refresh_token: str
    athlete: NotRequired[dict[str, Any]]


class Violation(TypedDict):
    """A refresh token presented after a newer one superseded it (the client lost track of rotation)."""

    kind: Literal["stale_refresh_token"]
    athlete_id: int
    index: int
    sha256: str
    died: Death
    at: int


@dataclass(frozen=True)
class LedgerEntry:
    """What the sandbox knows about one issued refresh token, minus the token itself."""

    index: int
    sha256: str
    sent: int
    accepted: bool
    alive: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "sha256": self.sha256,
            "sent": self.sent,
            "accepted": self.accepted,
            "alive": self.alive,
        }


@dataclass
class _AccessToken:
    value: str
    athlete_id: int
    expires_at: int
    alive: bool = True


@dataclass
class _RefreshToken:
    value: str
    athlete_id: int
    index: int
    sent: int = 0
    accepted: bool = False
    alive: bool = True
    died: Death | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.value.encode()).hexdigest()


@dataclass
class _Code:
    value: str
    athlete_id: int
    scope: str
    expires_at: int
    used: bool = False


@dataclass
class _Athlete:
    id: int
    scope: str
    created_at: int
    access: _AccessToken
    refresh: _RefreshToken
    issued: list[_RefreshToken] = field(default_factory=list)
    access_tokens: list[_AccessToken] = field(default_factory=list)
    revoked: bool = False


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SandboxState:
    """One emulated Strava application and everything its athletes have granted it."""

    def __init__(
        self,
        *,
        client_id: str = "sandbox-client",
        client_secret: str = "sandbox-secret",
        clock: Callable[[], float] = time.time,
        rotate: bool = True,
        push_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.clock = clock
        self.rotate = rotate
        self.faults = FaultQueue()
        self.gate = Gate()
        self.rate = RateLimiter()
        self.push = Push(transport=push_transport)
        self.calls: dict[Endpoint, int] = {}
        self.refresh_by_athlete: dict[int, int] = {}
        self.violations: list[Violation] = []
        self._athletes: dict[int, _Athlete] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._codes: dict[str, _Code] = {}
        self._next_id = FIRST_ATHLETE_ID
        self._next_grant_expires_in: int | None = None
        self.access_lifetime = ACCESS_TOKEN_LIFETIME
        self.reset()

    def now(self) -> int:
        return int(self.clock())

    def reset(self) -> None:
        """Forget everything (athletes, tokens, counters, faults, limits) and free any held request."""
        self.calls = dict.fromkeys(CALL_KINDS, 0)
        self.refresh_by_athlete = {}
        self.violations = []
        self._athletes, self._access, self._refresh, self._codes = {}, {}, {}, {}
        self._next_id = FIRST_ATHLETE_ID
        self._next_grant_expires_in = None
        self.access_lifetime = ACCESS_TOKEN_LIFETIME
        self.faults.clear()
        self.gate.release()
        self.rate.reset()
        self.push.reset()

    def count_call(self, endpoint: Endpoint) -> None:
        if endpoint in self.calls:
            self.calls[endpoint] += 1

    def add_fault(self, spec: FaultSpec) -> None:
        logger.info("fault queued: %s %s x%d", spec.endpoint, spec.kind, spec.count)
        self.faults.add(spec)

    # --- the application's credentials -------------------------------------------------------------------

    def check_client_id(self, client_id: str | None) -> None:
        if client_id != self.client_id:
            raise errors.invalid_client_id()

    def check_client(self, client_id: str | None, client_secret: str | None) -> None:
        self.check_client_id(client_id)
        if not secrets.compare_digest((client_secret or "").encode(), self.client_secret.encode()):
            raise errors.bad_client_secret()

    # --- the OAuth flow ----------------------------------------------------------------------------------

    def new_athlete_id(self) -> int:
        """Reserve an id no athlete has, so two open consent pages never propose the same one."""
        while self._next_id in self._athletes:
            self._next_id += 1
        self._next_id += 1
        return self._next_id - 1

    def issue_code(self, athlete_id: int, scope: str) -> str:
        code = _Code(secrets.token_hex(20), athlete_id, scope, self.now() + CODE_LIFETIME)
        self._codes[code.value] = code
        return code.value

    def exchange(self, code: str | None) -> TokenResponse:
        """Trade a single-use code for a fresh pair; reconnecting an athlete kills its old refresh token."""
        record = self._codes.get(code or "")
        if record is None or record.used:
            raise errors.invalid_code()
        now = self.now()
        if now >= record.expires_at:
            raise errors.expired_code()
        record.used = True
        lifetime = ACCESS_TOKEN_LIFETIME if self._next_grant_expires_in is None else self._next_grant_expires_in
        self._next_grant_expires_in = None
        athlete = self._connect(record.athlete_id, record.scope, now + lifetime)
        logger.info("code exchanged for athlete %d", athlete.id)
        return self._token_response(athlete, now, with_athlete=True)

    def refresh(self, refresh_token: str | None) -> TokenResponse:
        """Strava's refresh: the one-hour rule for the access token, then rotation of the refresh token."""
        record = self._refresh.get(refresh_token or "")
        if record is None:
            raise errors.invalid_refresh_token()
        now = self.now()
        record.sent += 1
        self.refresh_by_athlete[record.athlete_id] = self.refresh_by_athlete.get(record.athlete_id, 0) + 1
        if not record.alive:
            if record.died in ("rotated", "reconnected"):
                self.violations.append(
                    {
                        "kind": "stale_refresh_token",
                        "athlete_id": record.athlete_id,
                        "index": record.index,
                        "sha256": record.sha256,
                        "died": record.died,
                        "at": now,
                    }
                )
            logger.info("dead refresh token #%d presented for athlete %d", record.index, record.athlete_id)
            raise errors.invalid_refresh_token()
        record.accepted = True
        athlete = self._athletes[record.athlete_id]
        if not (athlete.access.alive and athlete.access.expires_at - now > ONE_HOUR):
            athlete.access = self._mint_access(athlete.id, now + self.access_lifetime)
            athlete.access_tokens.append(athlete.access)
        if self.rotate:
            self._rotate_refresh(athlete, "rotated")
        logger.info("refresh accepted for athlete %d (token #%d)", athlete.id, record.index)
        return self._token_response(athlete, now, with_athlete=False)

    def deauthorize(self, access_token: str | None) -> dict[str, str]:
        """Kill every token the application holds for the athlete owning this access token."""
        athlete = self._athlete_by_access(access_token)
        self._revoke(athlete)
        logger.info("athlete %d deauthorized", athlete.id)
        return {"access_token": access_token or ""}

    def athlete_profile(self, access_token: str | None) -> dict[str, Any]:
        return self._profile(self._athlete_by_access(access_token), detailed=True)

    # --- control: shortcuts for tests --------------------------------------------------------------------

    def create_athlete(
        self,
        athlete_id: int | None = None,
        *,
        expires_in: int = ACCESS_TOKEN_LIFETIME,
        scope: str = DEFAULT_SCOPE,
    ) -> SeededAthlete:
        """Connect an athlete without the browser flow; an existing id is reconnected (new pair)."""
        athlete_id = self.new_athlete_id() if athlete_id is None else athlete_id
        athlete = self._connect(athlete_id, scope, self.now() + expires_in)
        return {
            "athlete_id": athlete.id,
            "access_token": athlete.access.value,
            "refresh_token": athlete.refresh.value,
            "expires_at": athlete.access.expires_at,
            "scope": athlete.scope,
        }

    def set_next_grant(self, expires_in: int) -> None:
        """Make the next successful code exchange (only that one) issue an access token living `expires_in` seconds.

        Lets a browser test connect a user whose token is already inside tokensvc's refresh buffer.
        """
        self._next_grant_expires_in = expires_in

    def set_access_lifetime(self, expires_in: int) -> None:
        """Every access token a refresh mints from now on lives `expires_in` seconds (Strava: always 6 h).

        Below one hour, every refresh mints a new access token, so a soak sees users come due again within minutes.
        """
        self.access_lifetime = expires_in

    def snapshot(self, athlete_id: int) -> AthleteSnapshot:
        """The athlete's newest pair in clear text, plus what tests need to judge it."""
        athlete = self._athlete(athlete_id)
        return {
            "athlete_id": athlete.id,
            "access_token": athlete.access.value,
            "refresh_token": athlete.refresh.value,
            "expires_at": athlete.access.expires_at,
            "revoked": athlete.revoked,
            "refresh_tokens_issued": len(athlete.issued),
        }

    def expire(self, athlete_id: int, expires_at: int) -> AthleteSnapshot:
        """Move the current access token's expiry (into the past, or inside the one-hour window)."""
        self._athlete(athlete_id).access.expires_at = expires_at
        return self.snapshot(athlete_id)

    def rotate_athlete(self, athlete_id: int) -> AthleteSnapshot:
        """Act as another client refreshing now: a new access and refresh token; the old refresh token dies.

        Raises ValueError for a revoked athlete, whom no client could refresh.
        """
        athlete = self._athlete(athlete_id)
        if athlete.revoked:
            raise ValueError(f"athlete {athlete_id} has revoked access")
        athlete.access = self._mint_access(athlete.id, self.now() + self.access_lifetime)
        athlete.access_tokens.append(athlete.access)
        self._rotate_refresh(athlete, "rotated")
        return self.snapshot(athlete_id)

    def revoke(self, athlete_id: int) -> AthleteSnapshot:
        """Act as the athlete revoking access on strava.com: every token dies."""
        self._revoke(self._athlete(athlete_id))
        return self.snapshot(athlete_id)

    @property
    def ledger(self) -> dict[int, list[LedgerEntry]]:
        """Every refresh token ever issued, per athlete, oldest first (the last one is the newest)."""
        return {
            athlete.id: [LedgerEntry(r.index, r.sha256, r.sent, r.accepted, r.alive) for r in athlete.issued]
            for athlete in self._athletes.values()
        }

    def ledger_json(self) -> dict[str, list[dict[str, Any]]]:
        return {str(aid): [entry.as_json() for entry in entries] for aid, entries in self.ledger.items()}

    def issued_tokens(self) -> list[str]:
        """Every access and refresh token minted since the last reset, for canary scans (nothing may print them)."""
        return [*self._access, *self._refresh]

    def stats(self) -> dict[str, Any]:
        """Counters for assertions; `calls` counts requests that reached a handler, failed or faulted ones too.

        `authorize` counts consent page views; /oauth/token calls without a known grant_type count nowhere.
        `refresh_by_athlete` counts refresh-grant requests whose token the sandbox recognised, accepted or not.
        """
        return {
            "calls": dict(self.calls),
            "refresh_by_athlete": {str(aid): n for aid, n in self.refresh_by_athlete.items()},
            "ledger_violations": list(self.violations),
        }

    # --- internals ---------------------------------------------------------------------------------------

    def _athlete(self, athlete_id: int) -> _Athlete:
        try:
            return self._athletes[athlete_id]
        except KeyError:
            raise UnknownAthleteError(athlete_id) from None

    def _athlete_by_access(self, access_token: str | None) -> _Athlete:
        token = self._access.get(access_token or "")
        if token is None or not token.alive or token.expires_at <= self.now():
            raise errors.invalid_access_token()
        return self._athletes[token.athlete_id]

    def _mint_access(self, athlete_id: int, expires_at: int) -> _AccessToken:
        token = _AccessToken(secrets.token_hex(20), athlete_id, expires_at)
        self._access[token.value] = token
        return token

    def _mint_refresh(self, athlete_id: int, index: int) -> _RefreshToken:
        token = _RefreshToken(secrets.token_hex(20), athlete_id, index)
        self._refresh[token.value] = token
        return token

    def _rotate_refresh(self, athlete: _Athlete, death: Death) -> None:
        old = athlete.refresh
        if old.alive:
            old.alive, old.died = False, death
        athlete.refresh = self._mint_refresh(athlete.id, len(athlete.issued))
        athlete.issued.append(athlete.refresh)

    def _connect(self, athlete_id: int, scope: str, expires_at: int) -> _Athlete:
        access = self._mint_access(athlete_id, expires_at)
        athlete = self._athletes.get(athlete_id)
        if athlete is None:
            refresh = self._mint_refresh(athlete_id, 0)
            athlete = _Athlete(athlete_id, scope, self.now(), access, refresh, [refresh], [access])
            self._athletes[athlete_id] = athlete
            return athlete
        athlete.access, athlete.scope, athlete.revoked = access, scope, False
        athlete.access_tokens.append(access)
        self._rotate_refresh(athlete, "reconnected")
        return athlete

    def _revoke(self, athlete: _Athlete) -> None:
        athlete.revoked = True
        for access in athlete.access_tokens:
            access.alive = False
        for refresh in athlete.issued:
            if refresh.alive:
                refresh.alive, refresh.died = False, "revoked"

    def _token_response(self, athlete: _Athlete, now: int, *, with_athlete: bool) -> TokenResponse:
        body: TokenResponse = {
            "token_type": "Bearer",
            "access_token": athlete.access.value,
            "expires_at": athlete.access.expires_at,
            "expires_in": athlete.access.expires_at - now,
            "refresh_token": athlete.refresh.value,
        }
        if with_athlete:
            body["athlete"] = self._profile(athlete, detailed=False)
        return body

    def _profile(self, athlete: _Athlete, *, detailed: bool) -> dict[str, Any]:
        return {
            "id": athlete.id,
            "username": f"sandbox_athlete_{athlete.id}",
            "resource_state": 3 if detailed else 2,
            "firstname": "Sandbox",
            "lastname": f"Athlete {athlete.id}",
            "bio": None,
            "city": "Sandbox City",
            "state": None,
            "country": None,
            "sex": None,
            "premium": False,
            "summit": False,
            "created_at": iso(athlete.created_at),
            "updated_at": iso(athlete.created_at),
            "badge_type_id": 0,
            "profile_medium": "avatar/athlete/medium.png",
            "profile": "avatar/athlete/large.png",
            "friend": None,
            "follower": None,
        }
