"""One error root. Every failure a caller can see is a TokenServiceError with a contract `code` and status."""

from __future__ import annotations

from typing import Any, ClassVar


class TokenServiceError(Exception):
    """Root of every error the service reports; rendered as problem+json by one handler in `api/problems.py`."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra  # members of the problem body beyond the standard five

    @property
    def headers(self) -> dict[str, str] | None:
        """Response headers the problem needs (the handler adds them)."""
        return None


class Unauthorized(TokenServiceError):
    code, status, title = "unauthorized", 401, "Unauthorized"
    # RFC 9110 asks a 401 to name the scheme; the service API and the session endpoints both take a bearer.
    challenge: ClassVar[str] = 'Bearer realm="tokensvc"'

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.challenge}


class NotFound(TokenServiceError):
    code, status, title = "not_found", 404, "Not found"


class ValidationFailed(TokenServiceError):
    code, status, title = "validation_error", 422, "Validation error"


class PayloadTooLarge(TokenServiceError):
    code, status, title = "payload_too_large", 413, "Payload too large"


class InvalidState(TokenServiceError):
    code, status, title = "invalid_state", 400, "Invalid OAuth state"


class AthleteInUse(TokenServiceError):
    """v1.1: one athlete, one user. Storing an athlete another user holds needs the caller to ask to move it."""

    code, status, title = "athlete_in_use", 409, "Athlete connected to another user"


class ConnectMismatch(TokenServiceError):
    """v1.1: a connect confirmed (or landing in a browser signed in) for a user other than the flow's own."""

    code, status, title = "connect_mismatch", 409, "Connect started for another user"


class AthleteCapacity(TokenServiceError):
    """v1.1: Strava refused a connect because the app is at its athlete capacity (403 `Limit of connected athletes
    exceeded`); nothing was stored. Not transient: another athlete must disconnect, or the app move up a tier."""

    code, status, title = "athlete_capacity", 409, "Strava app at its athlete capacity"


class NeedsReconnect(TokenServiceError):
    """The user must go through Strava's consent again; 409s say so with `needs_reauth` and an authorize URL."""

    status = 409

    def __init__(self, detail: str, *, authorize_url: str | None = None, **extra: Any) -> None:
        super().__init__(detail, needs_reauth=True, authorize_url=authorize_url, **extra)


class TokensMissing(NeedsReconnect):
    code, title = "tokens_missing", "No Strava tokens stored"


class ReauthRequired(NeedsReconnect):
    code, title = "reauth_required", "Strava re-authorization required"


class StaleImport(TokenServiceError):
    """v1.1: the imported pair is older than the stored one (Strava has rotated since); `?replace=true` forces it."""

    code, status, title = "stale_import", 409, "Import older than the stored tokens"


class RetryLater(TokenServiceError):
    """A 503: nothing changed, and the answer says when to try again (Retry-After)."""

    status = 503
    default_retry_after: ClassVar[int] = 30

    def __init__(self, detail: str, *, retry_after: int | None = None, **extra: Any) -> None:
        self.retry_after = retry_after or self.default_retry_after
        # In the body too: a generated client hands callers the parsed body more readily than the headers.
        super().__init__(detail, retry_after=self.retry_after, **extra)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ProviderUnavailable(RetryLater):
    """Strava could not be reached or answered badly; nothing stored changed."""

    code, title = "provider_unavailable", "Strava unavailable"


class ProviderRateLimited(ProviderUnavailable):
    """Strava answered 429 (`from_strava`), or our shared budget is spent or paused."""

    code, title = "provider_rate_limited", "Strava rate limit reached"
    default_retry_after = 900

    def __init__(self, detail: str, *, retry_after: int | None = None, from_strava: bool = False, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)
        self.from_strava = from_strava


class ProviderMisconfigured(ProviderUnavailable):
    """Strava rejected *our application* (client id or secret): an operator problem, never the user's."""

    title = "Strava rejected the service's application credentials"
    default_retry_after = 300


class TokenUnreadable(RetryLater):
    """A stored ciphertext does not decrypt with the configured keys: our configuration, never the user's fault."""

    code, title = "token_unreadable", "Stored token cannot be decrypted"
    default_retry_after = 300


class DatabaseUnavailable(RetryLater):
    """The database did not answer; nothing was changed."""

    code, title = "database_unavailable", "Database unavailable"
    default_retry_after = 5


class OAuthCodeRejected(TokenServiceError):
    code, status, title = "invalid_code", 400, "Strava rejected the authorization code"


class Forbidden(TokenServiceError):
    code, status, title = "forbidden_origin", 403, "Origin not allowed"


class UnsupportedMediaType(TokenServiceError):
    code, status, title = "unsupported_media_type", 415, "Unsupported media type"


class WebhookForbidden(TokenServiceError):
    """A Strava subscription check with a verify token that is not ours (or none is configured)."""

    code, status, title = "forbidden", 403, "Forbidden"


class TooManyRequests(RetryLater):
    """A 429: this client must wait (Retry-After) before trying again (e.g. after failed sign-ins)."""

    code, status, title = "too_many_requests", 429, "Too many requests"


class InsufficientScope(TokenServiceError):
    """v1.1: Strava refused a gateway call for a permission the user's grant lacks; `missing_scope` names it and
    `authorize_url` asks for the stored scopes plus that one."""

    code, status, title = "insufficient_scope", 403, "Strava scope missing"

    def __init__(self, detail: str, *, missing_scope: str, authorize_url: str | None) -> None:
        super().__init__(detail, missing_scope=missing_scope, authorize_url=authorize_url)


class StravaRateLimited(RetryLater):
    """v1.1: a gateway call found its share of the app's Strava window spent (or Strava answered 429); nothing
    was sent to Strava for it (or Strava refused it)."""

    code, status, title = "strava_rate_limited", 429, "Strava rate limit reached"
    default_retry_after = 900
