"""Redirect allow-listing and the signed, expiring OAuth state (pure: no database, no HTTP)."""

from __future__ import annotations

import pytest

from tests.conftest import FakeClock
from tokensvc.errors import InvalidState, ValidationFailed
from tokensvc.providers.strava import StravaClient
from tokensvc.service.oauth import STATE_TTL_SECONDS, ConnectLinks, redirect_allowed, secret_hash, with_query

ALLOW = ["https://app.example.com/dashboard", "http://localhost:5173"]
DASH = "https://app.example.com/dashboard"


class TestRedirectAllowList:
    @pytest.mark.parametrize(
        "target",
        [
            "https://app.example.com/dashboard",
            "https://app.example.com/dashboard/",
            "https://app.example.com/dashboard/settings?tab=strava#top",
            "http://localhost:5173/",
            "http://localhost:5173/anything/at/all",
        ],
    )
    def test_targets_under_an_allowed_prefix_pass(self, target: str) -> None:
        """Same scheme, host and port, and the path under the prefix at a segment boundary."""
        assert redirect_allowed(target, ALLOW)

    @pytest.mark.parametrize(
        "target",
        [
            "//evil.example",
            "https://evil.example",
            "https://evil.example/dashboard",
            "https://app.example.com.evil.example/dashboard",
            "https://app.example.com@evil.example/dashboard",
            "https://user:pw@app.example.com/dashboard",
            "https:%2F%2Fevil.example",
            "https:/%2Fevil.example/dashboard",
            "%2F%2Fevil.example",
            "/dashboard",
            "https://app.example.com/dashboardevil",
            "https://app.example.com/other",
            "http://app.example.com/dashboard",
            "https://app.example.com:8443/dashboard",
            "https://evil.example\\@app.example.com/dashboard",
            "https://app.example.com/dashboard\r\nLocation: https://evil.example",
            "javascript:alert(1)//https://app.example.com/dashboard",
            "http://localhost:5174/",
            "http://localhost:notaport/",
            "",
            "https://app.example.com/dashboard/../evil",
            "https://app.example.com/dashboard/..",
            "https://app.example.com/dashboard/%2e%2e/admin",
            "https://app.example.com/dashboard/%2E%2e/admin",
            "https://app.example.com/dashboard/.%2e/admin",
            "https://app.example.com/dashboard/./x",
            "https://app.example.com/dashboard%2F..%2Fevil",
        ],
    )
    def test_open_redirect_attempts_are_refused(self, target: str) -> None:
        """Protocol-relative, foreign hosts, look-alike hosts, userinfo, encoded slashes, other paths or ports, dot
        segments (plain or percent-encoded) that a browser would resolve out of the prefix."""
        assert not redirect_allowed(target, ALLOW)

    def test_an_empty_allowlist_allows_nothing(self) -> None:
        """With TOKENSVC_REDIRECT_ALLOWLIST unset no redirect_to is accepted."""
        assert not redirect_allowed("https://app.example.com/dashboard", [])

    def test_with_query_keeps_existing_parameters(self) -> None:
        """`strava=connected` is added next to what the app put in its URL."""
        assert with_query("https://a.test/x?tab=1", strava="connected") == "https://a.test/x?tab=1&strava=connected"


@pytest.fixture
def links(clock: FakeClock) -> ConnectLinks:
    strava = StravaClient(base_url="https://strava.test", client_id="cid", client_secret="s")
    return ConnectLinks(
        strava=strava,
        secret="a-secret-of-at-least-32-characters!!",
        redirect_uri="https://tokens.test/v1/oauth/strava/callback",
        default_scopes=["read", "activity:read_all"],
        allowlist=ALLOW,
        clock=clock,
    )


def state_of(url: str) -> str:
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(url).query)["state"][0]


class TestState:
    def test_a_state_is_bound_to_its_user_and_redirect(self, links: ConnectLinks) -> None:
        """The callback learns user and redirect_to from the signed state alone."""
        url, expires_at = links.authorize_url("u-1", redirect_to="https://app.example.com/dashboard")
        claims = links.read_state(state_of(url))
        assert (claims.user_id, claims.redirect_to, claims.expires_at) == (
            "u-1",
            "https://app.example.com/dashboard",
            expires_at,
        )

    def test_every_state_is_different(self, links: ConnectLinks) -> None:
        """A fresh nonce per authorize URL: single use means one use of each."""
        first, second = (state_of(links.authorize_url("u-1", redirect_to=DASH)[0]) for _ in range(2))
        assert first != second
        assert links.read_state(first).nonce != links.read_state(second).nonce

    def test_a_state_expires_after_ten_minutes(self, links: ConnectLinks, clock: FakeClock) -> None:
        """Ten minutes is accepted, one second more is not."""
        state = state_of(links.authorize_url("u-1", redirect_to=DASH)[0])
        clock.advance(STATE_TTL_SECONDS)
        links.read_state(state)
        clock.advance(1)
        with pytest.raises(InvalidState):
            links.read_state(state)

    @pytest.mark.parametrize("mangle", [lambda s: s[:-2] + "xx", lambda s: "x" + s, lambda s: "", lambda s: "a.b.c"])
    def test_a_forged_or_tampered_state_is_refused(self, links: ConnectLinks, mangle: object) -> None:
        """Any change to the signed state makes it invalid."""
        assert callable(mangle)
        state = state_of(links.authorize_url("u-1", redirect_to=DASH)[0])
        with pytest.raises(InvalidState):
            links.read_state(mangle(state))

    def test_a_state_signed_with_another_secret_is_refused(self, links: ConnectLinks, clock: FakeClock) -> None:
        """Another deployment's (or an attacker's) secret does not make a valid state."""
        other = ConnectLinks(
            strava=StravaClient(base_url="https://strava.test", client_id="cid", client_secret="s"),
            secret="another-secret-of-at-least-32-chars!",
            redirect_uri="https://tokens.test/cb",
            default_scopes=["read"],
            allowlist=ALLOW,
            clock=clock,
        )
        with pytest.raises(InvalidState):
            links.read_state(state_of(other.authorize_url("u-1", redirect_to=DASH)[0]))

    def test_the_authorize_url_asks_strava_for_the_right_things(self, links: ConnectLinks) -> None:
        """client_id, our callback as redirect_uri, response_type=code, approval_prompt and the scopes."""
        from urllib.parse import parse_qs, urlsplit

        url, _ = links.authorize_url("u-1", redirect_to=DASH, scopes=["read", "activity:read"], approval_prompt="force")
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert (parts.scheme, parts.netloc, parts.path) == ("https", "strava.test", "/oauth/authorize")
        assert query["client_id"] == "cid"
        assert query["redirect_uri"] == "https://tokens.test/v1/oauth/strava/callback"
        assert query["response_type"] == "code"
        assert query["approval_prompt"] == "force"
        assert query["scope"] == "read,activity:read"

    def test_a_redirect_outside_the_allowlist_or_an_unknown_scope_is_a_validation_error(
        self, links: ConnectLinks
    ) -> None:
        """422 material: nothing is signed for a target we would not redirect to."""
        with pytest.raises(ValidationFailed):
            links.authorize_url("u-1", redirect_to="https://evil.example/")
        with pytest.raises(ValidationFailed):
            links.authorize_url("u-1", scopes=["read", "everything"])


class TestBrowserBinding:
    def test_without_redirect_to_the_link_is_a_start_ticket_for_user_and_scopes(self, links: ConnectLinks) -> None:
        """No state is handed out: the start link's ticket names the user and scopes; the state is made when a
        browser opens it."""
        from urllib.parse import parse_qs, urlsplit

        url, _ = links.authorize_url("u-1", scopes=["read"])
        assert url.startswith("https://tokens.test/v1/oauth/strava/start?ticket=")
        assert links.read_ticket(parse_qs(urlsplit(url).query)["ticket"][0]) == ("u-1", ["read"])
        with pytest.raises(InvalidState):
            links.read_ticket(state_of(links.authorize_url("u-1", redirect_to=DASH)[0]))  # a state is no ticket

    def test_a_bound_state_carries_the_browser_secret_s_hash_and_the_scopes(self, links: ConnectLinks) -> None:
        url = links.browser_authorize_url("u-1", scopes=["read"], browser_secret="the-cookie")
        state = state_of(url)
        assert "the-cookie" not in state
        claims = links.read_state(state)
        assert (claims.browser_hash, claims.scopes, claims.redirect_to) == (
            secret_hash("the-cookie", purpose="oauth-browser"),
            ["read"],
            None,
        )
        assert "approval_prompt=force" in url
