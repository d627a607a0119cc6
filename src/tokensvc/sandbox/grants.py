"""What athletes granted the application: their tokens (every one ever issued, for the ledger), codes and scopes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from . import errors

FIRST_ATHLETE_ID: Final = 100001

Death = Literal["rotated", "reconnected", "revoked"]


class UnknownAthleteError(LookupError):
    """A control call named an athlete the sandbox has never connected."""


@dataclass
class AccessToken:
    value: str
    athlete_id: int
    expires_at: int
    alive: bool = True


@dataclass
class RefreshToken:
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
class Code:
    value: str
    athlete_id: int
    scope: str
    expires_at: int
    used: bool = False


@dataclass
class Athlete:
    """One athlete's grant. The newest tokens are the last ones issued; older access tokens live until expiry."""

    id: int
    scope: str
    created_at: int
    issued: list[RefreshToken] = field(default_factory=list)
    access_tokens: list[AccessToken] = field(default_factory=list)
    revoked: bool = False

    @property
    def access(self) -> AccessToken:
        return self.access_tokens[-1]

    @property
    def refresh(self) -> RefreshToken:
        return self.issued[-1]

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(s for s in self.scope.split(",") if s)


class Grants:
    """Athletes by id, tokens by value, codes by value. Mutations are synchronous (see `state`)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.athletes: dict[int, Athlete] = {}
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.codes: dict[str, Code] = {}
        self.next_id = FIRST_ATHLETE_ID

    def athlete(self, athlete_id: int) -> Athlete:
        try:
            return self.athletes[athlete_id]
        except KeyError:
            raise UnknownAthleteError(athlete_id) from None

    def by_access(self, access_token: str | None, now: int) -> Athlete:
        """The athlete a live access token belongs to. Raises StravaError 401 Athlete/access_token/invalid."""
        token = self.access.get(access_token or "")
        if token is None or not token.alive or token.expires_at <= now:
            raise errors.invalid_access_token()
        return self.athletes[token.athlete_id]

    def new_athlete_id(self) -> int:
        """Reserve an id no athlete has, so two open consent pages never propose the same one."""
        while self.next_id in self.athletes:
            self.next_id += 1
        self.next_id += 1
        return self.next_id - 1

    def connected(self) -> int:
        """How many athletes have a live grant (what Strava's athlete capacity counts)."""
        return sum(1 for athlete in self.athletes.values() if not athlete.revoked)

    def issue_code(self, athlete_id: int, scope: str, expires_at: int) -> str:
        code = Code(secrets.token_hex(20), athlete_id, scope, expires_at)
        self.codes[code.value] = code
        return code.value

    def mint_access(self, athlete: Athlete, expires_at: int) -> AccessToken:
        token = AccessToken(secrets.token_hex(20), athlete.id, expires_at)
        self.access[token.value] = token
        athlete.access_tokens.append(token)
        return token

    def rotate_refresh(self, athlete: Athlete, death: Death) -> None:
        old = athlete.refresh
        if old.alive:
            old.alive, old.died = False, death
        self._mint_refresh(athlete)

    def connect(self, athlete_id: int, scope: str, expires_at: int, now: int) -> Athlete:
        """A new grant (a first connect, or a reconnect that kills the previous refresh token)."""
        athlete = self.athletes.get(athlete_id)
        if athlete is None:
            athlete = self.athletes[athlete_id] = Athlete(athlete_id, scope, now)
            self._mint_refresh(athlete)
        else:
            athlete.scope, athlete.revoked = scope, False
            self.rotate_refresh(athlete, "reconnected")
        self.mint_access(athlete, expires_at)
        return athlete

    def revoke(self, athlete: Athlete) -> None:
        """Every token of the athlete dies."""
        athlete.revoked = True
        for access in athlete.access_tokens:
            access.alive = False
        for refresh in athlete.issued:
            if refresh.alive:
                refresh.alive, refresh.died = False, "revoked"

    def kill_access(self, athlete: Athlete) -> None:
        """Invalidate the athlete's access tokens early; the refresh token stays good."""
        for access in athlete.access_tokens:
            access.alive = False

    def _mint_refresh(self, athlete: Athlete) -> None:
        token = RefreshToken(secrets.token_hex(20), athlete.id, len(athlete.issued))
        self.refresh[token.value] = token
        athlete.issued.append(token)

    def dump(self) -> dict[str, Any]:
        return {
            "next_id": self.next_id,
            "athletes": [asdict(athlete) for athlete in self.athletes.values()],
            "codes": [asdict(code) for code in self.codes.values()],
        }

    def load(self, data: dict[str, Any]) -> None:
        self.clear()  # empty indexes, rebuilt from the athletes
        self.next_id = int(data["next_id"])
        for raw in data["athletes"]:
            issued = [RefreshToken(**token) for token in raw["issued"]]
            access = [AccessToken(**token) for token in raw["access_tokens"]]
            athlete = Athlete(raw["id"], raw["scope"], raw["created_at"], issued, access, raw["revoked"])
            self.athletes[athlete.id] = athlete
            self.refresh |= {token.value: token for token in issued}
            self.access |= {token.value: token for token in access}
        self.codes = {raw["value"]: Code(**raw) for raw in data["codes"]}
