"""The Strava client at its HTTP boundary: what it sends, how it reads answers, and how every failure is typed."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
import respx
import stamina

from tokensvc.providers.strava import (
    ProviderCapacityError,
    ProviderConfigError,
    ProviderEndpointMissing,
    ProviderError,
    ProviderRejectedError,
    ProviderRequestError,
    ProviderTransientError,
    PushSubscription,
    RateLimitUsage,
    RejectedReason,
    StravaClient,
    TokenGrant,
    seconds_to_next_window,
)

BASE = "https://strava.test"
CLIENT_ID = "cid"
CLIENT_SECRET = "csecret"
ACCESS = "a" * 40
REFRESH = "r" * 40
NEW_ACCESS = "b" * 40
NEW_REFRESH = "s" * 40
EXPIRES_AT = 1_568_775_134
ATHLETE_ID = 134_815
# 2027-01-15 10:07:30 UTC: 450 s before the 10:15 window reset.
NOW = datetime(2027, 1, 15, 10, 7, 30, tzinfo=UTC).timestamp()

REFRESH_BODY: dict[str, Any] = {
    "token_type": "Bearer",
    "access_token": NEW_ACCESS,
    "expires_at": EXPIRES_AT,
    "expires_in": 20_566,
    "refresh_token": NEW_REFRESH,
}
EXCHANGE_BODY: dict[str, Any] = {
    "token_type": "Bearer",
    "expires_at": EXPIRES_AT,
    "expires_in": 21_600,
    "refresh_token": NEW_REFRESH,
    "access_token": NEW_ACCESS,
    "athlete": {"id": ATHLETE_ID, "username": "marianne", "firstname": "Marianne", "lastname": "T"},
}


def strava_error(message: str, resource: str, field: str, code: str) -> dict[str, Any]:
    """Strava's error body shape."""
    return {"message": message, "errors": [{"resource": resource, "field": field, "code": code}]}


def sent_form(route: respx.Route) -> dict[str, str]:
    """The form the last call on `route` carried, as a plain dict (blank values kept)."""
    request = route.calls.last.request
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    return dict(parse_qsl(request.content.decode(), keep_blank_values=True, strict_parsing=True))


class FakeClock:
    """Injected time: tests set it instead of sleeping."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def retries_without_waiting() -> Iterator[None]:
    """No backoff sleeps; `cap=True` keeps the client's own `connect_attempts` as the number of attempts."""
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


@pytest.fixture
def strava_api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False, assert_all_mocked=True) as router:
        yield router


@pytest.fixture
def token_route(strava_api: respx.MockRouter) -> respx.Route:
    return strava_api.post("/oauth/token")


@pytest.fixture
def deauth_route(strava_api: respx.MockRouter) -> respx.Route:
    return strava_api.post("/oauth/deauthorize")


def make_client(clock: FakeClock, **settings: Any) -> StravaClient:
    """The client the tests use (this file's app, a 2 s timeout, the fake clock) with `settings` on top."""
    return StravaClient(
        base_url=BASE, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, timeout=2.0, clock=clock, **settings
    )


@pytest.fixture
def usages() -> list[RateLimitUsage]:
    """Every rate-limit reading the `strava` client reported (its `on_usage`, which feeds the shared budget)."""
    return []


@pytest.fixture
async def strava(
    strava_api: respx.MockRouter, clock: FakeClock, usages: list[RateLimitUsage]
) -> AsyncIterator[StravaClient]:
    client = make_client(clock, on_usage=usages.append)
    try:
        yield client
    finally:
        await client.aclose()


async def call(strava: StravaClient, operation: str) -> None:
    """Run one of the client's Strava calls by name."""
    if operation == "refresh":
        await strava.refresh(REFRESH)
    elif operation == "exchange":
        await strava.exchange_code("the-code")
    else:
        await strava.deauthorize(ACCESS)


def assert_no_secret_in(error: BaseException) -> None:
    """Neither the app secret nor any token reaches an error's text."""
    text = f"{error} {error!r} {getattr(error, 'errors', ())}"
    for secret in (CLIENT_SECRET, ACCESS, REFRESH, NEW_ACCESS, NEW_REFRESH):
        assert secret not in text


# --- what is sent -----------------------------------------------------------------------------------------------


class TestRefreshRequest:
    async def test_refresh_posts_the_refresh_grant_form_to_the_token_endpoint(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """A refresh is one POST /oauth/token with exactly client_id, client_secret, grant_type and refresh_token."""
        token_route.respond(200, json=REFRESH_BODY)

        await strava.refresh(REFRESH)

        assert token_route.call_count == 1
        assert token_route.calls.last.request.url == httpx.URL(f"{BASE}/oauth/token")
        assert sent_form(token_route) == {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "grant_type": "refresh_token",
            "refresh_token": REFRESH,
        }


class TestCodeExchangeRequest:
    async def test_exchange_posts_the_authorization_code_form_without_redirect_uri(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """A code exchange sends client_id, client_secret, code and grant_type=authorization_code, nothing else."""
        token_route.respond(200, json=EXCHANGE_BODY)

        await strava.exchange_code("the-code")

        assert token_route.call_count == 1
        assert token_route.calls.last.request.url == httpx.URL(f"{BASE}/oauth/token")
        assert sent_form(token_route) == {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "code": "the-code",
            "grant_type": "authorization_code",
        }


class TestDeauthorizeRequest:
    async def test_deauthorize_posts_the_access_token_to_the_deauthorize_endpoint(
        self, strava: StravaClient, deauth_route: respx.Route, token_route: respx.Route
    ) -> None:
        """Deauthorize is one POST /oauth/deauthorize carrying only the access token; a 200 raises nothing."""
        deauth_route.respond(200, json={"access_token": ACCESS})

        await strava.deauthorize(ACCESS)

        assert deauth_route.call_count == 1
        assert token_route.call_count == 0
        assert deauth_route.calls.last.request.url == httpx.URL(f"{BASE}/oauth/deauthorize")
        assert sent_form(deauth_route) == {"access_token": ACCESS}


class TestRevokeRequest:
    async def test_revoke_posts_the_refresh_token_with_basic_client_credentials(
        self, strava: StravaClient, strava_api: respx.MockRouter
    ) -> None:
        """One POST /oauth/revoke: HTTP Basic client_id:client_secret, form token + token_type_hint, nothing else."""
        route = strava_api.post("/oauth/revoke").respond(200, json={})

        assert await strava.revoke(REFRESH) == "revoked"

        assert route.call_count == 1
        request = route.calls.last.request
        assert request.url == httpx.URL(f"{BASE}/oauth/revoke")
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        assert request.headers["authorization"] == expected
        assert sent_form(route) == {"token": REFRESH, "token_type_hint": "refresh_token"}

    async def test_a_404_is_the_endpoint_missing(self, strava: StravaClient, strava_api: respx.MockRouter) -> None:
        """404: Strava has no /oauth/revoke (yet): a typed error the caller falls back on."""
        strava_api.post("/oauth/revoke").respond(404, text="Not Found")
        with pytest.raises(ProviderEndpointMissing):
            await strava.revoke(REFRESH)

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (400, strava_error("Bad Request", "Token", "token", "invalid")),
            (401, strava_error("Authorization Error", "Athlete", "access_token", "invalid")),
        ],
    )
    async def test_strava_calling_the_token_invalid_is_token_dead(
        self, strava: StravaClient, strava_api: respx.MockRouter, status: int, body: dict[str, Any]
    ) -> None:
        """A 400/401 whose errors say `invalid` about the token: nothing is left to revoke."""
        strava_api.post("/oauth/revoke").respond(status, json=body)
        assert await strava.revoke(REFRESH) == "token_dead"

    @pytest.mark.parametrize(
        ("status", "body", "error"),
        [
            (401, strava_error("Authorization Error", "Application", "", "invalid"), ProviderConfigError),
            (400, None, ProviderTransientError),  # a bare 400 proves nothing about the token
            (503, None, ProviderTransientError),
            (429, strava_error("Rate Limit Exceeded", "Application", "rate limit", "exceeded"), ProviderTransientError),
        ],
    )
    async def test_other_answers_are_not_a_confirmation(
        self,
        strava: StravaClient,
        strava_api: respx.MockRouter,
        status: int,
        body: dict[str, Any] | None,
        error: type[ProviderError],
    ) -> None:
        """Our credentials refused, a bare 400, 5xx, 429: raised (the caller retries), never taken as revoked."""
        route = strava_api.post("/oauth/revoke")
        route.respond(status, json=body) if body is not None else route.respond(status, text="oops")
        with pytest.raises(error):
            await strava.revoke(REFRESH)

    async def test_a_404_from_deauthorize_is_the_endpoint_missing(
        self, strava: StravaClient, deauth_route: respx.Route
    ) -> None:
        """The legacy endpoint retired (a 404) is typed the same way."""
        deauth_route.respond(404, text="Not Found")
        with pytest.raises(ProviderEndpointMissing):
            await strava.deauthorize(ACCESS)


# --- successful answers -----------------------------------------------------------------------------------------


class TestTokenResponseParsing:
    async def test_a_rotated_refresh_response_yields_both_new_tokens(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """A refresh response becomes a TokenGrant with the new pair, Strava's expires_at and no athlete id."""
        token_route.respond(200, json=REFRESH_BODY)

        grant = await strava.refresh(REFRESH)

        assert grant == TokenGrant(
            access_token=NEW_ACCESS, refresh_token=NEW_REFRESH, expires_at=EXPIRES_AT, athlete_id=None
        )

    async def test_a_refresh_response_without_refresh_token_leaves_it_none(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """No `refresh_token` in the answer means `refresh_token is None` (the stored one stays)."""
        body = {k: v for k, v in REFRESH_BODY.items() if k != "refresh_token"}
        token_route.respond(200, json=body)

        grant = await strava.refresh(REFRESH)

        assert grant.refresh_token is None
        assert grant.access_token == NEW_ACCESS
        assert grant.expires_at == EXPIRES_AT

    async def test_an_exchange_response_carries_the_athlete_id(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """The code exchange reads `athlete.id` into the grant alongside the token pair."""
        token_route.respond(200, json=EXCHANGE_BODY)

        grant = await strava.exchange_code("the-code")

        assert grant == TokenGrant(
            access_token=NEW_ACCESS, refresh_token=NEW_REFRESH, expires_at=EXPIRES_AT, athlete_id=ATHLETE_ID
        )

    async def test_the_repr_of_a_grant_never_shows_a_token(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """`repr(TokenGrant)` (what a log line would print) contains neither token, only expiry and athlete."""
        token_route.respond(200, json=EXCHANGE_BODY)

        grant = await strava.exchange_code("the-code")

        text = repr(grant)
        assert NEW_ACCESS not in text
        assert NEW_REFRESH not in text
        assert str(EXPIRES_AT) in text
        assert str(ATHLETE_ID) in text


# --- Strava's error table ---------------------------------------------------------------------------------------


class TestCredentialRejections:
    @pytest.mark.parametrize(
        ("operation", "status", "body", "reason"),
        [
            pytest.param(
                "refresh",
                400,
                strava_error("Bad Request", "RefreshToken", "refresh_token", "invalid"),
                "refresh_token_invalid",
                id="refresh-token-invalid",
            ),
            pytest.param(
                "exchange",
                400,
                strava_error("Bad Request", "AuthorizationCode", "code", "invalid"),
                "code_invalid",
                id="authorization-code-invalid",
            ),
            pytest.param(
                "exchange",
                400,
                strava_error("Bad Request", "RequestToken", "code", "invalid"),
                "code_invalid",
                id="older-request-token-invalid",
            ),
            pytest.param(
                "exchange",
                400,
                strava_error("Bad Request", "AuthorizationCode", "", "expired"),
                "code_expired",
                id="authorization-code-expired",
            ),
            pytest.param(
                "deauthorize",
                401,
                strava_error("Authorization Error", "Athlete", "access_token", "invalid"),
                "access_token_invalid",
                id="access-token-invalid",
            ),
            pytest.param(
                "deauthorize",
                401,
                strava_error("Authorization Error", "AccessToken", "activity:read_permission", "missing"),
                "scope_missing",
                id="scope-missing",
            ),
        ],
    )
    async def test_a_dead_user_credential_is_a_rejection_with_its_reason(
        self,
        strava: StravaClient,
        strava_api: respx.MockRouter,
        operation: str,
        status: int,
        body: dict[str, Any],
        reason: RejectedReason,
    ) -> None:
        """Each user-credential row of the error table raises ProviderRejectedError with the matching reason."""
        strava_api.post("/oauth/token").respond(status, json=body)
        strava_api.post("/oauth/deauthorize").respond(status, json=body)

        with pytest.raises(ProviderRejectedError) as caught:
            await call(strava, operation)

        error = caught.value
        assert error.reason == reason
        assert error.status_code == status
        triple = body["errors"][0]
        assert error.errors == (f"{triple['resource']}/{triple['field']}/{triple['code']}",)
        assert len(strava_api.calls) == 1
        assert_no_secret_in(error)


class TestApplicationRejections:
    @pytest.mark.parametrize(
        ("status", "body"),
        [
            pytest.param(
                400, strava_error("Bad Request", "Application", "client_id", "invalid"), id="unknown-client-id"
            ),
            pytest.param(401, strava_error("Authorization Error", "Application", "", "invalid"), id="wrong-secret"),
        ],
    )
    @pytest.mark.parametrize("operation", ["refresh", "exchange"])
    async def test_a_rejected_client_id_or_secret_is_a_config_error_not_the_users_fault(
        self, strava: StravaClient, token_route: respx.Route, status: int, body: dict[str, Any], operation: str
    ) -> None:
        """`Application` errors (400 bad client_id, 401 bad secret) raise ProviderConfigError, never a rejection."""
        token_route.respond(status, json=body)

        with pytest.raises(ProviderConfigError) as caught:
            await call(strava, operation)

        assert not isinstance(caught.value, ProviderRejectedError | ProviderTransientError)
        assert caught.value.status_code == status
        assert token_route.call_count == 1
        assert_no_secret_in(caught.value)


class TestRateLimited:
    RATE_LIMITED = strava_error("Rate Limit Exceeded", "Application", "rate limit", "exceeded")

    async def test_a_429_with_retry_after_uses_that_delay(self, strava: StravaClient, token_route: respx.Route) -> None:
        """A 429 is transient and rate-limited, and a numeric Retry-After is passed through as retry_after."""
        token_route.respond(429, json=self.RATE_LIMITED, headers={"Retry-After": "120"})

        with pytest.raises(ProviderTransientError) as caught:
            await strava.refresh(REFRESH)

        assert caught.value.rate_limited is True
        assert caught.value.retry_after == 120
        assert caught.value.status_code == 429
        assert caught.value.answer_lost is False
        assert token_route.call_count == 1

    @pytest.mark.parametrize(
        ("now", "expected"),
        [
            pytest.param(NOW, 450, id="10:07:30"),
            pytest.param(datetime(2027, 1, 15, 10, 0, 0, tzinfo=UTC).timestamp(), 900, id="10:00:00"),
            pytest.param(datetime(2027, 1, 15, 23, 59, 59, tzinfo=UTC).timestamp(), 1, id="23:59:59"),
        ],
    )
    async def test_a_429_without_retry_after_waits_for_the_next_quarter_hour(
        self, strava: StravaClient, token_route: respx.Route, clock: FakeClock, now: float, expected: int
    ) -> None:
        """Without Retry-After, retry_after is the seconds from the injected clock to the next :00/:15/:30/:45."""
        clock.now = now
        token_route.respond(429, json=self.RATE_LIMITED)

        with pytest.raises(ProviderTransientError) as caught:
            await strava.refresh(REFRESH)

        assert caught.value.rate_limited is True
        assert caught.value.retry_after == expected
        assert token_route.call_count == 1

    async def test_a_429_is_never_a_config_error_although_its_resource_is_application(
        self, strava: StravaClient, deauth_route: respx.Route
    ) -> None:
        """The 429 body names `Application`, yet it is a transient rate limit, on the API endpoints too."""
        deauth_route.respond(429, json=self.RATE_LIMITED)

        with pytest.raises(ProviderTransientError) as caught:
            await strava.deauthorize(ACCESS)

        assert not isinstance(caught.value, ProviderConfigError)
        assert caught.value.rate_limited is True
        assert caught.value.retry_after == 450

    async def test_a_retry_after_that_is_not_ascii_digits_falls_back_to_the_window(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """A Retry-After byte like 0xB2 ('²', which `str.isdigit` accepts) still yields a typed transient error."""
        token_route.respond(429, json=self.RATE_LIMITED, headers={b"Retry-After": b"\xb2"})

        with pytest.raises(ProviderTransientError) as caught:
            await strava.refresh(REFRESH)

        assert caught.value.rate_limited is True
        assert caught.value.retry_after == 450


class TestStravaSideFailures:
    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_a_5xx_with_a_json_body_is_transient(
        self, strava: StravaClient, token_route: respx.Route, status: int
    ) -> None:
        """Any 5xx is a transient error, not rate-limited, with its status kept."""
        token_route.respond(status, json={"message": "error", "errors": []})

        with pytest.raises(ProviderTransientError) as caught:
            await strava.refresh(REFRESH)

        assert caught.value.status_code == status
        assert caught.value.rate_limited is False
        assert caught.value.retry_after is None
        assert token_route.call_count == 1

    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_a_5xx_with_an_html_body_is_transient(
        self, strava: StravaClient, token_route: respx.Route, status: int
    ) -> None:
        """A 5xx whose body is an HTML error page (not JSON) is still classified as transient."""
        token_route.respond(
            status, text="<html><body><h1>502 Bad Gateway</h1></body></html>", headers={"Content-Type": "text/html"}
        )

        with pytest.raises(ProviderTransientError) as caught:
            await strava.exchange_code("the-code")

        assert caught.value.status_code == status
        assert caught.value.errors == ()

    async def test_a_5xx_naming_a_refresh_token_is_still_transient(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """A 5xx never proves the user's credential dead, whatever its body says."""
        token_route.respond(500, json=strava_error("Server Error", "RefreshToken", "refresh_token", "invalid"))

        with pytest.raises(ProviderTransientError):
            await strava.refresh(REFRESH)


class TestUnrecognisedRefusals:
    @pytest.mark.parametrize(
        ("status", "response"),
        [
            pytest.param(400, httpx.Response(400, json={"message": "Bad Request", "errors": []}), id="400-no-errors"),
            pytest.param(400, httpx.Response(400, text="Bad Request"), id="400-not-json"),
            pytest.param(400, httpx.Response(400, json=["unexpected"]), id="400-json-list"),
            pytest.param(
                400, httpx.Response(400, json=strava_error("Bad Request", "Activity", "id", "invalid")), id="400-other"
            ),
            pytest.param(
                400,
                httpx.Response(400, json=strava_error("Bad Request", "Athlete", "access_token", "invalid")),
                id="400-athlete-not-401",
            ),
            pytest.param(
                403,
                httpx.Response(403, json={"message": "Limit of connected athletes exceeded", "errors": []}),
                id="403-athlete-limit",
            ),
            pytest.param(
                403,
                httpx.Response(403, json=strava_error("Forbidden", "RefreshToken", "refresh_token", "invalid")),
                id="403-refresh-token",
            ),
            pytest.param(403, httpx.Response(403, text="<html>Forbidden</html>"), id="403-html"),
        ],
    )
    async def test_an_unrecognised_refusal_is_transient_never_a_rejection(
        self, strava: StravaClient, token_route: respx.Route, status: int, response: httpx.Response
    ) -> None:
        """A 400/403 that matches no row of the table is transient: a false needs_reauth would strand the user."""
        token_route.mock(return_value=response)

        with pytest.raises(ProviderTransientError) as caught:
            await strava.refresh(REFRESH)

        assert not isinstance(caught.value, ProviderRejectedError | ProviderConfigError)
        assert caught.value.status_code == status
        assert caught.value.rate_limited is False
        assert token_route.call_count == 1


class TestAthleteCapacity:
    @pytest.mark.parametrize(
        "response",
        [
            pytest.param(
                httpx.Response(403, json={"message": "Limit of connected athletes exceeded", "errors": []}),
                id="message",
            ),
            pytest.param(
                httpx.Response(403, json=strava_error("Forbidden", "Athlete", "", "limit exceeded")), id="error-code"
            ),
        ],
    )
    async def test_an_exchange_refused_for_the_apps_athlete_capacity_is_a_capacity_error(
        self, strava: StravaClient, token_route: respx.Route, response: httpx.Response
    ) -> None:
        """Strava's 403 for one athlete more than the app may connect: neither transient nor the user's fault."""
        token_route.mock(return_value=response)

        with pytest.raises(ProviderCapacityError) as caught:
            await strava.exchange_code("the-code")

        assert caught.value.status_code == 403
        assert token_route.call_count == 1

    @pytest.mark.parametrize(
        "response",
        [
            pytest.param(httpx.Response(403, text="<html>Forbidden</html>"), id="html"),
            pytest.param(httpx.Response(403, json={"message": "Forbidden", "errors": []}), id="other-403"),
            pytest.param(httpx.Response(403, json=["Limit of connected athletes exceeded"]), id="json-list"),
        ],
    )
    async def test_another_403_of_an_exchange_stays_transient(
        self, strava: StravaClient, token_route: respx.Route, response: httpx.Response
    ) -> None:
        token_route.mock(return_value=response)

        with pytest.raises(ProviderTransientError):
            await strava.exchange_code("the-code")


class TestMalformedSuccess:
    @pytest.mark.parametrize(
        "response",
        [
            pytest.param(httpx.Response(200, text="<html>OK</html>"), id="not-json"),
            pytest.param(httpx.Response(200, json=[REFRESH_BODY]), id="json-list"),
            pytest.param(httpx.Response(200, json=None), id="json-null"),
            pytest.param(
                httpx.Response(200, json={k: v for k, v in REFRESH_BODY.items() if k != "access_token"}),
                id="no-access-token",
            ),
            pytest.param(httpx.Response(200, json=REFRESH_BODY | {"access_token": ""}), id="empty-access-token"),
            pytest.param(httpx.Response(200, json=REFRESH_BODY | {"access_token": 12345}), id="numeric-access-token"),
            pytest.param(
                httpx.Response(200, json={k: v for k, v in REFRESH_BODY.items() if k != "expires_at"}),
                id="no-expires-at",
            ),
            pytest.param(httpx.Response(200, json=REFRESH_BODY | {"expires_at": str(EXPIRES_AT)}), id="expires-at-str"),
            pytest.param(httpx.Response(200, json=REFRESH_BODY | {"expires_at": True}), id="expires-at-bool"),
            pytest.param(httpx.Response(200, json=REFRESH_BODY | {"refresh_token": ""}), id="refresh-token-empty"),
            pytest.param(httpx.Response(200, json=REFRESH_BODY | {"refresh_token": 42}), id="refresh-token-number"),
        ],
    )
    async def test_a_200_that_is_not_a_token_response_is_transient(
        self, strava: StravaClient, token_route: respx.Route, response: httpx.Response
    ) -> None:
        """A 200 without a usable access token, integer expiry and (if present) non-empty refresh token is transient."""
        token_route.mock(return_value=response)

        with pytest.raises(ProviderTransientError) as caught:
            await strava.refresh(REFRESH)

        assert caught.value.status_code == 200
        assert caught.value.answer_lost is False
        assert token_route.call_count == 1
        assert_no_secret_in(caught.value)


# --- transport failures and retries -----------------------------------------------------------------------------


class TestNeverSentRequestsAreRetried:
    @pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
    async def test_a_request_that_never_left_is_retried_until_it_succeeds(
        self, strava: StravaClient, token_route: respx.Route, error: type[httpx.TransportError]
    ) -> None:
        """Connect refused / connect timeout / no pool slot twice, then success: the grant, after exactly 3 calls."""
        token_route.mock(side_effect=[error, error, httpx.Response(200, json=REFRESH_BODY)])

        grant = await strava.refresh(REFRESH)

        assert grant.access_token == NEW_ACCESS
        assert token_route.call_count == 3
        for call in token_route.calls:
            assert dict(parse_qsl(call.request.content.decode()))["refresh_token"] == REFRESH

    @pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout])
    async def test_exhausted_attempts_are_transient_and_the_answer_is_not_lost(
        self, strava: StravaClient, token_route: respx.Route, error: type[httpx.TransportError]
    ) -> None:
        """After the default 3 attempts all fail to connect: ProviderTransientError(answer_lost=False), 3 calls."""
        token_route.mock(side_effect=error)

        with pytest.raises(ProviderTransientError) as caught:
            await strava.refresh(REFRESH)

        assert caught.value.answer_lost is False
        assert caught.value.rate_limited is False
        assert caught.value.status_code is None
        assert isinstance(caught.value.__cause__, error)
        assert token_route.call_count == 3

    async def test_the_clients_connect_attempts_sets_the_number_of_tries(
        self, strava_api: respx.MockRouter, token_route: respx.Route, clock: FakeClock
    ) -> None:
        """`connect_attempts=5` means five connection attempts before giving up."""
        token_route.mock(side_effect=httpx.ConnectError)
        client = make_client(clock, connect_attempts=5)
        try:
            with pytest.raises(ProviderTransientError):
                await client.refresh(REFRESH)
        finally:
            await client.aclose()

        assert token_route.call_count == 5

    async def test_a_retried_deauthorize_succeeds_after_a_refused_connection(
        self, strava: StravaClient, deauth_route: respx.Route
    ) -> None:
        """Retries are not refresh-only: deauthorize also survives a refused connection."""
        deauth_route.mock(side_effect=[httpx.ConnectError, httpx.Response(200, json={"access_token": ACCESS})])

        await strava.deauthorize(ACCESS)

        assert deauth_route.call_count == 2


class TestLostAnswersAreNotRetried:
    @pytest.mark.parametrize(
        "error", [httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError, httpx.ReadError]
    )
    async def test_a_request_that_may_have_reached_strava_is_sent_once(
        self, strava: StravaClient, token_route: respx.Route, error: type[httpx.TransportError]
    ) -> None:
        """A failure after sending (read timeout, protocol error …): exactly 1 call, then answer_lost=True."""
        token_route.mock(side_effect=[error, httpx.Response(200, json=REFRESH_BODY)])

        with pytest.raises(ProviderTransientError) as caught:
            await strava.refresh(REFRESH)

        assert caught.value.answer_lost is True
        assert caught.value.status_code is None
        assert isinstance(caught.value.__cause__, error)
        assert token_route.call_count == 1

    async def test_a_lost_exchange_answer_is_not_retried_either(
        self, strava: StravaClient, token_route: respx.Route
    ) -> None:
        """A code is single-use: a read timeout on the exchange is one call and answer_lost=True."""
        token_route.mock(side_effect=[httpx.ReadTimeout, httpx.Response(200, json=EXCHANGE_BODY)])

        with pytest.raises(ProviderTransientError) as caught:
            await strava.exchange_code("the-code")

        assert caught.value.answer_lost is True
        assert token_route.call_count == 1


# --- rate-limit headers -----------------------------------------------------------------------------------------


class TestRateLimitHeaders:
    async def test_no_usage_is_known_before_any_call(self, strava: StravaClient, usages: list[RateLimitUsage]) -> None:
        """A fresh client reports no rate-limit usage."""
        assert usages == []

    @pytest.mark.parametrize(
        ("limit_name", "usage_name"),
        [
            ("X-RateLimit-Limit", "X-RateLimit-Usage"),
            ("x-ratelimit-limit", "x-ratelimit-usage"),
            ("X-RATELIMIT-LIMIT", "X-RATELIMIT-USAGE"),
        ],
    )
    async def test_the_headers_are_read_in_any_case(
        self,
        strava: StravaClient,
        deauth_route: respx.Route,
        usages: list[RateLimitUsage],
        limit_name: str,
        usage_name: str,
    ) -> None:
        """`X-RateLimit-Limit`/`-Usage` ("15min,daily") become the reported usage, whatever the header case."""
        deauth_route.respond(200, json={"access_token": ACCESS}, headers={limit_name: "200,2000", usage_name: "12,340"})

        await strava.deauthorize(ACCESS)

        assert usages == [RateLimitUsage(limit_15min=200, limit_daily=2000, usage_15min=12, usage_daily=340)]

    async def test_the_headers_of_a_429_are_recorded_too(
        self, strava: StravaClient, deauth_route: respx.Route, usages: list[RateLimitUsage]
    ) -> None:
        """A rejected call still reports usage: the headers of a 429 are reported too."""
        deauth_route.respond(
            429,
            json=TestRateLimited.RATE_LIMITED,
            headers={"X-RateLimit-Limit": "200,2000", "X-RateLimit-Usage": "201,900"},
        )

        with pytest.raises(ProviderTransientError):
            await strava.deauthorize(ACCESS)

        assert usages == [RateLimitUsage(200, 2000, 201, 900)]

    @pytest.mark.parametrize(
        "headers",
        [
            pytest.param({}, id="absent"),
            pytest.param({"X-RateLimit-Limit": "200,2000"}, id="usage-missing"),
            pytest.param({"X-RateLimit-Usage": "1,2"}, id="limit-missing"),
            pytest.param({"X-RateLimit-Limit": "200", "X-RateLimit-Usage": "1"}, id="one-part"),
            pytest.param({"X-RateLimit-Limit": "200,2000,5", "X-RateLimit-Usage": "1,2,3"}, id="three-parts"),
            pytest.param({"X-RateLimit-Limit": "abc,def", "X-RateLimit-Usage": "1,2"}, id="not-numbers"),
            pytest.param({"X-RateLimit-Limit": "200,", "X-RateLimit-Usage": "1,2"}, id="empty-part"),
            pytest.param({"X-RateLimit-Limit": "", "X-RateLimit-Usage": ""}, id="empty"),
        ],
    )
    async def test_malformed_headers_are_ignored_and_keep_the_last_good_reading(
        self, strava: StravaClient, deauth_route: respx.Route, usages: list[RateLimitUsage], headers: dict[str, str]
    ) -> None:
        """A response with missing or malformed rate headers neither raises nor reports a reading: the previous one
        stands."""
        good = {"X-RateLimit-Limit": "200,2000", "X-RateLimit-Usage": "5,50"}
        deauth_route.mock(
            side_effect=[
                httpx.Response(200, json={"access_token": ACCESS}, headers=good),
                httpx.Response(200, json={"access_token": ACCESS}, headers=headers),
            ]
        )

        await strava.deauthorize(ACCESS)
        await strava.deauthorize(ACCESS)

        assert usages == [RateLimitUsage(200, 2000, 5, 50)]
        assert deauth_route.call_count == 2

    @pytest.mark.parametrize(
        "headers",
        [
            pytest.param({"X-RateLimit-Limit": "abc,def", "X-RateLimit-Usage": "1,2"}, id="not-numbers"),
            pytest.param({"X-RateLimit-Limit": "1;2", "X-RateLimit-Usage": "1;2"}, id="wrong-separator"),
        ],
    )
    def test_from_headers_returns_none_for_malformed_values(self, headers: dict[str, str]) -> None:
        """`RateLimitUsage.from_headers` answers None rather than raising on values it cannot read."""
        assert RateLimitUsage.from_headers(httpx.Headers(headers)) is None


class TestSecondsToNextWindow:
    @pytest.mark.parametrize(
        ("moment", "expected"),
        [
            pytest.param(datetime(2027, 1, 15, 10, 7, 30, tzinfo=UTC), 450, id="10:07:30"),
            pytest.param(datetime(2027, 1, 15, 10, 0, 0, tzinfo=UTC), 900, id="on-the-boundary"),
            pytest.param(datetime(2027, 1, 15, 10, 14, 59, tzinfo=UTC), 1, id="10:14:59"),
            pytest.param(datetime(2027, 1, 15, 10, 15, 1, tzinfo=UTC), 899, id="10:15:01"),
            pytest.param(datetime(2027, 1, 15, 10, 44, 0, tzinfo=UTC), 60, id="10:44:00"),
            pytest.param(datetime(2027, 1, 15, 23, 50, 0, tzinfo=UTC), 600, id="before-midnight"),
        ],
    )
    def test_it_counts_to_the_next_quarter_hour_utc(self, moment: datetime, expected: int) -> None:
        """The wait is the seconds to the next :00/:15/:30/:45 UTC; a full window on the boundary itself."""
        assert seconds_to_next_window(moment.timestamp()) == expected

    def test_a_fraction_of_a_second_left_still_waits_at_least_one_second(self) -> None:
        """Never 0: half a second before the reset rounds up to 1."""
        moment = datetime(2027, 1, 15, 10, 14, 59, tzinfo=UTC).timestamp() + 0.5
        assert seconds_to_next_window(moment) == 1


# --- consent URL ------------------------------------------------------------------------------------------------


class TestAuthorizeUrl:
    async def test_it_carries_every_consent_parameter(self, strava: StravaClient) -> None:
        """The consent URL names client_id, redirect_uri, response_type=code, approval_prompt, scopes and state."""
        url = strava.authorize_url(
            redirect_uri="https://app.example/callback?next=/home",
            scopes=["read", "activity:read_all"],
            state="st&ate=1",
            approval_prompt="force",
        )

        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{BASE}/oauth/authorize"
        assert parse_qs(parts.query, strict_parsing=True) == {
            "client_id": [CLIENT_ID],
            "redirect_uri": ["https://app.example/callback?next=/home"],
            "response_type": ["code"],
            "approval_prompt": ["force"],
            "scope": ["read,activity:read_all"],
            "state": ["st&ate=1"],
        }

    async def test_its_values_are_url_encoded(self, strava: StravaClient) -> None:
        """Reserved characters in redirect_uri, scope and state are percent-encoded, not passed raw."""
        url = strava.authorize_url(
            redirect_uri="https://app.example/cb?x=1&y=2", scopes=["read", "activity:read_all"], state="a b&c"
        )

        query = urlsplit(url).query
        assert "redirect_uri=https%3A%2F%2Fapp.example%2Fcb%3Fx%3D1%26y%3D2" in query
        assert "scope=read%2Cactivity%3Aread_all" in query
        assert "&y=2" not in query
        assert "state=a+b%26c" in query

    async def test_approval_prompt_defaults_to_auto(self, strava: StravaClient) -> None:
        """Without an explicit approval_prompt the URL asks for `auto`."""
        url = strava.authorize_url(redirect_uri="http://localhost/cb", scopes=["read"], state="s")

        assert parse_qs(urlsplit(url).query)["approval_prompt"] == ["auto"]

    async def test_building_the_url_sends_nothing(self, strava: StravaClient, strava_api: respx.MockRouter) -> None:
        """Building the consent URL is pure: no request goes to Strava."""
        strava.authorize_url(redirect_uri="http://localhost/cb", scopes=["read"], state="s")

        assert len(strava_api.calls) == 0


def test_every_provider_error_shares_one_root() -> None:
    """Callers can catch ProviderError for any of the three kinds."""
    for kind in (ProviderTransientError, ProviderRejectedError, ProviderConfigError):
        assert issubclass(kind, ProviderError)


class TestCheckAccess:
    @pytest.mark.parametrize(
        ("status", "body", "alive"),
        [
            (200, {"id": ATHLETE_ID}, True),
            (401, strava_error("Authorization Error", "Athlete", "access_token", "invalid"), False),
            (401, strava_error("Authorization Error", "AccessToken", "activity:read_permission", "missing"), True),
        ],
    )
    async def test_the_athlete_endpoint_says_whether_the_token_is_alive(
        self, strava: StravaClient, strava_api: respx.MockRouter, status: int, body: dict[str, Any], alive: bool
    ) -> None:
        """GET /api/v3/athlete with the token as Bearer: 401 for the token is dead; a scope refusal is alive."""
        route = strava_api.get("/api/v3/athlete").respond(status, json=body)
        assert await strava.check_access(ACCESS) is alive
        assert route.calls.last.request.headers["authorization"] == f"Bearer {ACCESS}"

    @pytest.mark.parametrize("status", [429, 500, 503, 401])
    async def test_anything_else_is_not_an_answer(
        self, strava: StravaClient, strava_api: respx.MockRouter, status: int
    ) -> None:
        """429, 5xx and an unrecognised 401 are transient: never read as a revocation (I3)."""
        strava_api.get("/api/v3/athlete").respond(status, json={"message": "x", "errors": []})
        with pytest.raises(ProviderTransientError):
            await strava.check_access(ACCESS)


class TestPushSubscriptions:
    async def test_create_sends_the_app_credentials_callback_and_verify_token(
        self, strava: StravaClient, strava_api: respx.MockRouter
    ) -> None:
        route = strava_api.post("/api/v3/push_subscriptions").respond(201, json={"id": 120475})
        assert await strava.create_subscription("https://svc.test/v1/webhooks/strava", "vt") == 120475
        assert sent_form(route) == {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "callback_url": "https://svc.test/v1/webhooks/strava",
            "verify_token": "vt",
        }

    async def test_a_refused_subscription_says_why(self, strava: StravaClient, strava_api: respx.MockRouter) -> None:
        code = "GET to callback URL does not return 200"
        body = strava_error("Bad Request", "PushSubscription", "callback url", code)
        strava_api.post("/api/v3/push_subscriptions").respond(400, json=body)
        with pytest.raises(ProviderRequestError, match="callback URL does not return 200"):
            await strava.create_subscription("https://svc.test/v1/webhooks/strava", "vt")

    async def test_wrong_app_credentials_are_a_configuration_error(
        self, strava: StravaClient, strava_api: respx.MockRouter
    ) -> None:
        strava_api.get("/api/v3/push_subscriptions").respond(
            401, json=strava_error("Authorization Error", "Application", "", "invalid")
        )
        with pytest.raises(ProviderConfigError):
            await strava.list_subscriptions()

    async def test_list_and_delete(self, strava: StravaClient, strava_api: respx.MockRouter) -> None:
        listing = strava_api.get("/api/v3/push_subscriptions").respond(
            200, json=[{"id": 7, "callback_url": "https://svc.test/cb", "created_at": "2027-01-15T10:00:00Z"}]
        )
        deleting = strava_api.delete("/api/v3/push_subscriptions/7").respond(204)
        assert await strava.list_subscriptions() == [
            PushSubscription(id=7, callback_url="https://svc.test/cb", created_at="2027-01-15T10:00:00Z")
        ]
        await strava.delete_subscription(7)
        for route in (listing, deleting):
            assert dict(route.calls.last.request.url.params) == {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}


class TestTokenSlots:
    """TOKENSVC_STRAVA_TOKEN_CONCURRENCY bounds /oauth/token calls per process; the wait for a slot is not the call's
    own deadline (found by bench/slowstrava.py: queued refreshes were cut at Strava as "answer lost")."""

    async def test_a_call_queued_for_a_slot_keeps_its_whole_deadline(
        self, token_route: respx.Route, clock: FakeClock
    ) -> None:
        held = asyncio.Event()
        release = asyncio.Event()

        async def answer(_request: httpx.Request) -> httpx.Response:
            if not held.is_set():
                held.set()
                await release.wait()
            return httpx.Response(200, json=REFRESH_BODY)

        token_route.mock(side_effect=answer)
        client = make_client(clock, token_concurrency=1)
        try:
            first = asyncio.create_task(client.refresh(REFRESH, deadline_seconds=5.0))
            await held.wait()  # the one slot is taken, its call at Strava
            second = asyncio.create_task(client.refresh(REFRESH, deadline_seconds=0.2, slot_wait_seconds=5.0))
            await asyncio.sleep(0.4)  # the second waits for the slot longer than its own deadline
            release.set()
            assert (await first).access_token == NEW_ACCESS
            assert (await second).access_token == NEW_ACCESS  # sent once the slot was free, then answered in time
        finally:
            await client.aclose()
        assert token_route.call_count == 2

    async def test_no_slot_within_the_wait_is_a_transient_error_and_nothing_is_sent(
        self, token_route: respx.Route, clock: FakeClock
    ) -> None:
        sent = asyncio.Event()
        release = asyncio.Event()
        requests: list[httpx.Request] = []  # respx counts a call only once it is answered

        async def answer(request: httpx.Request) -> httpx.Response:
            requests.append(request)
            sent.set()
            await release.wait()
            return httpx.Response(200, json=REFRESH_BODY)

        token_route.mock(side_effect=answer)
        client = make_client(clock, token_concurrency=1)
        try:
            first = asyncio.create_task(client.refresh(REFRESH))
            await sent.wait()  # the one slot is taken, its call at Strava
            with pytest.raises(ProviderTransientError, match="not sent") as caught:
                await client.refresh(REFRESH, slot_wait_seconds=0.05)
            assert not caught.value.answer_lost
            assert len(requests) == 1  # the refused call never reached Strava
            release.set()
            await first
        finally:
            await client.aclose()
