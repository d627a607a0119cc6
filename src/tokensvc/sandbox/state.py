"""The sandbox's world: athletes' grants and activities, call counters, the refresh-token ledger, and the knobs.

Every mutation is synchronous and runs on the event loop thread (all routes are `async def`), so no two
mutations interleave and no lock is needed; the only awaits (hold, latency, hang, pushes) happen outside them.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, get_args

import httpx
from typing_extensions import TypedDict  # FastAPI (pydantic) rejects typing.TypedDict before Python 3.12

from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET

from . import errors
from .activities import (
    Activity,
    ActivityChanges,
    ActivityStore,
    ListQuery,
    NewActivity,
    activity_json,
    iso,
    require_read,
    require_write,
)
from .faults import Endpoint, FaultQueue, FaultSpec, Gate
from .grants import Athlete, Death, Grants
from .push import Push
from .ratelimit import DEFAULT_LIMITS, DEFAULT_READ_LIMITS, RateLimiter

logger = logging.getLogger(__name__)

ACCESS_TOKEN_LIFETIME: Final = 21600
CODE_LIFETIME: Final = 600
ONE_HOUR: Final = 3600
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
FIRST_UPLOAD_ID: Final = 20_000_000_000
# What `calls` counts: every endpoint but `token` (a /oauth/token call with no known grant).
CALL_KINDS: Final[tuple[Endpoint, ...]] = tuple(kind for kind in get_args(Endpoint) if kind != "token")


class SeededAthlete(TypedDict):
    athlete_id: int
    access_token: str
    refresh_token: str
    expires_at: int
    scope: str


class AthleteSnapshot(SeededAthlete):
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


class WorldOptions(TypedDict, total=False):
    """SandboxState's options, as `create_sandbox_app` takes them."""

    client_id: str
    client_secret: str
    clock: Callable[[], float]
    rotate: bool
    push_transport: httpx.AsyncBaseTransport | None
    rate_limits: tuple[int, int]
    read_rate_limits: tuple[int, int]
    athlete_capacity: int | None


class SandboxState:
    """One emulated Strava application and everything its athletes have granted it."""

    def __init__(
        self,
        *,
        client_id: str = SANDBOX_CLIENT_ID,
        client_secret: str = SANDBOX_CLIENT_SECRET,
        clock: Callable[[], float] = time.time,
        rotate: bool = True,
        push_transport: httpx.AsyncBaseTransport | None = None,
        rate_limits: tuple[int, int] = DEFAULT_LIMITS,
        read_rate_limits: tuple[int, int] = DEFAULT_READ_LIMITS,
        athlete_capacity: int | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.clock = clock
        self.rotate = rotate
        self.faults = FaultQueue()
        self.gate = Gate()
        self.rate = RateLimiter(rate_limits, read_rate_limits)
        self.push = Push(transport=push_transport)
        self.grants = Grants()
        self.activities = ActivityStore()
        self._initial_capacity = athlete_capacity
        self.reset()

    def now(self) -> int:
        return int(self.clock())

    def reset(self) -> None:
        """Forget everything (athletes, activities, counters, faults; knobs as at the start); free held requests."""
        self.calls: dict[Endpoint, int] = dict.fromkeys(CALL_KINDS, 0)
        self.calls_by_athlete: dict[int, Counter[str]] = {}
        self.refresh_by_athlete: dict[int, int] = {}
        self.violations: list[Violation] = []
        self.grants.clear()
        self.activities = ActivityStore()
        self.uploads = 0
        self.next_grant_expires_in: int | None = None
        self.next_grant_scope: frozenset[str] | None = None
        self.access_lifetime = ACCESS_TOKEN_LIFETIME
        self.athlete_capacity = self._initial_capacity
        self.faults.clear()
        self.gate.release()
        self.rate.reset()
        self.push.reset()

    def count_call(self, endpoint: Endpoint) -> None:
        if endpoint in self.calls:
            self.calls[endpoint] += 1

    def count_for(self, athlete_id: int, endpoint: Endpoint) -> None:
        """Attribute a call to the athlete whose token (or code) it presented."""
        self.calls_by_athlete.setdefault(athlete_id, Counter())[endpoint] += 1

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
        return self.grants.new_athlete_id()

    def granted(self, offered: list[str], checked: set[str]) -> list[str]:
        """The scopes an approval grants: those offered and left checked, narrowed once by `/_control/next-grant`."""
        narrowed, self.next_grant_scope = self.next_grant_scope, None
        return [s for s in offered if s in checked and (narrowed is None or s in narrowed)]

    def issue_code(self, athlete_id: int, scope: str) -> str:
        return self.grants.issue_code(athlete_id, scope, self.now() + CODE_LIFETIME)

    def exchange(self, code: str | None) -> TokenResponse:
        """Trade a single-use code for a fresh pair; reconnecting an athlete kills its old refresh token.

        Raises StravaError: the code is unknown, used or expired, or the app is at its athlete capacity.
        """
        record = self.grants.codes.get(code or "")
        if record is None or record.used:
            raise errors.invalid_code()
        now = self.now()
        if now >= record.expires_at:
            raise errors.expired_code()
        record.used = True
        self.count_for(record.athlete_id, "exchange")
        known = self.grants.athletes.get(record.athlete_id)
        already_connected = known is not None and not known.revoked
        if not already_connected and self.athlete_capacity is not None:
            if self.grants.connected() >= self.athlete_capacity:
                raise errors.capacity_exceeded()
        lifetime = ACCESS_TOKEN_LIFETIME if self.next_grant_expires_in is None else self.next_grant_expires_in
        self.next_grant_expires_in = None
        athlete = self.grants.connect(record.athlete_id, record.scope, now + lifetime, now)
        logger.info("code exchanged for athlete %d", athlete.id)
        return self._token_response(athlete, now, with_athlete=True)

    def refresh(self, refresh_token: str | None) -> TokenResponse:
        """Strava's refresh: the one-hour rule for the access token, then rotation of the refresh token."""
        record = self.grants.refresh.get(refresh_token or "")
        if record is None:
            raise errors.invalid_refresh_token()
        now = self.now()
        record.sent += 1
        self.refresh_by_athlete[record.athlete_id] = self.refresh_by_athlete.get(record.athlete_id, 0) + 1
        self.count_for(record.athlete_id, "refresh")
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
        athlete = self.grants.athletes[record.athlete_id]
        if not (athlete.access.alive and athlete.access.expires_at - now > ONE_HOUR):
            self.grants.mint_access(athlete, now + self.access_lifetime)
        if self.rotate:
            self.grants.rotate_refresh(athlete, "rotated")
        logger.info("refresh accepted for athlete %d (token #%d)", athlete.id, record.index)
        return self._token_response(athlete, now, with_athlete=False)

    def deauthorize(self, access_token: str | None) -> dict[str, str]:
        """Kill every token the application holds for the athlete owning this access token."""
        athlete = self.grants.by_access(access_token, self.now())
        self.count_for(athlete.id, "deauthorize")
        self.grants.revoke(athlete)
        logger.info("athlete %d deauthorized", athlete.id)
        return {"access_token": access_token or ""}

    def revoke_token(self, token: str) -> None:
        """`POST /oauth/revoke`: a live access or refresh token revokes its athlete's whole grant, as deauthorize
        does; any other token (already dead, never issued) changes nothing (the caller still gets a 200)."""
        now = self.now()
        access, refresh = self.grants.access.get(token), self.grants.refresh.get(token)
        owner = access.athlete_id if access is not None else refresh.athlete_id if refresh is not None else None
        if owner is not None:
            self.count_for(owner, "revoke")
        live = (access is not None and access.alive and access.expires_at > now) or (
            refresh is not None and refresh.alive
        )
        if live and owner is not None:
            self.grants.revoke(self.grants.athletes[owner])
            logger.info("athlete %d revoked", owner)

    # --- the API -----------------------------------------------------------------------------------------

    def api_athlete(self, access_token: str | None, endpoint: Endpoint) -> Athlete:
        """The athlete a live access token belongs to, with the call counted for it. Raises StravaError 401."""
        athlete = self.grants.by_access(access_token, self.now())
        self.count_for(athlete.id, endpoint)
        return athlete

    def athlete_profile(self, access_token: str | None) -> dict[str, Any]:
        return self._profile(self.api_athlete(access_token, "athlete"), detailed=True)

    def list_activities(self, access_token: str | None, query: ListQuery) -> list[dict[str, Any]]:
        athlete = self.api_athlete(access_token, "activities")
        require_read(athlete.scopes)
        return [activity_json(a, detailed=False) for a in self.activities.page(athlete.id, athlete.scopes, query)]

    def readable_activity(self, access_token: str | None, activity_id: int, endpoint: Endpoint) -> Activity:
        """The caller's own activity, if its grant may read it. Raises StravaError 401 or 404."""
        athlete = self.api_athlete(access_token, endpoint)
        require_read(athlete.scopes)
        activity = self.activities.owned(athlete.id, activity_id)
        require_read(athlete.scopes, activity)
        return activity

    def receive_upload(self, access_token: str | None, size: int) -> dict[str, Any]:
        """`POST /uploads`: needs `activity:write`. The file is only counted (`bytes_received`, the sandbox's own
        field), never parsed, and no activity is made of it: the answer is Strava's status of a queued upload."""
        athlete = self.api_athlete(access_token, "upload")
        require_write(athlete.scopes)
        self.uploads += 1
        upload_id = FIRST_UPLOAD_ID + self.uploads
        return {
            "id": upload_id,
            "id_str": str(upload_id),
            "external_id": None,
            "error": None,
            "status": "Your activity is still being processed.",
            "activity_id": None,
            "bytes_received": size,
        }

    def update_activity(self, access_token: str | None, activity_id: int, changes: ActivityChanges) -> dict[str, Any]:
        """`PUT /activities/{id}`: needs `activity:write`; pushes an update event when title or type changed."""
        athlete = self.api_athlete(access_token, "activity_update")
        require_write(athlete.scopes)
        activity = self.activities.owned(athlete.id, activity_id)
        require_read(athlete.scopes, activity)
        was_private = activity.private
        updates = self.activities.update(activity, changes)
        if updates:
            self._push_activity(activity, "update", updates, copies=1, was_private=was_private)
        return activity_json(activity, detailed=True)

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
        now = self.now()
        return _seeded(self.grants.connect(athlete_id, scope, now + expires_in, now))

    def set_next_grant(self, expires_in: int | None = None, scope: frozenset[str] | None = None) -> None:
        """Arm one-shot knobs: the next successful code exchange issues an access token living `expires_in`
        seconds (lets a browser test connect a user already inside tokensvc's refresh buffer); the next approval on
        the consent page grants at most `scope`, as an athlete unticking boxes would."""
        if expires_in is not None:
            self.next_grant_expires_in = expires_in
        if scope is not None:
            self.next_grant_scope = scope

    def set_access_lifetime(self, expires_in: int) -> None:
        """Every access token a refresh mints from now on lives `expires_in` seconds (Strava: always 6 h).

        Below one hour, every refresh mints a new access token, so a soak sees users come due again within minutes.
        """
        self.access_lifetime = expires_in

    def snapshot(self, athlete_id: int) -> AthleteSnapshot:
        """The athlete's newest pair in clear text, plus what tests need to judge it."""
        athlete = self.grants.athlete(athlete_id)
        return {**_seeded(athlete), "revoked": athlete.revoked, "refresh_tokens_issued": len(athlete.issued)}

    def expire(self, athlete_id: int, expires_at: int) -> AthleteSnapshot:
        """Move the current access token's expiry (into the past, or inside the one-hour window)."""
        self.grants.athlete(athlete_id).access.expires_at = expires_at
        return self.snapshot(athlete_id)

    def invalidate_access(self, athlete_id: int) -> AthleteSnapshot:
        """Strava invalidates the athlete's access tokens early: API calls with them get 401, and the next refresh
        mints a new one however long the old one had left. The refresh token is untouched."""
        self.grants.kill_access(self.grants.athlete(athlete_id))
        return self.snapshot(athlete_id)

    def rotate_athlete(self, athlete_id: int) -> AthleteSnapshot:
        """Act as another client refreshing now: a new access and refresh token; the old refresh token dies.

        Raises ValueError for a revoked athlete, whom no client could refresh.
        """
        athlete = self.grants.athlete(athlete_id)
        if athlete.revoked:
            raise ValueError(f"athlete {athlete_id} has revoked access")
        self.grants.mint_access(athlete, self.now() + self.access_lifetime)
        self.grants.rotate_refresh(athlete, "rotated")
        return self.snapshot(athlete_id)

    def revoke(self, athlete_id: int) -> AthleteSnapshot:
        """Act as the athlete revoking access on strava.com: every token dies."""
        self.grants.revoke(self.grants.athlete(athlete_id))
        return self.snapshot(athlete_id)

    def upload_activity(self, athlete_id: int, spec: NewActivity, *, copies: int = 1) -> dict[str, Any]:
        """The athlete uploads an activity: it exists at once, and a `create` event goes to the subscription."""
        athlete = self.grants.athlete(athlete_id)
        activity = self.activities.create(athlete.id, spec, self.now())
        self._push_activity(activity, "create", {}, copies=copies, was_private=activity.private)
        return activity_json(activity, detailed=True)

    def change_activity(self, activity_id: int, changes: ActivityChanges, *, copies: int = 1) -> dict[str, Any]:
        """The athlete edits an activity on strava.com (title, type, privacy …): an `update` event follows."""
        activity = self.activities.get(activity_id)
        was_private = activity.private
        updates = self.activities.update(activity, changes)
        self._push_activity(activity, "update", updates, copies=copies, was_private=was_private)
        return activity_json(activity, detailed=True)

    def delete_activity(self, activity_id: int, *, copies: int = 1) -> dict[str, Any]:
        """The athlete deletes an activity: it is gone, and a `delete` event follows."""
        activity = self.activities.delete(activity_id)
        self._push_activity(activity, "delete", {}, copies=copies, was_private=activity.private)
        return activity_json(activity, detailed=False)

    def set_capacity(self, athlete_capacity: int | None) -> None:
        """At most this many athletes connected (None: unlimited); a code exchange for one more gets 403."""
        self.athlete_capacity = athlete_capacity

    # --- what tests read ---------------------------------------------------------------------------------

    @property
    def ledger(self) -> dict[int, list[LedgerEntry]]:
        """Every refresh token ever issued, per athlete, oldest first (the last one is the newest)."""
        return {
            athlete.id: [LedgerEntry(r.index, r.sha256, r.sent, r.accepted, r.alive) for r in athlete.issued]
            for athlete in self.grants.athletes.values()
        }

    def ledger_json(self) -> dict[str, list[dict[str, Any]]]:
        return {str(aid): [entry.as_json() for entry in entries] for aid, entries in self.ledger.items()}

    def issued_tokens(self) -> list[str]:
        """Every access and refresh token minted since the last reset, for canary scans (nothing may print them)."""
        return [*self.grants.access, *self.grants.refresh]

    def stats(self) -> dict[str, Any]:
        """Counters for assertions; `calls` counts requests that reached a handler, failed or faulted ones too.

        `authorize` counts consent page views; /oauth/token calls without a known grant_type count nowhere.
        `refresh_by_athlete` counts refresh-grant requests whose token the sandbox recognised, accepted or not.
        `calls_by_athlete` counts, per athlete and endpoint, calls whose token (or code) named that athlete.
        """
        return {
            "calls": dict(self.calls),
            "refresh_by_athlete": {str(aid): n for aid, n in self.refresh_by_athlete.items()},
            "calls_by_athlete": {str(aid): dict(counts) for aid, counts in self.calls_by_athlete.items()},
            "ledger_violations": list(self.violations),
        }

    # --- persistence -------------------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """The world that outlives a restart (grants, activities, subscription, windows, knobs), as JSON data.

        Counters, faults, holds and deliveries are per process: they start empty again."""
        return {
            "grants": self.grants.dump(),
            "activities": self.activities.dump(),
            "subscription": self.push.dump(),
            "rate": self.rate.dump(),
            "athlete_capacity": self.athlete_capacity,
            "access_lifetime": self.access_lifetime,
        }

    def load(self, data: dict[str, Any]) -> None:
        """Restore what `dump` wrote. Raises KeyError, TypeError or ValueError for data that is not its shape."""
        self.grants.load(data["grants"])
        self.activities.load(data["activities"])
        self.push.load(data["subscription"])
        self.rate.load(data["rate"])
        self.athlete_capacity = data["athlete_capacity"]
        self.access_lifetime = int(data["access_lifetime"])

    # --- internals ---------------------------------------------------------------------------------------

    def _push_activity(
        self, activity: Activity, aspect: str, updates: dict[str, str], *, copies: int, was_private: bool
    ) -> None:
        """Send the event as Strava would: only to an app whose grant could read the activity (before or after the
        change), never for an athlete who revoked access, `copies` times (Strava's duplicates)."""
        athlete = self.grants.athletes.get(activity.athlete_id)
        if athlete is None or athlete.revoked or not athlete.scopes & {"activity:read", "activity:read_all"}:
            return
        if was_private and activity.private and "activity:read_all" not in athlete.scopes:
            return
        event = self.push.activity_event(activity.id, athlete.id, aspect, updates, self.now())
        if event is not None:
            self.push.send_in_background(event, copies=copies)

    def _token_response(self, athlete: Athlete, now: int, *, with_athlete: bool) -> TokenResponse:
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

    def _profile(self, athlete: Athlete, *, detailed: bool) -> dict[str, Any]:
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


def _seeded(athlete: Athlete) -> SeededAthlete:
    """The athlete's newest pair in clear text."""
    return {
        "athlete_id": athlete.id,
        "access_token": athlete.access.value,
        "refresh_token": athlete.refresh.value,
        "expires_at": athlete.access.expires_at,
        "scope": athlete.scope,
    }
