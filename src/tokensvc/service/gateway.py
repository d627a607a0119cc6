"""The Strava API gateway's decisions: which token, which budget, what a refusal from Strava means.

A call: the user's access token through the refresh rules (`min_ttl` 60); one unit of the overall window (and of
the read window for a GET) at the caller's priority; Strava's answer streamed back. A 401 for the token → one
refresh shared by every caller who saw the same token refused (`TokenService.replace_rejected`) and one retry; a
401 for a permission → 403 `insufficient_scope`; a spent window or Strava's 429 → 429 `strava_rate_limited`.
No transaction or connection is held while Strava answers (the budget and the token reads are single statements).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import IO, Literal

import structlog

from tokensvc import metrics
from tokensvc.errors import (
    InsufficientScope,
    NeedsReconnect,
    NotFound,
    PayloadTooLarge,
    ProviderMisconfigured,
    ProviderRateLimited,
    ProviderUnavailable,
    StravaRateLimited,
    TokenServiceError,
    ValidationFailed,
)
from tokensvc.providers.strava import (
    ApiAnswer,
    ApiRequest,
    ProviderConfigError,
    ProviderTransientError,
    StravaClient,
)
from tokensvc.service.gateway_stats import GatewayTally
from tokensvc.service.rate_budget import Priority, RateBudget
from tokensvc.service.tokens import TokenService

log = structlog.get_logger(__name__)

GatewayPriority = Literal["interactive", "sync", "backfill"]
FORWARDED_HEADERS = ("content-type", "accept", "if-none-match")
MIN_TTL = 60
_SPOOL_IN_MEMORY = 1024 * 1024  # a body larger than this waits on disk for its (possible) second send
_CHUNK = 64 * 1024

ScopedAuthorizeUrl = Callable[[str, Sequence[str]], str]


class Spool:
    """A request body kept so it can be sent twice (the retry after a refresh): in memory up to 1 MiB, then on
    disk; never more than the gateway's bound."""

    def __init__(self, file: IO[bytes], length: int) -> None:
        self._file = file
        self.length = length

    @classmethod
    async def take(cls, chunks: AsyncIterator[bytes], *, max_bytes: int) -> Spool:
        """Raises PayloadTooLarge past `max_bytes` (nothing is sent to Strava then)."""
        file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
        length = 0
        try:
            async for chunk in chunks:
                length += len(chunk)
                if length > max_bytes:
                    break
                file.write(chunk)
        except BaseException:
            file.close()
            raise
        if length > max_bytes:
            file.close()
            raise PayloadTooLarge(f"gateway request bodies are limited to {max_bytes} bytes")
        return cls(file, length)

    async def chunks(self) -> AsyncIterator[bytes]:
        self._file.seek(0)
        while chunk := self._file.read(_CHUNK):
            yield chunk

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class GatewayCall:
    user_id: str
    method: str
    path: str
    query: str
    headers: dict[str, str]  # only those the contract forwards (`forwarded_headers`)
    priority: GatewayPriority = "sync"
    body: Spool | None = None


def forwarded_headers(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The caller's headers Strava may see: `Content-Type`, `Accept`, `If-None-Match`; nothing else (no cookie,
    no API key, no forwarding headers)."""
    return {name.lower(): value for name, value in headers if name.lower() in FORWARDED_HEADERS}


def check_path(path: str) -> None:
    """`{path}` may not climb (`..`) or reach the OAuth endpoints. Raises NotFound."""
    if not path or ".." in path or path.lstrip("/").lower().startswith("oauth"):
        raise NotFound("no such Strava API path behind the gateway")


def missing_scope_for(field: str | None) -> str:
    """Strava names a permission (`activity:read_permission`); the scope that grants it (`activity:read_all`,
    which also covers private activities; `activity:write` for `activity:write_permission`)."""
    name = (field or "activity:read_permission").removesuffix("_permission")
    return f"{name}_all" if name.endswith("read") else name


@dataclass(frozen=True, slots=True, kw_only=True)
class Gateway:
    """Gateway calls for one process; the budget and the refresh claims are shared with every replica."""

    tokens: TokenService
    strava: StravaClient
    budget: RateBudget
    authorize_url: ScopedAuthorizeUrl
    tally: GatewayTally

    async def call(self, call: GatewayCall) -> ApiAnswer:
        """Strava's answer to `call` (stream it, then it closes itself). Raises NotFound, TokensMissing,
        ReauthRequired, InsufficientScope, StravaRateLimited, ProviderUnavailable (and subclasses), TokenUnreadable."""
        outcome = "strava_error"  # an unexpected failure: the call could not be made
        try:
            check_path(call.path)
            answer = await self._call(call)
        except TokenServiceError as exc:
            outcome = _refusal_outcome(exc)
            raise
        else:
            outcome = _outcome_of(answer.status_code)
        finally:
            metrics.GATEWAY_CALLS_TOTAL.labels(outcome=outcome).inc()
            self.tally.note(outcome)
        return answer

    async def _call(self, call: GatewayCall) -> ApiAnswer:
        row, token = await self.tokens.access_row(call.user_id, min_ttl=MIN_TTL, trigger="gateway")
        answer = await self._send(call, token)
        if answer.rejected == "access_token_invalid":
            log.info("gateway.token_rejected", user_id=call.user_id, version=row.version)
            row, token = await self.tokens.replace_rejected(call.user_id, version=row.version, min_ttl=MIN_TTL)
            answer = await self._send(call, token)
        if answer.rejected == "scope_missing":
            scope = missing_scope_for(answer.missing_field)
            log.info("gateway.scope_missing", user_id=call.user_id, missing_scope=scope)
            raise InsufficientScope(
                f"Strava refused the call: the user has not granted `{scope}`; send them to `authorize_url`",
                missing_scope=scope,
                authorize_url=self._scoped_url(call.user_id, [*row.scope_list, scope]),
            )
        return answer

    async def _send(self, call: GatewayCall, token: str) -> ApiAnswer:
        """One unit of the budget, then one request (a 429 from Strava holds that window on every replica)."""
        read = call.method == "GET"
        priority: Priority = call.priority
        try:
            await self.budget.acquire(priority, read=read)
        except ProviderRateLimited as exc:
            raise _rate_limited(str(exc), exc.retry_after) from exc
        request = ApiRequest(
            method=call.method,
            path=call.path,
            query=call.query,
            headers=call.headers,
            body=call.body.chunks if call.body is not None else None,
            body_length=call.body.length if call.body is not None else 0,
        )
        try:
            return await self.strava.api_request(request, access_token=token)
        except ProviderTransientError as exc:
            if exc.rate_limited:
                paused = await self.budget.pause(exc.retry_after, kind=self.budget.kind_of_429(read=read))
                raise _rate_limited("Strava answered 429: the app's rate limit is spent", paused) from exc
            log.warning("gateway.strava_unavailable", user_id=call.user_id, error=str(exc), status=exc.status_code)
            raise ProviderUnavailable(f"Strava did not serve the call: {exc}", retry_after=exc.retry_after) from exc
        except ProviderConfigError as exc:
            raise ProviderMisconfigured(str(exc)) from exc

    def _scoped_url(self, user_id: str, scopes: Sequence[str]) -> str | None:
        try:
            return self.authorize_url(user_id, sorted(set(scopes)))
        except ValidationFailed:  # a scope this service does not know of: no link can be made
            return None


JITTER_MIN_SECONDS, JITTER_MAX_SECONDS = 5, 30


def jittered_retry_after(seconds: int) -> int:
    """`Retry-After` for a refused call: never before `seconds` (when the window resets, or Strava's pause ends),
    plus a random spread of a tenth of it, at least 5 s and at most 30 s, so refused callers do not all come back
    at the reset."""
    base = max(1, seconds)
    return base + random.randint(0, min(JITTER_MAX_SECONDS, max(JITTER_MIN_SECONDS, base // 10)))


def _rate_limited(detail: str, seconds: int) -> StravaRateLimited:
    return StravaRateLimited(detail, retry_after=jittered_retry_after(seconds))


def _outcome_of(status: int) -> str:
    """The outcome of an answer Strava gave (gateway_stats.py lists them)."""
    if 200 <= status < 300 or status == 304:
        return "ok"
    return "strava_error" if status >= 500 or status < 400 else "client_error"


def _refusal_outcome(exc: TokenServiceError) -> str:
    """The outcome of a call the service refused or could not make."""
    if isinstance(exc, NeedsReconnect):
        return "reauth"
    if isinstance(exc, InsufficientScope):
        return "scope"
    if isinstance(exc, StravaRateLimited):
        return "rate_limited"
    return "strava_error" if exc.status >= 500 else "client_error"
