"""Connect with Strava: authorize URLs with a signed, single-use state, and the callback that stores the tokens.

The state is signed (itsdangerous), bound to the user and the `redirect_to`, and lives ten minutes. It is stateless
until used; the callback records its nonce before anything else, so a replay fails even while the state is young,
and a bad, reused or expired state never reaches Strava's code exchange.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.clock import Clock
from tokensvc.errors import (
    InvalidState,
    OAuthCodeRejected,
    ProviderMisconfigured,
    ProviderRateLimited,
    ProviderUnavailable,
    ValidationFailed,
)
from tokensvc.providers.strava import (
    ProviderConfigError,
    ProviderRejectedError,
    ProviderTransientError,
    StravaClient,
)
from tokensvc.schemas import USER_ID_RE, TokenStatus
from tokensvc.service.signing import SignedTokens
from tokensvc.service.tokens import TokenService
from tokensvc.store import oauth_states

log = structlog.get_logger(__name__)

STATE_TTL_SECONDS = 600
KNOWN_SCOPES = frozenset(
    {"read", "read_all", "profile:read_all", "profile:write", "activity:read", "activity:read_all", "activity:write"}
)
ApprovalPrompt = Literal["auto", "force"]


def redirect_allowed(target: str, allowlist: Sequence[str]) -> bool:
    """True when `target` is an absolute http(s) URL under one of the allow-listed prefixes.

    Compared as parsed URLs (scheme, host, port, then path at a segment boundary), never as strings, so that
    `//evil`, `https://evil`, `https://app.example.com.evil`, `https://app.example.com@evil`, backslashes and
    encoded slashes are all refused.
    """
    if not target or any(ch in target for ch in "\\\r\n\t ") or any(ord(ch) < 0x20 for ch in target):
        return False
    try:
        parts = urlsplit(target)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return False
    for prefix in allowlist:
        allowed = urlsplit(prefix)
        try:
            allowed_port = allowed.port
        except ValueError:
            continue
        if (parts.scheme, parts.hostname, port) != (allowed.scheme, allowed.hostname, allowed_port):
            continue
        base = allowed.path.rstrip("/")
        if not base or parts.path == base or parts.path.startswith(base + "/"):
            return True
    return False


def with_query(url: str, **params: str) -> str:
    """`url` with `params` added to its query string (existing parameters kept)."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def parse_scopes(raw: str | None) -> list[str]:
    """Strava's comma-separated scope list, keeping only scopes Strava defines."""
    return [s for s in (part.strip() for part in (raw or "").split(",")) if s in KNOWN_SCOPES]


@dataclass(frozen=True, slots=True)
class StateClaims:
    nonce: str
    user_id: str
    redirect_to: str | None
    expires_at: int


class ConnectLinks:
    """Builds Strava authorize URLs with a fresh signed state. Pure: no I/O, so 409s can carry one."""

    def __init__(
        self,
        *,
        strava: StravaClient,
        secret: str,
        redirect_uri: str,
        default_scopes: Sequence[str],
        allowlist: Sequence[str],
        clock: Clock,
    ) -> None:
        self._strava = strava
        self._states = SignedTokens(secret, purpose="oauth-state", max_age=STATE_TTL_SECONDS, clock=clock)
        self.redirect_uri = redirect_uri
        self.default_scopes = list(default_scopes)
        self.allowlist = list(allowlist)

    def authorize_url(
        self,
        user_id: str,
        *,
        redirect_to: str | None = None,
        scopes: Sequence[str] | None = None,
        approval_prompt: ApprovalPrompt = "auto",
    ) -> tuple[str, int]:
        """The URL to send the user to, and when its state expires. Raises ValidationFailed for a `redirect_to`
        outside TOKENSVC_REDIRECT_ALLOWLIST or an unknown scope."""
        if redirect_to is not None and not redirect_allowed(redirect_to, self.allowlist):
            raise ValidationFailed("`redirect_to` must start with one of TOKENSVC_REDIRECT_ALLOWLIST")
        asked = list(scopes) if scopes else self.default_scopes
        unknown = [s for s in asked if s not in KNOWN_SCOPES]
        if unknown:
            raise ValidationFailed(f"unknown Strava scopes: {', '.join(sorted(unknown))}")
        state, expires_at = self._states.dumps({"u": user_id, "r": redirect_to, "n": secrets.token_urlsafe(16)})
        url = self._strava.authorize_url(
            redirect_uri=self.redirect_uri, scopes=asked, state=state, approval_prompt=approval_prompt
        )
        return url, expires_at

    def for_user(self, user_id: str) -> str:
        """An authorize URL with no `redirect_to` (the callback then shows a small page): for 409 bodies."""
        return self.authorize_url(user_id)[0]

    def read_state(self, state: str | None) -> StateClaims:
        """Raises InvalidState for a forged, tampered or expired state."""
        payload = self._states.loads(state) if state else None
        if payload is None:
            raise InvalidState("the OAuth state is invalid or has expired; start connecting again")
        user_id, redirect_to, nonce = payload.get("u"), payload.get("r"), payload.get("n")
        if (
            not isinstance(user_id, str)
            or not USER_ID_RE.fullmatch(user_id)
            or not isinstance(nonce, str)
            or not (redirect_to is None or isinstance(redirect_to, str))
        ):
            raise InvalidState("the OAuth state is invalid; start connecting again")
        return StateClaims(nonce, user_id, redirect_to, payload["_expires_at"])


@dataclass(frozen=True, slots=True)
class CallbackResult:
    outcome: Literal["connected", "denied"]
    user_id: str
    redirect_to: str | None
    token_status: TokenStatus | None = None


class OAuthService:
    """The callback half of the flow."""

    def __init__(
        self, *, links: ConnectLinks, tokens: TokenService, strava: StravaClient, engine: AsyncEngine, clock: Clock
    ) -> None:
        self._links = links
        self._tokens = tokens
        self._strava = strava
        self._engine = engine
        self._clock = clock

    async def callback(
        self, *, state: str | None, code: str | None, scope: str | None, error: str | None
    ) -> CallbackResult:
        """Check and consume the state (one transaction), then exchange the code and store the tokens.

        Raises InvalidState (bad, reused or expired: no exchange happens), ValidationFailed (no code),
        OAuthCodeRejected, ProviderUnavailable (and subclasses).
        """
        claims = self._links.read_state(state)
        now = datetime.fromtimestamp(int(self._clock()), UTC)
        async with self._engine.begin() as conn:
            fresh = await oauth_states.consume(
                conn, claims.nonce, user_id=claims.user_id, expires_at=claims.expires_at, now=now
            )
            await oauth_states.purge_expired(conn, now=int(self._clock()))
        if not fresh:
            log.warning("oauth.state_replayed", user_id=claims.user_id)
            raise InvalidState("this OAuth state was already used; start connecting again")
        if error is not None:
            log.info("oauth.denied", user_id=claims.user_id, error=error[:64])
            return CallbackResult("denied", claims.user_id, claims.redirect_to)
        if not code:
            raise ValidationFailed("the callback has neither `code` nor `error`")
        try:
            grant = await self._strava.exchange_code(code)
        except ProviderRejectedError as exc:
            log.warning("oauth.code_rejected", user_id=claims.user_id, reason=exc.reason)
            raise OAuthCodeRejected("Strava did not accept the authorization code; start connecting again") from exc
        except ProviderTransientError as exc:
            error_type = ProviderRateLimited if exc.rate_limited else ProviderUnavailable
            raise error_type(str(exc), retry_after=exc.retry_after) from exc
        except ProviderConfigError as exc:
            raise ProviderMisconfigured(str(exc)) from exc
        status = await self._tokens.store_grant(claims.user_id, grant, scopes=parse_scopes(scope))
        log.info("oauth.connected", user_id=claims.user_id, athlete_id=grant.athlete_id, scopes=status.scopes)
        return CallbackResult("connected", claims.user_id, claims.redirect_to, status)
