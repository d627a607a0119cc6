"""All HTTP to Strava. Every failure is classified here, at the boundary, into one of three typed errors.

- `ProviderRejectedError`: Strava said no about *this user's* credential (refresh token, code, access token).
- `ProviderConfigError`: Strava rejected *our application* (client id or secret): an operator problem.
- `ProviderTransientError`: 429, 5xx, timeouts, connection errors, a 200 that is not a token response.

Only requests that provably never reached Strava (connect refused, connect timeout, no pool slot) are retried.
A refresh whose answer was lost is never retried: Strava may already have rotated the refresh token.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urlencode

import httpx
import stamina
import structlog

from tokensvc import metrics

log = structlog.get_logger(__name__)

TokenTypeHint = Literal["refresh_token", "access_token"]
# What a revoke came to: Strava revoked it, or the token was dead already (nothing left to revoke).
RevokeAnswer = Literal["revoked", "token_dead"]
RejectedReason = Literal[
    "refresh_token_invalid", "code_invalid", "code_expired", "access_token_invalid", "scope_missing"
]

# Requests that never left this machine; retrying them cannot make Strava rotate twice.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class ProviderError(Exception):
    """Root of the provider's errors; keeps Strava's status code and error triples (never a token)."""

    def __init__(self, message: str, *, status_code: int | None = None, errors: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.errors = errors


class ProviderTransientError(ProviderError):
    """Try again later; nothing about the user's credential is known to be wrong."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        errors: tuple[str, ...] = (),
        rate_limited: bool = False,
        retry_after: int | None = None,
        answer_lost: bool = False,
    ) -> None:
        super().__init__(message, status_code=status_code, errors=errors)
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self.answer_lost = answer_lost


class ProviderRejectedError(ProviderError):
    """Strava rejected the user's credential for good; `reason` says which."""

    def __init__(self, reason: RejectedReason, *, status_code: int, errors: tuple[str, ...]) -> None:
        super().__init__(f"Strava rejected the credential: {reason}", status_code=status_code, errors=errors)
        self.reason: RejectedReason = reason


class ProviderConfigError(ProviderError):
    """Strava rejected the application's client id or secret."""


class ProviderCapacityError(ProviderError):
    """Strava refused a code exchange because the application is at its athlete capacity (403 `Limit of connected
    athletes exceeded`: new apps allow 1 athlete, self-serve 10). Nothing is wrong with the user or the code's
    flow; the app needs another athlete to disconnect, or a higher tier."""


class ProviderEndpointMissing(ProviderError):
    """Strava answered 404 for one of its own endpoints (`/oauth/revoke` not there yet, `/oauth/deauthorize`
    retired): the caller may try the other one."""


class ProviderRequestError(ProviderError):
    """Strava refused an application-level request as such (a push subscription that exists already, or whose
    callback did not answer the challenge; an unknown subscription id). Retrying the same request will not help."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A token response. `refresh_token` is None when Strava sent none (then the stored one stays)."""

    access_token: str
    refresh_token: str | None
    expires_at: int
    athlete_id: int | None = None

    def __repr__(self) -> str:  # never let a token reach a log line through a repr
        return f"TokenGrant(expires_at={self.expires_at}, athlete_id={self.athlete_id})"


@dataclass(frozen=True, slots=True)
class PushSubscription:
    """The app's webhook subscription at Strava (there is at most one per app)."""

    id: int
    callback_url: str
    created_at: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimitUsage:
    """Strava's `X-RateLimit-*` headers: (15-minute, daily) limit and usage; the `read_*` ones from
    `X-ReadRateLimit-*` when Strava sent them (None otherwise)."""

    limit_15min: int
    limit_daily: int
    usage_15min: int
    usage_daily: int
    read_limit: tuple[int, int] | None = None
    read_usage: tuple[int, int] | None = None

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> RateLimitUsage | None:
        overall = _pairs(headers, "x-ratelimit-limit", "x-ratelimit-usage")
        if overall is None:
            return None
        read = _pairs(headers, "x-readratelimit-limit", "x-readratelimit-usage")
        (l15, lday), (u15, uday) = overall
        return cls(l15, lday, u15, uday, read_limit=read[0] if read else None, read_usage=read[1] if read else None)


def _pairs(headers: httpx.Headers, limit_name: str, usage_name: str) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """A limit header and a usage header, each `"15min,daily"`; None when either is missing or malformed."""
    limit, usage = headers.get(limit_name), headers.get(usage_name)
    if not limit or not usage:
        return None
    try:
        l15, lday = (int(part) for part in limit.split(","))
        u15, uday = (int(part) for part in usage.split(","))
    except ValueError:
        return None
    if min(l15, lday, u15, uday) < 0:
        return None
    return (l15, lday), (u15, uday)


def seconds_to_next_window(now: float) -> int:
    """Strava's 15-minute windows reset at :00, :15, :30 and :45 UTC."""
    return max(1, math.ceil(900 - (now % 900)))


# Kept as sent: what a Strava path may carry (ids, `:`, `,`); anything else is percent-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# Strava's answer headers the gateway hands back (besides the body's content type).
PASSED_HEADERS = (
    "content-type",
    "etag",
    "x-ratelimit-limit",
    "x-ratelimit-usage",
    "x-readratelimit-limit",
    "x-readratelimit-usage",
)


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One gateway call as it goes to Strava: `headers` are only those the contract forwards; `body`, when set,
    makes a fresh stream of the (replayable) body, `body_length` bytes long."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: Callable[[], AsyncIterator[bytes]] | None = None
    body_length: int = 0


class ApiAnswer:
    """Strava's answer to a gateway call. `rejected` is set for a 401 (already read): `access_token_invalid` or
    `scope_missing` (with Strava's `missing_field`, e.g. `activity:read_permission`); else the body is unread."""

    def __init__(
        self,
        response: httpx.Response,
        *,
        rejected: RejectedReason | None = None,
        missing_field: str | None = None,
    ) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers = {k: v for k in PASSED_HEADERS if (v := response.headers.get(k)) is not None}
        self.rejected = rejected
        self.missing_field = missing_field

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as Strava sends it (still encoded as sent: `Content-Encoding` is not passed on, so decoded)."""
        try:
            if self._response.is_stream_consumed:
                yield self._response.content
                return
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            # Headers are gone already: the caller sees a cut body, which is the truth.
            log.warning("gateway.body_broken_off", error=type(exc).__name__)
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()


class StravaClient:
    """Owns one long-lived `httpx.AsyncClient` for Strava's OAuth endpoints."""

    def __init__(
        self,
        *,
        base_url: str,
        client_id: str,
        client_secret: str,
        timeout: float = 10.0,
        token_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        connect_attempts: int = 3,
        on_usage: Callable[[RateLimitUsage], None] | None = None,
        token_concurrency: int = 32,
        api_base_url: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_base_url = (api_base_url or f"{self.base_url}/api/v3").rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._clock = clock
        self._connect_attempts = connect_attempts
        # Token calls wait longer for an answer: nothing holds a database connection while they run.
        self._token_timeout = httpx.Timeout(token_timeout, connect=min(token_timeout, 5.0)) if token_timeout else None
        self._on_usage = on_usage  # told Strava's own count whenever a response carries it
        # Strava does not rate-count /oauth/token: this bound per process is what keeps a big sweep from flooding it.
        self.token_slots = asyncio.Semaphore(token_concurrency)
        self.token_concurrency = token_concurrency
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
            headers={"User-Agent": "tokensvc"},
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def client_id(self) -> str:
        return self._client_id

    def authorize_url(self, *, redirect_uri: str, scopes: list[str], state: str, approval_prompt: str = "auto") -> str:
        query = urlencode(
            {
                "client_id": self._client_id,
                "redirect_uri": redirect_uri,
                "response_type": "code",
                "approval_prompt": approval_prompt,
                "scope": ",".join(scopes),
                "state": state,
            }
        )
        return f"{self.base_url}/oauth/authorize?{query}"

    async def refresh(
        self, refresh_token: str, *, deadline_seconds: float | None = None, slot_wait_seconds: float | None = None
    ) -> TokenGrant:
        """Trade a refresh token for a token pair. The call waits at most `slot_wait_seconds` for one of the
        process's token slots (then nothing was sent) and, once sent, `deadline_seconds` in all (retries included;
        then TimeoutError: the answer may be lost), so a queue for the slots never eats the call's own time.

        Raises ProviderRejectedError (refresh_token_invalid), ProviderConfigError, ProviderTransientError, or
        TimeoutError past the deadline.
        """
        response = await self._post(
            "/oauth/token",
            {
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
            },
            http_timeout=self._token_timeout,
            deadline_seconds=deadline_seconds,
            slot_wait_seconds=slot_wait_seconds,
        )
        return self._grant(response, with_athlete=False)

    async def exchange_code(self, code: str) -> TokenGrant:
        """Trade an authorization code for the first token pair and the athlete id.

        Raises ProviderRejectedError (code_invalid, code_expired), ProviderCapacityError, ProviderConfigError or
        ProviderTransientError.
        """
        response = await self._post(
            "/oauth/token",
            {
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "code": code,
                "grant_type": "authorization_code",
            },
        )
        if response.status_code == 403 and _capacity_refusal(response):
            raise ProviderCapacityError(
                "Strava refused the connect: the application is at its limit of connected athletes",
                status_code=403,
                errors=tuple("/".join(t) for t in _error_triples(response)),
            )
        return self._grant(response, with_athlete=True)

    async def deauthorize(self, access_token: str) -> None:
        """Revoke every token this app holds for the athlete.

        Raises ProviderRejectedError (access_token_invalid: already revoked, or the access token expired),
        ProviderEndpointMissing (404: retired), ProviderConfigError or ProviderTransientError.
        """
        response = await self._post("/oauth/deauthorize", {"access_token": access_token})
        if response.status_code == 404:
            raise ProviderEndpointMissing("Strava has no /oauth/deauthorize here (404)", status_code=404)
        if response.status_code != 200:
            raise self._classify(response)

    async def revoke(self, token: str, *, token_type_hint: TokenTypeHint = "refresh_token") -> RevokeAnswer:
        """`POST /oauth/revoke` (RFC 7009: HTTP Basic client credentials, form `token`, `token_type_hint`); revoking a
        refresh token ends the athlete's grant. Rate-counted at Strava. Returns `revoked` for a 200, `token_dead`
        when Strava calls the token itself invalid (a 400/401 with an `invalid` error not about the application):
        either way nothing is left alive.

        Raises ProviderEndpointMissing (404), ProviderConfigError or ProviderTransientError.
        """
        credentials = base64.b64encode(f"{self._client_id}:{self._client_secret}".encode()).decode()
        response = await self._send(
            "POST",
            "/oauth/revoke",
            data={"token": token, "token_type_hint": token_type_hint},
            headers={"Authorization": f"Basic {credentials}"},
        )
        if response.status_code == 200:
            return "revoked"
        if response.status_code == 404:
            raise ProviderEndpointMissing("Strava has no /oauth/revoke here (404)", status_code=404)
        error = self._classify(response)
        # Only Strava's own "this token is invalid" counts as dead: a bare 400/401 proves nothing (I3's spirit).
        invalid = any(code == "invalid" for _, _, code in _error_triples(response))
        if response.status_code in (400, 401) and invalid and not isinstance(error, ProviderConfigError):
            return "token_dead"
        raise error

    async def check_access(self, access_token: str) -> bool:
        """Whether Strava still honours an access token (`GET /api/v3/athlete`; rate-counted at Strava): False when
        it answers 401 for the token (revoked, expired or unknown), True when it serves the athlete, or refuses only
        for a missing scope (the token itself is alive).

        Raises ProviderConfigError or ProviderTransientError.
        """
        response = await self._send("GET", "/api/v3/athlete", headers={"Authorization": f"Bearer {access_token}"})
        if response.status_code == 200:
            return True
        error = self._classify(response)
        if isinstance(error, ProviderRejectedError):
            return error.reason == "scope_missing"
        raise error

    async def create_subscription(self, callback_url: str, verify_token: str) -> int:
        """Create the app's push subscription; Strava first checks the callback with a challenge. Returns its id.

        Raises ProviderRequestError (one exists already, or the callback did not verify), ProviderConfigError or
        ProviderTransientError.
        """
        response = await self._send(
            "POST",
            "/api/v3/push_subscriptions",
            data={**self._app_credentials(), "callback_url": callback_url, "verify_token": verify_token},
        )
        body = self._subscription_answer(response, expected=(200, 201))
        raw_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(raw_id, int) or isinstance(raw_id, bool):
            raise ProviderTransientError("Strava's answer to the subscription carries no id", status_code=200)
        return raw_id

    async def list_subscriptions(self) -> list[PushSubscription]:
        """The app's push subscriptions (Strava allows one). Raises ProviderConfigError or ProviderTransientError."""
        response = await self._send("GET", "/api/v3/push_subscriptions", params=self._app_credentials())
        body = self._subscription_answer(response, expected=(200,))
        if not isinstance(body, list):
            raise ProviderTransientError("Strava's subscription list is not a list", status_code=200)
        return [
            PushSubscription(
                id=item["id"],
                callback_url=str(item.get("callback_url", "")),
                created_at=str(item["created_at"]) if item.get("created_at") is not None else None,
            )
            for item in body
            if isinstance(item, dict) and isinstance(item.get("id"), int)
        ]

    async def delete_subscription(self, subscription_id: int) -> None:
        """Delete the app's push subscription. Raises ProviderRequestError (unknown id), ProviderConfigError or
        ProviderTransientError."""
        response = await self._send(
            "DELETE", f"/api/v3/push_subscriptions/{subscription_id}", params=self._app_credentials()
        )
        self._subscription_answer(response, expected=(200, 204))

    async def api_request(self, request: ApiRequest, *, access_token: str) -> ApiAnswer:
        """Send one gateway request to `<api base>/{path}` with the user's token and only the headers in `request`,
        the body streamed from `request.body`; the answer comes back unread (stream it, then `aclose`). A 401 is
        read and classified (`rejected`). Retried only when it provably never left (connect errors).

        Raises ProviderTransientError (429 with `rate_limited`, 5xx, timeouts, connection errors) or
        ProviderConfigError."""
        headers = {**request.headers, "Authorization": f"Bearer {access_token}"}
        if request.body is not None:
            headers["Content-Length"] = str(request.body_length)
        url = httpx.URL(f"{self.api_base_url}/{quote(request.path, safe=_PATH_SAFE)}")
        if request.query:
            url = url.copy_with(query=request.query.encode())
        try:
            async for attempt in stamina.retry_context(
                on=_NEVER_SENT, attempts=self._connect_attempts, timeout=15.0, wait_initial=0.1, wait_max=1.0
            ):
                with attempt:
                    built = self._http.build_request(
                        request.method, url, headers=headers, content=request.body() if request.body else None
                    )
                    response = await self._observed("api", self._http.send(built, stream=True))
        except _NEVER_SENT as exc:
            raise ProviderTransientError(f"could not connect to Strava: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise ProviderTransientError(f"Strava did not answer: {type(exc).__name__}", answer_lost=True) from exc
        self._note_usage(response)
        return await self._api_answer(response)

    async def _api_answer(self, response: httpx.Response) -> ApiAnswer:
        """Read and classify the answers the gateway decides on (401, 429, 5xx); pass the rest through unread."""
        if response.status_code != 401 and response.status_code != 429 and response.status_code < 500:
            return ApiAnswer(response)
        try:
            await response.aread()
        except httpx.HTTPError as exc:
            raise ProviderTransientError("Strava's answer broke off", answer_lost=True) from exc
        finally:
            await response.aclose()
        if response.status_code != 401:
            raise self._classify(response)
        error = self._classify(response)
        if isinstance(error, ProviderConfigError):
            raise error
        if isinstance(error, ProviderRejectedError):
            field = next((t.split("/")[1] for t in error.errors if t.startswith("AccessToken/")), "")
            return ApiAnswer(response, rejected=error.reason, missing_field=field or None)
        return ApiAnswer(response)

    def _note_usage(self, response: httpx.Response) -> None:
        usage = RateLimitUsage.from_headers(response.headers)
        if usage is not None and self._on_usage is not None:
            self._on_usage(usage)

    def _app_credentials(self) -> dict[str, str]:
        return {"client_id": self._client_id, "client_secret": self._client_secret}

    def _subscription_answer(self, response: httpx.Response, *, expected: tuple[int, ...]) -> object:
        if response.status_code in expected:
            if response.status_code == 204 or not response.content:
                return None
            try:
                return response.json()
            except ValueError as exc:
                raise ProviderTransientError(
                    f"Strava answered {response.status_code} with a body that is not JSON",
                    status_code=response.status_code,
                ) from exc
        error = self._classify(response)
        if response.status_code in (400, 404, 409) and not isinstance(error, ProviderConfigError):
            triples = "; ".join(error.errors) or response.reason_phrase
            raise ProviderRequestError(
                f"Strava refused the request ({response.status_code}): {triples}",
                status_code=response.status_code,
                errors=error.errors,
            )
        raise error

    async def _post(
        self,
        path: str,
        form: Mapping[str, str],
        *,
        http_timeout: httpx.Timeout | None = None,
        deadline_seconds: float | None = None,
        slot_wait_seconds: float | None = None,
    ) -> httpx.Response:
        if path != "/oauth/token":
            return await self._send("POST", path, data=form, http_timeout=http_timeout)
        try:
            async with asyncio.timeout(slot_wait_seconds):
                await self.token_slots.acquire()
        except TimeoutError as exc:
            raise ProviderTransientError(
                f"all {self.token_concurrency} token slots of this process stayed busy: the call was not sent",
                retry_after=5,
            ) from exc
        metrics.TOKEN_CALLS_IN_FLIGHT.inc()
        try:
            async with asyncio.timeout(deadline_seconds):
                return await self._send("POST", path, data=form, http_timeout=http_timeout)
        finally:
            metrics.TOKEN_CALLS_IN_FLIGHT.dec()
            self.token_slots.release()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        data: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        http_timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        try:
            async for attempt in stamina.retry_context(
                on=_NEVER_SENT, attempts=self._connect_attempts, timeout=15.0, wait_initial=0.1, wait_max=1.0
            ):
                with attempt:
                    response = await self._observed(
                        _endpoint_of(path, data or {}),
                        self._http.request(
                            method,
                            path,
                            data=data,
                            params=params,
                            headers=headers,
                            timeout=httpx.USE_CLIENT_DEFAULT if http_timeout is None else http_timeout,
                        ),
                    )
        except _NEVER_SENT as exc:
            raise ProviderTransientError(f"could not connect to Strava: {type(exc).__name__}") from exc
        except httpx.TimeoutException as exc:
            # The request left: Strava may have acted on it, so the caller must not resend the same credential.
            raise ProviderTransientError(
                f"Strava did not answer in time: {type(exc).__name__}", answer_lost=True
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderTransientError(f"Strava connection failed: {type(exc).__name__}", answer_lost=True) from exc
        self._note_usage(response)
        return response

    @staticmethod
    async def _observed(endpoint: Endpoint, request: Awaitable[httpx.Response]) -> httpx.Response:
        """The one place every Strava request passes: count it by endpoint and status (`error`: no response)."""
        try:
            response = await request
        except httpx.HTTPError:
            metrics.STRAVA_REQUESTS.labels(endpoint=endpoint, status="error").inc()
            raise
        metrics.STRAVA_REQUESTS.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    def _grant(self, response: httpx.Response, *, with_athlete: bool) -> TokenGrant:
        if response.status_code != 200:
            raise self._classify(response)
        try:
            body = response.json()
        except ValueError as exc:
            raise ProviderTransientError("Strava answered 200 with a body that is not JSON", status_code=200) from exc
        if not isinstance(body, dict):
            raise ProviderTransientError("Strava answered 200 with JSON that is not an object", status_code=200)
        access, refresh, expires_at = (
            body.get("access_token"),
            body.get("refresh_token"),
            body.get("expires_at"),
        )
        if not isinstance(access, str) or not access or isinstance(expires_at, bool) or not isinstance(expires_at, int):
            raise ProviderTransientError("Strava answered 200 without an access token and expiry", status_code=200)
        if refresh is not None and (not isinstance(refresh, str) or not refresh):
            raise ProviderTransientError("Strava answered 200 with an unusable refresh token", status_code=200)
        athlete_id: int | None = None
        if with_athlete:
            athlete = body.get("athlete")
            raw_id = athlete.get("id") if isinstance(athlete, dict) else None
            athlete_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
        return TokenGrant(access_token=access, refresh_token=refresh, expires_at=expires_at, athlete_id=athlete_id)

    def _classify(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        triples = _error_triples(response)
        resources = {resource for resource, _, _ in triples}
        errors = tuple("/".join(t) for t in triples)
        if status == 429:
            retry_after = _retry_after(response) or seconds_to_next_window(self._clock())
            return ProviderTransientError(
                "Strava rate limit exceeded",
                status_code=status,
                errors=errors,
                rate_limited=True,
                retry_after=retry_after,
            )
        if status >= 500:
            return ProviderTransientError(f"Strava answered {status}", status_code=status, errors=errors)
        if "Application" in resources:
            log.error("strava.application_rejected", status=status, errors=errors)
            return ProviderConfigError(
                "Strava rejected the application's client id or secret; check TOKENSVC_STRAVA_CLIENT_ID and "
                "TOKENSVC_STRAVA_CLIENT_SECRET",
                status_code=status,
                errors=errors,
            )
        if status == 400 and "RefreshToken" in resources:
            return ProviderRejectedError("refresh_token_invalid", status_code=status, errors=errors)
        if status == 400 and resources & {"AuthorizationCode", "RequestToken"}:
            expired = any(code == "expired" for _, _, code in triples)
            return ProviderRejectedError(
                "code_expired" if expired else "code_invalid", status_code=status, errors=errors
            )
        if status == 401 and "AccessToken" in resources:
            return ProviderRejectedError("scope_missing", status_code=status, errors=errors)
        if status == 401 and "Athlete" in resources:
            return ProviderRejectedError("access_token_invalid", status_code=status, errors=errors)
        # Anything unrecognised is not proof that the user's credential is dead (I3): treat it as transient.
        return ProviderTransientError(f"Strava answered {status}", status_code=status, errors=errors)


Endpoint = Literal["token_refresh", "token_exchange", "deauthorize", "revoke", "athlete", "push_subscriptions", "api"]


def _endpoint_of(path: str, form: Mapping[str, str]) -> Endpoint:
    """A small fixed label for a request (a metric label never carries a path with ids in it)."""
    if path.endswith("/oauth/token"):
        return "token_refresh" if form.get("grant_type") == "refresh_token" else "token_exchange"
    if path.endswith("/oauth/deauthorize"):
        return "deauthorize"
    if path.endswith("/oauth/revoke"):
        return "revoke"
    if path.endswith("/api/v3/athlete"):
        return "athlete"
    if "/push_subscriptions" in path:
        return "push_subscriptions"
    return "api"


def _error_triples(response: httpx.Response) -> list[tuple[str, str, str]]:
    try:
        body = response.json()
    except ValueError:
        return []
    items = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return []
    return [
        (str(item.get("resource", "")), str(item.get("field", "")), str(item.get("code", "")))
        for item in items
        if isinstance(item, dict)
    ]


def _capacity_refusal(response: httpx.Response) -> bool:
    """Strava's 403 for an application at its athlete capacity: the message `Limit of connected athletes exceeded`,
    or an `Athlete` error whose code says a limit was exceeded (the message's wording is not documented)."""
    try:
        body = response.json()
    except ValueError:
        return False
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, str) and "limit of connected athletes" in message.lower():
        return True
    return any(resource == "Athlete" and "limit" in code.lower() for resource, _, code in _error_triples(response))


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after", "")
    return int(value) if value.isascii() and value.isdigit() else None
