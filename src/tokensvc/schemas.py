"""Public request and response shapes (CONTRACT.md). Only `AccessToken` carries token material."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from tokensvc.status import Status

# 1..64 of [A-Za-z0-9._-], but not "." or ".." (v1.1): written without look-ahead so every regex engine (pydantic's,
# the generated clients') reads it the same way.
USER_ID_PATTERN = (
    r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"
)
PROBLEM_TYPE = "https://tokensvc.dev/problems/"
USER_ID_RE = re.compile(USER_ID_PATTERN)
MAX_BIGINT = 2**63 - 1  # the largest value a BIGINT column (and SQLite's INTEGER) holds
# Strava tokens are 40 hex characters; anything far longer is not a token and would only bloat the row.
TokenText = Annotated[str, StringConstraints(min_length=1, max_length=512, strip_whitespace=True)]
Scope = Annotated[str, StringConstraints(pattern=r"^[a-z_]+(:[a-z_]+)?$", max_length=64)]


def _split_commas(value: object) -> object:
    return [s for s in re.split(r"[,\s]+", value) if s] if isinstance(value, str) else value


# Strava writes scopes comma-separated (OAuth libraries often space-separated); a JSON list is accepted too, and
# the OpenAPI says both.
Scopes = Annotated[
    list[Scope],
    BeforeValidator(_split_commas),
    Field(max_length=16),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "array",
                    "items": {"type": "string", "pattern": r"^[a-z_]+(:[a-z_]+)?$", "maxLength": 64},
                    "maxItems": 16,
                },
                {"type": "string", "description": "comma-separated, as Strava writes them"},
            ],
            "examples": ["read,activity:read_all"],
        }
    ),
]

# Examples shared by the schemas below and the OpenAPI's answers: one user, one athlete, one moment.
EXAMPLE_USER_ID = "42"
EXAMPLE_ATHLETE_ID = 134815
EXAMPLE_EXPIRES_AT = 1767225600
EXAMPLE_ACCESS_TOKEN = "8f3c2a9e1b7d4c6f0a5e9b2d8c1f7a3e6b4d0c92"
EXAMPLE_REFRESH_TOKEN = "2d7e9f1a4c6b8e0d3f5a7c9e1b3d5f7a9c0e2b46"
EXAMPLE_TOKEN_STATUS: dict[str, Any] = {
    "user_id": EXAMPLE_USER_ID,
    "status": "valid",
    "expires_at": EXAMPLE_EXPIRES_AT,
    "expires_in": 20511,
    "athlete_id": EXAMPLE_ATHLETE_ID,
    "scopes": ["read", "activity:read_all"],
    "last_refreshed_at": "2026-11-27T10:00:00Z",
    "needs_reauth": False,
    "reauth_reason": None,
}


def _absent_when_unused(schema: dict[str, Any]) -> None:
    """For a member that is left out, never null, where it does not apply: no `default: null` in its schema."""
    schema.pop("default", None)


def _member(description: str, *, examples: list[str] | None = None) -> Any:
    """A problem member that is left out (never null) where it does not apply."""
    return Field(default=None, json_schema_extra=_absent_when_unused, description=description, examples=examples)


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    """A model's JSON schema examples: what Swagger shows and generated clients document instead of `"string"`."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class TokenStatus(BaseModel):
    """A user's token status; never any token material."""

    model_config = _examples(
        EXAMPLE_TOKEN_STATUS,
        EXAMPLE_TOKEN_STATUS
        | {
            "status": "needs_reauth",
            "expires_in": -3600,
            "needs_reauth": True,
            "reauth_reason": "refresh_token_invalid",
        },
    )

    user_id: str
    status: Status
    expires_at: int | None = Field(description="Epoch seconds; null when missing")
    expires_in: int | None = Field(description="Seconds until expiry (negative once expired); null when missing")
    athlete_id: int | None
    scopes: list[str]
    last_refreshed_at: datetime | None
    needs_reauth: bool
    reauth_reason: str | None = Field(description="`refresh_token_invalid` or `deauthorized` when needs_reauth")


class StravaAthleteRef(BaseModel):
    """The `athlete` object of Strava's code-exchange answer: only its `id` is kept."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: int = Field(ge=1, le=2**63 - 1)


class TokenImport(BaseModel):
    """Tokens moved in from an existing app (or replaced). Strava's own token answer (or the sandbox's) may be
    pasted as it is: its `scope`, `athlete`, `token_type` and `expires_in` are understood."""

    # Strict: `true` is not athlete 1, nor "17" a time (lax coercion stored such values; found by Schemathesis).
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "access_token": EXAMPLE_ACCESS_TOKEN,
                    "refresh_token": EXAMPLE_REFRESH_TOKEN,
                    "expires_at": EXAMPLE_EXPIRES_AT,
                    "athlete_id": EXAMPLE_ATHLETE_ID,
                    "scopes": ["read", "activity:read_all"],
                },
                {
                    "token_type": "Bearer",
                    "access_token": EXAMPLE_ACCESS_TOKEN,
                    "refresh_token": EXAMPLE_REFRESH_TOKEN,
                    "expires_at": EXAMPLE_EXPIRES_AT,
                    "expires_in": 21600,
                    "athlete": {"id": EXAMPLE_ATHLETE_ID, "username": "marianne_t"},
                    "scope": "read,activity:read_all",
                },
            ]
        },
    )

    access_token: TokenText
    refresh_token: TokenText
    expires_at: int = Field(ge=0, le=2**53, description="Epoch seconds, Strava's convention")
    athlete_id: int | None = Field(default=None, ge=1, le=2**63 - 1)
    scopes: Scopes | None = None
    scope: Scopes | None = Field(
        default=None, description="Strava's name for `scopes` (as its redirect writes it); give one of the two"
    )
    athlete: StravaAthleteRef | None = Field(
        default=None, description="Strava's exchange answer names the athlete so; its `id` is the `athlete_id`"
    )
    token_type: Literal["Bearer"] | None = Field(default=None, description="Strava's; always `Bearer`")
    expires_in: int | None = Field(
        default=None, ge=-(2**31), le=2**31, description="Strava's; ignored (`expires_at` is the truth)"
    )

    @model_validator(mode="after")
    def _strava_names(self) -> Self:
        """Strava's names fill in ours, so the service reads only `scopes` and `athlete_id`."""
        if self.scope is not None:
            if self.scopes is not None:
                raise ValueError("give `scopes` or Strava's `scope`, not both")
            self.scopes = self.scope
        if self.athlete is not None:
            if self.athlete_id is not None and self.athlete_id != self.athlete.id:
                raise ValueError("`athlete_id` and `athlete.id` name different athletes")
            self.athlete_id = self.athlete.id
        return self


class AccessToken(BaseModel):
    model_config = _examples(
        {
            "user_id": EXAMPLE_USER_ID,
            "access_token": EXAMPLE_ACCESS_TOKEN,
            "token_type": "Bearer",
            "expires_at": EXAMPLE_EXPIRES_AT,
            "expires_in": 20511,
            "athlete_id": EXAMPLE_ATHLETE_ID,
            "scopes": ["read", "activity:read_all"],
        }
    )

    user_id: str
    access_token: str
    token_type: str = "Bearer"
    expires_at: int
    expires_in: int
    athlete_id: int | None
    scopes: list[str]


class RefreshResult(BaseModel):
    model_config = _examples(
        {
            "success": True,
            "refreshed": True,
            "message": "Tokens refreshed successfully",
            "token_status": EXAMPLE_TOKEN_STATUS | {"expires_in": 21599},
        },
        {
            "success": True,
            "refreshed": False,
            "message": "Tokens are still valid - no refresh needed",
            "token_status": EXAMPLE_TOKEN_STATUS,
        },
    )

    success: bool = True
    refreshed: bool
    message: str
    token_status: TokenStatus


class TokenPage(BaseModel):
    model_config = _examples(
        {
            "items": [EXAMPLE_TOKEN_STATUS | {"status": "expiring_soon", "expires_in": 1210}],
            "next_cursor": "MTc2NzIyNTYwMDo0Mg",
        }
    )

    items: list[TokenStatus]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last")


class Health(BaseModel):
    model_config = _examples({"status": "ok"})

    status: str = "ok"


class ProblemCode(StrEnum):
    """The `code` values the service sends today. Clients must accept others too: the set grows (see `Problem`)."""

    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INVALID_STATE = "invalid_state"
    INVALID_CODE = "invalid_code"
    TOKENS_MISSING = "tokens_missing"
    REAUTH_REQUIRED = "reauth_required"
    STALE_IMPORT = "stale_import"
    ATHLETE_IN_USE = "athlete_in_use"
    ATHLETE_CAPACITY = "athlete_capacity"
    CONNECT_MISMATCH = "connect_mismatch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    VALIDATION_ERROR = "validation_error"
    TOO_MANY_REQUESTS = "too_many_requests"
    STRAVA_RATE_LIMITED = "strava_rate_limited"
    INTERNAL_ERROR = "internal_error"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    DATABASE_UNAVAILABLE = "database_unavailable"
    TOKEN_UNREADABLE = "token_unreadable"
    HTTP_ERROR = "http_error"
    HEADERS_TOO_LARGE = "headers_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    OVERLOADED = "overloaded"


class ValidationIssue(BaseModel):
    """One thing wrong with a request: where (`loc`, e.g. `["body", "expires_at"]`) and why. Never the input."""

    loc: list[str] = Field(examples=[["body", "expires_at"]])
    msg: str = Field(examples=["Input should be a valid integer"])
    type: str = Field(examples=["int_type"])


class Problem(BaseModel):
    """RFC 9457 problem details (`application/problem+json`) with the contract's `code`. Members beyond the five
    standard ones appear only where they apply; unknown members may be added, and must be ignored."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "https://tokensvc.dev/problems/reauth_required",
                    "title": "Strava re-authorization required",
                    "status": 409,
                    "detail": "Strava rejected the stored refresh token; the user must reconnect with Strava.",
                    "code": "reauth_required",
                    "needs_reauth": True,
                    "authorize_url": "https://www.strava.com/oauth/authorize?client_id=12345&response_type=code&"
                    "redirect_uri=https%3A%2F%2Ftokens.example%2Fv1%2Foauth%2Fstrava%2Fcallback&"
                    "scope=read%2Cactivity%3Aread_all&approval_prompt=force&state=eyJ1Ijoi...",
                    "reauth_reason": "refresh_token_invalid",
                }
            ]
        },
    )

    type: str = Field(description="A URI naming the kind of problem", examples=[PROBLEM_TYPE + "tokens_missing"])
    title: str = Field(examples=["No Strava tokens stored"])
    status: int = Field(description="The HTTP status, repeated", examples=[409])
    detail: str = Field(
        description="What happened, for a person", examples=["No Strava tokens are stored for this user"]
    )
    code: ProblemCode | str = Field(
        description="What happened, for a program. An open set: the values of `ProblemCode` are today's, and a "
        "client must accept (and treat by status) a code it does not know."
    )
    needs_reauth: bool | SkipJsonSchema[None] = _member(
        "`tokens_missing`, `reauth_required`: the user must connect with Strava (again)"
    )
    authorize_url: str | None = Field(
        default=None,
        description="With `needs_reauth`: where to send the user to connect; null when none can be made",
    )
    reauth_reason: str | SkipJsonSchema[None] = _member(
        "`reauth_required`: `refresh_token_invalid` or `deauthorized` (more may come)",
        examples=["refresh_token_invalid"],
    )
    errors: list[ValidationIssue] | SkipJsonSchema[None] = _member(
        "`validation_error`: each thing wrong with the request"
    )
    retry_after: int | SkipJsonSchema[None] = _member(
        "503 and 429: seconds to wait before trying again, as in `Retry-After`"
    )
    missing_scope: str | SkipJsonSchema[None] = _member(
        "`insufficient_scope`: the Strava scope the user must grant", examples=["activity:read_all"]
    )


class ConnectRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "redirect_to": "https://app.example/settings/strava",
                    "scopes": ["read", "activity:read_all"],
                    "approval_prompt": "auto",
                }
            ]
        },
    )

    redirect_to: str | None = Field(
        default=None, max_length=2048, description="Where to send the browser afterwards; must be allow-listed"
    )
    scopes: Scopes | None = Field(default=None, description="Default TOKENSVC_STRAVA_SCOPES")
    approval_prompt: Literal["auto", "force"] = "auto"


class ConnectCompleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"connect_id": "cn_..."}]})

    connect_id: str = Field(min_length=1, max_length=128, description="From the redirect's `connect_id` parameter")
    replace: bool = Field(default=False, description="Move the athlete from the user who holds it (v1.1)")


class ConnectCompleteResponse(BaseModel):
    model_config = _examples(
        {
            "token_status": EXAMPLE_TOKEN_STATUS,
            "session_token": "eyJ1IjoiMiJ9.aSb3xA.Yk6lZ...",
            "session_expires_at": 1767225600,
        }
    )

    token_status: TokenStatus
    session_token: str
    session_expires_at: int


class ConnectResponse(BaseModel):
    model_config = _examples(
        {
            "authorize_url": "https://www.strava.com/oauth/authorize?client_id=12345&response_type=code&"
            "redirect_uri=https%3A%2F%2Ftokens.example%2Fv1%2Foauth%2Fstrava%2Fcallback&"
            "scope=read%2Cactivity%3Aread_all&approval_prompt=auto&state=eyJ1Ijoi...",
            "state_expires_at": 1767204000,
        }
    )

    authorize_url: str
    state_expires_at: int = Field(description="Epoch seconds; the state is single-use and lives ten minutes")


class SessionResponse(BaseModel):
    model_config = _examples(
        {
            "session_token": "eyJ1IjoiNDIiLCJlIjoxNzY3ODA4MDAwfQ.kX3v...",
            "expires_at": 1767808000,
            "cookie_name": "tokensvc_session",
        }
    )

    session_token: str
    expires_at: int
    cookie_name: str


class BrowserFailure(BaseModel):
    """What the dashboard gets when it cannot have fresh tokens (the shape of the app it replaces)."""

    model_config = _examples(
        {
            "success": False,
            "error": "Failed to refresh Strava tokens. Please re-authenticate with Strava.",
            "needs_reauth": True,
            "token_status": EXAMPLE_TOKEN_STATUS
            | {"status": "needs_reauth", "needs_reauth": True, "reauth_reason": "refresh_token_invalid"},
            "authorize_url": "https://tokens.example/v1/oauth/strava/authorize",
        }
    )

    success: bool = False
    error: str
    needs_reauth: bool
    token_status: TokenStatus | None
    authorize_url: str | None = None


# -- the audit trail and /v1/stats -----------------------------------------------------------------------------

_EXAMPLE_EVENT: dict[str, Any] = {
    "id": 1042,
    "occurred_at": "2026-11-27T10:00:00Z",
    "kind": "refresh",
    "trigger": "sweep",
    "outcome": "succeeded",
    "strava_status": 200,
    "duration_ms": 183,
    "detail": None,
}


class TokenEventOut(BaseModel):
    """One audit row: a refresh attempt at Strava or a change of the user's state. Never any token material."""

    model_config = _examples(_EXAMPLE_EVENT)

    id: int
    occurred_at: datetime
    kind: str = Field(description="refresh, connected, imported, needs_reauth, recovered, revoked, …")
    trigger: str | None = Field(description="What started a refresh: api, access_token, background, sweep, browser")
    outcome: str | None = Field(
        description="For refreshes: succeeded, rejected, transient, rate_limited, answer_lost, misconfigured, "
        "unreadable"
    )
    strava_status: int | None = Field(description="Strava's HTTP status, when it answered")
    duration_ms: int | None
    detail: str | None


class EventPage(BaseModel):
    model_config = _examples({"items": [_EXAMPLE_EVENT], "next_cursor": "ZToxMDQx"})

    items: list[TokenEventOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last")


class UserCounts(BaseModel):
    total: int = Field(description="Stored users (users with status `missing` have no row and are not counted)")
    valid: int
    expiring_soon: int
    expired: int
    needs_reauth: int
    active: int | None = Field(
        default=None,
        description="v1.1: users who can be refreshed and whose token something asked for within "
        "TOKENSVC_SWEEP_ACTIVE_DAYS (all of them when it is 0): the ones the sweeper keeps fresh",
    )
    idle: int | None = Field(
        default=None,
        description="v1.1: the other users who can be refreshed: refreshed on demand, plus a keep-alive refresh",
    )


class RefreshCounts(BaseModel):
    success: int
    failure: int = Field(description="Attempts that failed for a transient reason (5xx, timeout, 429, …)")
    reauth_required: int = Field(description="Attempts where Strava rejected the refresh token")


class RefreshWindows(BaseModel):
    last_24h: RefreshCounts


class AthleteCounts(BaseModel):
    """v1.1: connected athletes against the Strava app's capacity (Strava refuses connects beyond it)."""

    connected: int = Field(
        description="Users holding a live Strava connection (stored tokens, not `needs_reauth`): one athlete each"
    )
    capacity: int | None = Field(
        description="TOKENSVC_STRAVA_ATHLETE_CAPACITY, the connected athletes the Strava app may have; null: unset"
    )
    warning: bool = Field(
        description="`connected` has reached 80 % of `capacity`: ask Strava for a higher tier before connects "
        "are refused (`strava=capacity`); false when no capacity is set"
    )


class StravaWindow(BaseModel):
    used: int = Field(description="Rate-counted calls spent in the window (ours, or Strava's count when larger)")
    limit: int = Field(description="The window's limit: the configured one, or Strava's when smaller")
    resets_at: datetime = Field(description="When the window resets (:00/:15/:30/:45, or midnight UTC)")


class StravaWindows(BaseModel):
    """v1.1: the app's shared Strava windows (every replica's calls): overall and read, 15 minutes and daily."""

    overall_15min: StravaWindow
    overall_daily: StravaWindow
    read_15min: StravaWindow
    read_daily: StravaWindow
    paused_until: datetime | None = Field(
        description="Until when Strava calls of some kind are held after Strava's 429; null when none are"
    )


class GatewayCounts(BaseModel):
    calls: int = Field(description="Gateway calls, whatever became of them")
    ok: int = Field(description="Strava answered 2xx or 304")
    reauth: int = Field(description="Refused: the user must reconnect (`reauth_required`, `tokens_missing`)")
    scope: int = Field(description="Refused: a scope the user has not granted (`insufficient_scope`)")
    rate_limited: int = Field(description="Refused: the app's window was spent, or Strava answered 429")
    strava_error: int = Field(description="Strava failed (5xx, timeout, unreachable) or the call could not be made")
    client_error: int = Field(description="Any other 4xx: the caller's request (e.g. Strava's 404)")
    success_rate: float | None = Field(
        ge=0, le=1, description="The sync success rate: `ok` / `calls`; null when there were no calls"
    )


class GatewayWindows(BaseModel):
    """v1.1: Strava API gateway calls by outcome (every replica's, at most a few seconds late)."""

    last_24h: GatewayCounts


class Stats(BaseModel):
    """DB-wide counts: every replica answers the same."""

    model_config = _examples(
        {
            "users": {
                "total": 1250,
                "valid": 1190,
                "expiring_soon": 41,
                "expired": 7,
                "needs_reauth": 12,
                "active": 1100,
                "idle": 138,
            },
            "refresh": {"last_24h": {"success": 4980, "failure": 3, "reauth_required": 2}},
            "athletes": {"connected": 1238, "capacity": 9999, "warning": False},
            "strava_windows": {
                "overall_15min": {"used": 31, "limit": 200, "resets_at": "2026-12-01T16:45:00Z"},
                "overall_daily": {"used": 812, "limit": 2000, "resets_at": "2026-12-02T00:00:00Z"},
                "read_15min": {"used": 27, "limit": 100, "resets_at": "2026-12-01T16:45:00Z"},
                "read_daily": {"used": 640, "limit": 1000, "resets_at": "2026-12-02T00:00:00Z"},
                "paused_until": None,
            },
            "gateway": {
                "last_24h": {
                    "calls": 700,
                    "ok": 680,
                    "reauth": 2,
                    "scope": 3,
                    "rate_limited": 10,
                    "strava_error": 1,
                    "client_error": 4,
                    "success_rate": 0.9714,
                }
            },
        }
    )

    users: UserCounts
    refresh: RefreshWindows
    athletes: AthleteCounts
    strava_windows: StravaWindows
    gateway: GatewayWindows


_BIGINT = 2**63 - 1


class StravaEvent(BaseModel):
    """A Strava push event (STRAVA.md). Unknown object and aspect types are well-formed too: they are
    acknowledged and ignored, so that Strava never retries an event tokensvc has no use for."""

    # Strict: Strava sends JSON integers; `true` is not object 1 (Schemathesis found it accepted).
    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "object_type": "athlete",
                    "object_id": EXAMPLE_ATHLETE_ID,
                    "aspect_type": "update",
                    "updates": {"authorized": "false"},
                    "owner_id": EXAMPLE_ATHLETE_ID,
                    "subscription_id": 120475,
                    "event_time": 1767204000,
                }
            ]
        },
    )

    object_type: str = Field(min_length=1, max_length=16)
    object_id: int = Field(ge=0, le=_BIGINT)
    aspect_type: str = Field(min_length=1, max_length=16)
    updates: dict[str, JsonValue] = Field(default_factory=dict)
    owner_id: int = Field(ge=1, le=_BIGINT)
    subscription_id: int = Field(ge=0, le=_BIGINT)
    event_time: int = Field(ge=0, le=_BIGINT)

    @property
    def is_deauthorization(self) -> bool:
        """`athlete` / `update` with `updates.authorized` "false" (a string at Strava; a boolean is taken too)."""
        authorized = self.updates.get("authorized")
        return (
            self.object_type == "athlete"
            and self.aspect_type == "update"
            and (authorized is False or (isinstance(authorized, str) and authorized.lower() == "false"))
        )


class WebhookAck(BaseModel):
    model_config = _examples({"received": True})

    received: bool = True


class HubChallenge(BaseModel):
    """The answer to Strava's subscription check: the challenge, echoed."""

    model_config = ConfigDict(
        populate_by_name=True,
        serialize_by_alias=True,
        json_schema_extra={"examples": [{"hub.challenge": "15f7d1a91c1f40f8a748fd134752feb3"}]},
    )

    challenge: str = Field(alias="hub.challenge")
