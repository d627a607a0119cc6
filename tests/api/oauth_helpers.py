"""Drive the Connect with Strava flow in-process: tokensvc over ASGI, the sandbox's consent form over ASGI."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from tests.conftest import STRAVA_TEST_BASE


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def consent(
    strava: httpx.AsyncClient,
    authorize_url: str,
    *,
    decision: str = "approve",
    scopes: list[str] | None = None,
    athlete_id: int | None = None,
) -> str:
    """Post the sandbox's consent form as a browser would; returns the callback URL Strava redirects to."""
    assert authorize_url.startswith(STRAVA_TEST_BASE + "/oauth/authorize?")
    asked = query_of(authorize_url)
    form: list[tuple[str, str]] = [
        ("client_id", asked["client_id"]),
        ("redirect_uri", asked["redirect_uri"]),
        ("response_type", "code"),
        ("approval_prompt", asked.get("approval_prompt", "auto")),
        ("requested_scope", asked["scope"]),
        ("state", asked["state"]),
        ("decision", decision),
        *(("scope", s) for s in (scopes if scopes is not None else asked["scope"].split(","))),
    ]
    if athlete_id is not None:
        form.append(("athlete_id", str(athlete_id)))
    response = await strava.post(
        "/oauth/authorize",
        content=urlencode(form).encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 303, response.text
    return response.headers["location"]


def local_path(url: str) -> str:
    """The path and query of a tokensvc URL, for the in-process client."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


async def follow_start(browser: httpx.AsyncClient, authorize_url: str) -> str:
    """Open a connect link in `browser` (its own cookie jar), as a browser would. The service's browser-bound start
    link answers 303 to Strava's consent page and leaves its binding cookie in the jar; Strava's own consent URL
    (a flow the app confirms) is returned as it is."""
    if authorize_url.startswith(STRAVA_TEST_BASE + "/"):
        return authorize_url
    response = await browser.get(local_path(authorize_url))
    assert response.status_code == 303, response.text
    location: str = response.headers["location"]
    assert location.startswith(STRAVA_TEST_BASE + "/oauth/authorize?")
    return location


async def complete(client: httpx.AsyncClient, user_id: str, location: str, **body: object) -> httpx.Response:
    """The app's backend confirming a connect: the `connect_id` of the callback's redirect, for `user_id`."""
    connect_id = query_of(location)["connect_id"]
    return await client.post(f"/v1/users/{user_id}/connect/complete", json={"connect_id": connect_id, **body})
