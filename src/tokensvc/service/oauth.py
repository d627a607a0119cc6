"""Connect with Strava: authorize URLs with a signed, single-use state, and the callback that acts on it.

The state is signed (itsdangerous), bound to the user, the `redirect_to` and the scopes asked for, and lives ten
minutes. It is stateless until used; the callback records its nonce before anything else, so a replay fails even
while the state is young, and a bad, reused or expired state never reaches Strava's code exchange.

A link or callback URL opened by another person must link nothing and sign nobody in (RFC 6749 §10.12):
- with `redirect_to`, the app confirms: the callback stores nothing, sets no cookie and hands the app a one-time
  `connect_id`; only the app's backend, for the flow's own user, completes it (`complete`), where the code is
  exchanged;
- without it, `connect` hands out a link to this service (`/v1/oauth/strava/start`) that binds the state to the
  browser opening it (a cookie whose hash is in the state); the callback completes only in that browser, and never
  in one already signed in as another user.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc import metrics
from tokensvc.clock import Clock
from tokensvc.errors import (
    AthleteCapacity,
    AthleteInUse,
    ConnectMismatch,
    InvalidState,
    OAuthCodeRejected,
    ProviderMisconfigured,
    ProviderRateLimited,
    ProviderUnavailable,
    ValidationFailed,
)
from tokensvc.providers.strava import (
    ProviderCapacityError,
    ProviderConfigError,
    ProviderRejectedError,
    ProviderTransientError,
    StravaClient,
    TokenGrant,
)
from tokensvc.schemas import USER_ID_RE, TokenStatus
from tokensvc.service.signing import SignedTokens
from tokensvc.service.tokens import TokenService
from tokensvc.store import connect_confirmations, oauth_states

log = structlog.get_logger(__name__)

STATE_TTL_SECONDS = 600
CONNECT_ID_TTL_SECONDS = 600
BROWSER_COOKIE = "tokensvc_oauth"
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
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        return False  # `/app/../evil`, `/app/%2e%2e/admin`: a browser resolves these out of the prefix
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


def secret_hash(secret: str, *, purpose: str) -> str:
    """A hex SHA-256 of a random secret, for one purpose: what is stored or signed instead of the secret."""
    return hashlib.sha256(f"tokensvc.{purpose}\0{secret}".encode()).hexdigest()


def seal_code(connect_id: str, code: str, *, user_id: str) -> str:
    """Strava's code, encrypted with a key only the `connect_id` gives (the table holds the id's hash alone)."""
    key = hashlib.sha256(f"tokensvc.connect-seal\0{connect_id}".encode()).digest()
    nonce = secrets.token_bytes(12)
    sealed = nonce + AESGCM(key).encrypt(nonce, code.encode(), user_id.encode())
    return base64.urlsafe_b64encode(sealed).decode()


def open_code(connect_id: str, sealed: str, *, user_id: str) -> str | None:
    key = hashlib.sha256(f"tokensvc.connect-seal\0{connect_id}".encode()).digest()
    try:
        raw = base64.urlsafe_b64decode(sealed)
        return AESGCM(key).decrypt(raw[:12], raw[12:], user_id.encode()).decode()
    except (InvalidTag, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class StateClaims:
    nonce: str
    user_id: str
    redirect_to: str | None
    scopes: list[str]
    browser_hash: str | None
    expires_at: int


class ConnectLinks:
    """Builds authorize URLs with a fresh signed state. Pure: no I/O, so 409s can carry one."""

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
        self._tickets = SignedTokens(secret, purpose="oauth-start", max_age=STATE_TTL_SECONDS, clock=clock)
        self.redirect_uri = redirect_uri
        self.start_uri = redirect_uri.removesuffix("/callback") + "/start"
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
        """The URL to send the user to, and when it expires. With `redirect_to`, Strava's consent page (the app
        confirms the result); without, this service's start link, which binds the flow to the browser opening it
        (and always shows Strava's consent page). Raises ValidationFailed for a `redirect_to` outside
        TOKENSVC_REDIRECT_ALLOWLIST or an unknown scope."""
        if redirect_to is not None and not redirect_allowed(redirect_to, self.allowlist):
            raise ValidationFailed("`redirect_to` must start with one of TOKENSVC_REDIRECT_ALLOWLIST")
        asked = list(scopes) if scopes else self.default_scopes
        unknown = [s for s in asked if s not in KNOWN_SCOPES]
        if unknown:
            raise ValidationFailed(f"unknown Strava scopes: {', '.join(sorted(unknown))}")
        if redirect_to is None:
            ticket, expires_at = self._tickets.dumps({"u": user_id, "s": asked})
            return with_query(self.start_uri, ticket=ticket), expires_at
        return self._strava_url(user_id, redirect_to=redirect_to, scopes=asked, approval_prompt=approval_prompt)

    def browser_authorize_url(self, user_id: str, *, scopes: Sequence[str], browser_secret: str) -> str:
        """Strava's consent page (always shown) for a flow that only the browser holding `browser_secret` (its
        `tokensvc_oauth` cookie) can finish."""
        url, _expires_at = self._strava_url(
            user_id, redirect_to=None, scopes=scopes, approval_prompt="force", browser_secret=browser_secret
        )
        return url

    def read_ticket(self, ticket: str | None) -> tuple[str, list[str]]:
        """The user and scopes of a start link; raises InvalidState for a forged, tampered or expired one."""
        payload = self._tickets.loads(ticket) if ticket else None
        user_id, scopes = (payload.get("u"), payload.get("s")) if payload else (None, None)
        if not isinstance(user_id, str) or not USER_ID_RE.fullmatch(user_id) or not _scope_list(scopes):
            raise InvalidState("this connect link is invalid or has expired; ask the app for a new one")
        return user_id, list(scopes)  # type: ignore[arg-type]

    def for_user(self, user_id: str) -> str:
        """An authorize URL with no `redirect_to` (the browser-bound start link): for 409 bodies."""
        return self.authorize_url(user_id)[0]

    def read_state(self, state: str | None) -> StateClaims:
        """Raises InvalidState for a forged, tampered or expired state."""
        payload = self._states.loads(state) if state else None
        if payload is None:
            raise InvalidState("the OAuth state is invalid or has expired; start connecting again")
        user_id, redirect_to, nonce = payload.get("u"), payload.get("r"), payload.get("n")
        scopes, browser_hash = payload.get("s"), payload.get("b")
        if (
            not isinstance(user_id, str)
            or not USER_ID_RE.fullmatch(user_id)
            or not isinstance(nonce, str)
            or not (redirect_to is None or isinstance(redirect_to, str))
            or not _scope_list(scopes)
            or not (browser_hash is None or isinstance(browser_hash, str))
            or (redirect_to is None) == (browser_hash is None)  # exactly one of: confirmed by the app, bound
        ):
            raise InvalidState("the OAuth state is invalid; start connecting again")
        return StateClaims(nonce, user_id, redirect_to, list(scopes), browser_hash, payload["_expires_at"])  # type: ignore[arg-type]

    def _strava_url(
        self,
        user_id: str,
        *,
        redirect_to: str | None,
        scopes: Sequence[str],
        approval_prompt: ApprovalPrompt,
        browser_secret: str | None = None,
    ) -> tuple[str, int]:
        claims: dict[str, object] = {"u": user_id, "r": redirect_to, "n": secrets.token_urlsafe(16), "s": list(scopes)}
        if browser_secret is not None:
            claims["b"] = secret_hash(browser_secret, purpose="oauth-browser")
        state, expires_at = self._states.dumps(claims)
        url = self._strava.authorize_url(
            redirect_uri=self.redirect_uri, scopes=list(scopes), state=state, approval_prompt=approval_prompt
        )
        return url, expires_at


def _scope_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(s, str) and s in KNOWN_SCOPES for s in value)


@dataclass(frozen=True, slots=True)
class CallbackResult:
    outcome: Literal["connected", "denied", "confirm"]
    user_id: str
    redirect_to: str | None
    token_status: TokenStatus | None = None
    connect_id: str | None = None


@dataclass(frozen=True, slots=True)
class CallbackBrowser:
    """What the callback's browser brings: its `tokensvc_oauth` cookie, and the user of a session it holds."""

    binding: str | None = None
    session_user: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthService:
    """The callback half of the flow, and the app's confirmation."""

    links: ConnectLinks
    tokens: TokenService
    strava: StravaClient
    engine: AsyncEngine
    clock: Clock

    async def callback(
        self,
        *,
        state: str | None,
        code: str | None,
        scope: str | None,
        error: str | None,
        browser: CallbackBrowser | None = None,
    ) -> CallbackResult:
        """Check and consume the state (one transaction), then hand the app a `connect_id` (with `redirect_to`) or
        exchange the code and store the tokens (the browser-bound flow).

        Raises InvalidState (bad, reused, expired, or another browser's: no exchange happens), ConnectMismatch (a
        browser signed in as another user), ValidationFailed (no code), OAuthCodeRejected, AthleteCapacity,
        AthleteInUse, ProviderUnavailable (and subclasses).
        """
        claims = self.links.read_state(state)
        self._check_browser(claims, browser or CallbackBrowser())
        await self._consume(claims)
        if error is not None:
            log.info("oauth.denied", user_id=claims.user_id, error=error[:64])
            return CallbackResult("denied", claims.user_id, claims.redirect_to)
        if not code:
            raise ValidationFailed("the callback has neither `code` nor `error`")
        granted = [s for s in parse_scopes(scope) if s in claims.scopes]
        if claims.redirect_to is not None:
            connect_id = await self._hold_for_confirmation(claims.user_id, code, granted)
            return CallbackResult("confirm", claims.user_id, claims.redirect_to, connect_id=connect_id)
        status = await self._exchange_and_store(claims.user_id, code, granted, replace=False)
        return CallbackResult("connected", claims.user_id, None, status)

    async def complete(self, user_id: str, connect_id: str, *, replace: bool = False) -> TokenStatus:
        """The app's backend confirms a connect for the user signed in there: spend the id, exchange, store.

        Raises InvalidState (unknown, used or expired id), ConnectMismatch (another user's flow; the id is spent),
        OAuthCodeRejected, AthleteCapacity, AthleteInUse, ProviderUnavailable (and subclasses).
        """
        now = int(self.clock())
        async with self.engine.begin() as conn:
            held = await connect_confirmations.take(conn, secret_hash(connect_id, purpose="connect-id"), now=now)
        if held is None:
            raise InvalidState("this connect_id is unknown, used or expired; start connecting again")
        if held.user_id != user_id:
            log.warning("oauth.connect_mismatch", user_id=user_id, flow_user_id=held.user_id)
            raise ConnectMismatch("this connect was started for another user; nothing was stored")
        code = open_code(connect_id, held.code_sealed, user_id=held.user_id)
        if code is None:
            raise InvalidState("this connect_id cannot be read; start connecting again")
        return await self._exchange_and_store(user_id, code, held.scopes, replace=replace)

    def _check_browser(self, claims: StateClaims, browser: CallbackBrowser) -> None:
        if claims.browser_hash is None:
            return  # the app confirms this flow: any browser may carry the callback, none gets anything
        binding = browser.binding
        if not binding or not secrets.compare_digest(
            secret_hash(binding, purpose="oauth-browser"), claims.browser_hash
        ):
            log.warning("oauth.foreign_browser", user_id=claims.user_id)
            raise InvalidState("this sign-in was started in another browser; start connecting again here")
        if browser.session_user is not None and browser.session_user != claims.user_id:
            log.warning("oauth.session_for_other_user", user_id=claims.user_id)
            raise ConnectMismatch("this browser is signed in as another user; sign out first, then connect again")

    async def _consume(self, claims: StateClaims) -> None:
        now = datetime.fromtimestamp(int(self.clock()), UTC)
        async with self.engine.begin() as conn:
            fresh = await oauth_states.consume(
                conn, claims.nonce, user_id=claims.user_id, expires_at=claims.expires_at, now=now
            )
            await oauth_states.purge_expired(conn, now=int(self.clock()))
        if not fresh:
            log.warning("oauth.state_replayed", user_id=claims.user_id)
            raise InvalidState("this OAuth state was already used; start connecting again")

    async def _hold_for_confirmation(self, user_id: str, code: str, scopes: list[str]) -> str:
        connect_id = "cn_" + secrets.token_urlsafe(32)
        now = int(self.clock())
        async with self.engine.begin() as conn:
            await connect_confirmations.purge_expired(conn, now=now, limit=100)
            await connect_confirmations.put(
                conn,
                secret_hash(connect_id, purpose="connect-id"),
                user_id=user_id,
                scopes=scopes,
                code_sealed=seal_code(connect_id, code, user_id=user_id),
                expires_at=now + CONNECT_ID_TTL_SECONDS,
            )
        log.info("oauth.awaiting_confirmation", user_id=user_id)
        return connect_id

    async def _exchange_and_store(self, user_id: str, code: str, scopes: list[str], *, replace: bool) -> TokenStatus:
        """Exchange the code and store the grant, counting the outcome (`tokensvc_connect_total`)."""
        try:
            grant = await self._exchange(user_id, code)
            status = await self.tokens.store_grant(user_id, grant, scopes=scopes, replace=replace)
        except AthleteInUse:
            metrics.CONNECTS_TOTAL.labels(outcome="athlete_in_use").inc()
            raise
        metrics.CONNECTS_TOTAL.labels(outcome="connected").inc()
        log.info("oauth.connected", user_id=user_id, athlete_id=grant.athlete_id, scopes=status.scopes)
        return status

    async def _exchange(self, user_id: str, code: str) -> TokenGrant:
        try:
            return await self.strava.exchange_code(code)
        except ProviderRejectedError as exc:
            metrics.CONNECTS_TOTAL.labels(outcome="code_rejected").inc()
            log.warning("oauth.code_rejected", user_id=user_id, reason=exc.reason)
            raise OAuthCodeRejected("Strava did not accept the authorization code; start connecting again") from exc
        except ProviderCapacityError as exc:
            metrics.CONNECTS_TOTAL.labels(outcome="capacity").inc()
            log.warning("oauth.athlete_capacity", user_id=user_id, strava_status=exc.status_code, errors=exc.errors)
            raise AthleteCapacity(
                "Strava refused the connect: this Strava app is at its limit of connected athletes "
                "(TOKENSVC_STRAVA_ATHLETE_CAPACITY); nothing was stored"
            ) from exc
        except ProviderTransientError as exc:
            metrics.CONNECTS_TOTAL.labels(outcome="unavailable").inc()
            error_type = ProviderRateLimited if exc.rate_limited else ProviderUnavailable
            raise error_type(str(exc), retry_after=exc.retry_after) from exc
        except ProviderConfigError as exc:
            metrics.CONNECTS_TOTAL.labels(outcome="misconfigured").inc()
            raise ProviderMisconfigured(str(exc)) from exc
