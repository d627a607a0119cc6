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
