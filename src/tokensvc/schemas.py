"""Public request and response shapes (CONTRACT.md). Only `AccessToken` carries token material."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, StringConstraints, WithJsonSchema

from tokensvc.service.status import Status

USER_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
USER_ID_RE = re.compile(USER_ID_PATTERN)
# Strava tokens are 40 hex characters; anything far longer is not a token and would only bloat the row.
TokenText = Annotated[str, StringConstraints(min_length=1, max_length=512, strip_whitespace=True)]
Scope = Annotated[str, StringConstraints(pattern=r"^[a-z_]+(:[a-z_]+)?$", max_length=64)]


def _split_commas(value: object) -> object:
    return [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value


# Strava writes scopes comma-separated; a JSON list is accepted too (and the OpenAPI says both).
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
            ]
        }
    ),
]


class TokenStatus(BaseModel):
    """A user's token status; never any token material."""

    user_id: str
    status: Status
    expires_at: int | None = Field(description="Epoch seconds; null when missing")
    expires_in: int | None = Field(description="Seconds until expiry (negative once expired); null when missing")
    athlete_id: int | None
    scopes: list[str]
    last_refreshed_at: datetime | None
    needs_reauth: bool
    reauth_reason: str | None = Field(description="`refresh_token_invalid` or `deauthorized` when needs_reauth")


class TokenImport(BaseModel):
    """Tokens moved in from an existing app (or replaced)."""

    # Strict: `true` is not athlete 1, nor "17" a time (lax coercion stored such values; found by Schemathesis).
    model_config = ConfigDict(extra="forbid", strict=True)

    access_token: TokenText
    refresh_token: TokenText
    expires_at: int = Field(ge=0, le=2**53, description="Epoch seconds, Strava's convention")
    athlete_id: int | None = Field(default=None, ge=1, le=2**63 - 1)
    scopes: Scopes | None = None


class AccessToken(BaseModel):
    user_id: str
    access_token: str
    token_type: str = "Bearer"
    expires_at: int
    expires_in: int
    athlete_id: int | None
    scopes: list[str]


class RefreshResult(BaseModel):
    success: bool = True
    refreshed: bool
    message: str
    token_status: TokenStatus


class TokenPage(BaseModel):
    items: list[TokenStatus]
    next_cursor: str | None


class Health(BaseModel):
    status: str = "ok"


class Problem(BaseModel):
    """RFC 9457 problem details, with the contract's `code` (and `needs_reauth`/`authorize_url` on 409)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


class ConnectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    redirect_to: str | None = Field(
        default=None, max_length=2048, description="Where to send the browser afterwards; must be allow-listed"
    )
    scopes: Scopes | None = Field(default=None, description="Default TOKENSVC_STRAVA_SCOPES")
    approval_prompt: Literal["auto", "force"] = "auto"


class ConnectResponse(BaseModel):
    authorize_url: str
    state_expires_at: int = Field(description="Epoch seconds; the state is single-use and lives ten minutes")


class SessionResponse(BaseModel):
    session_token: str
    expires_at: int
    cookie_name: str


class BrowserFailure(BaseModel):
    """What the dashboard gets when it cannot have fresh tokens (the shape of the app it replaces)."""

    success: bool = False
    error: str
    needs_reauth: bool
    token_status: TokenStatus | None
    authorize_url: str | None = None


# -- the audit trail and /v1/stats -----------------------------------------------------------------------------


class TokenEventOut(BaseModel):
    """One audit row: a refresh attempt at Strava or a change of the user's state. Never any token material."""

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
    items: list[TokenEventOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last")


class UserCounts(BaseModel):
    total: int = Field(description="Stored users (users with status `missing` have no row and are not counted)")
    valid: int
    expiring_soon: int
    expired: int
    needs_reauth: int


class RefreshCounts(BaseModel):
    success: int
    failure: int = Field(description="Attempts that failed for a transient reason (5xx, timeout, 429, …)")
    reauth_required: int = Field(description="Attempts where Strava rejected the refresh token")


class RefreshWindows(BaseModel):
    last_24h: RefreshCounts


class Stats(BaseModel):
    """DB-wide counts: every replica answers the same."""

    users: UserCounts
    refresh: RefreshWindows


_BIGINT = 2**63 - 1


class StravaEvent(BaseModel):
    """A Strava push event (STRAVA.md). Unknown object and aspect types are well-formed too: they are
    acknowledged and ignored, so that Strava never retries an event tokensvc has no use for."""

    model_config = ConfigDict(extra="ignore")

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
    received: bool = True


class HubChallenge(BaseModel):
    """The answer to Strava's subscription check: the challenge, echoed."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    challenge: str = Field(alias="hub.challenge")
