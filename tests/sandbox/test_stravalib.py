"""stravalib, the Python client most apps use, against a real `tokensvc serve --sandbox` process: the consent page,
exchange, refresh, athlete, activities, streams, an update and deauthorize, all through stravalib's own calls.

stravalib speaks https only and drops any base path, so, as the README's recipe does, a requests transport adapter
sends its `https://www.strava.com/...` requests to the sandbox's base URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter
from stravalib import Client, exc
from stravalib.model import SummaryAthlete
from stravalib.protocol import AccessInfo

from tests.e2e.processes import Process, start_service, wait_ready
from tests.sandbox.test_sandbox import ConsentForm
from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET

STRAVA = "https://www.strava.com"


class ToSandbox(HTTPAdapter):
    """Sends requests meant for https://www.strava.com to the sandbox (the README's recipe)."""

    def __init__(self, base_url: str) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        assert request.url is not None
        request.url = self.base_url + request.url.removeprefix(STRAVA)
        return super().send(request, *args, **kwargs)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """`tokensvc serve --sandbox` on SQLite in a temporary directory."""
    log_dir: Path = tmp_path_factory.mktemp("stravalib")
    process = start_service("stravalib", log_dir, {"TOKENSVC_LOG_LEVEL": "WARNING"}, "--sandbox")
    try:
        asyncio.run(wait_ready(process))
        yield process
    finally:
        process.stop()


@pytest.fixture
def session(service: Process) -> Iterator[requests.Session]:
    with requests.Session() as http:
        http.mount(f"{STRAVA}/", ToSandbox(f"{service.url}/sandbox/strava"))
        yield http


def authorize(client: Client, http: requests.Session, scope: list[Any]) -> tuple[str, str]:
    """stravalib's authorization URL, the consent page approved as a browser would; returns (code, granted scope)."""
    url = client.authorization_url(client_id=int(SANDBOX_CLIENT_ID), redirect_uri="http://127.0.0.1/cb", scope=scope)
    assert url.startswith(f"{STRAVA}/oauth/authorize?")
    page = http.get(url)
    assert page.status_code == 200
    form = ConsentForm(page.text)
    answer = http.post(
        f"{STRAVA}{form.action.removeprefix('/sandbox/strava')}",
        data={**form.fields, "scope": form.scopes, "decision": "approve"},
        allow_redirects=False,
    )
    assert answer.status_code == 303
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    return query["code"][0], query["scope"][0]


def exchange(client: Client, code: str) -> tuple[AccessInfo, SummaryAthlete]:
    """stravalib's code exchange, asking for the athlete it returns alongside the tokens."""
    answer = client.exchange_code_for_token(
        client_id=int(SANDBOX_CLIENT_ID), client_secret=SANDBOX_CLIENT_SECRET, code=code, return_athlete=True
    )
    assert isinstance(answer, tuple)
    pair, athlete = answer
    assert athlete is not None
    return pair, athlete


class TestStravalib:
    def test_exchange_refresh_athlete_and_deauthorize(self, session: requests.Session) -> None:
        """The calls the issue names: stravalib parses each answer, and deauthorize ends the grant."""
        client = Client(requests_session=session)
        code, granted = authorize(client, session, ["read", "activity:read_all"])
        assert granted == "read,activity:read_all"
        first, athlete = exchange(client, code)
        athlete_id = athlete.id
        expire = session.post(
            f"{STRAVA}/_control/athletes/{athlete_id}/expire", json={"expires_at": first["expires_at"] - 21000}
        )
        assert expire.status_code == 200
        second = client.refresh_access_token(
            client_id=int(SANDBOX_CLIENT_ID), client_secret=SANDBOX_CLIENT_SECRET, refresh_token=first["refresh_token"]
        )
        assert second["refresh_token"] != first["refresh_token"]
        assert second["access_token"] != first["access_token"]
        assert client.access_token == second["access_token"]
        me = client.get_athlete()
        assert (me.id, me.firstname) == (athlete_id, "Sandbox")
        client.deauthorize()
        with pytest.raises(exc.AccessUnauthorized):
            client.get_athlete()
        assert session.get(f"{STRAVA}/_control/athletes/{athlete_id}").json()["revoked"] is True

    def test_activities_streams_update_and_errors(self, session: requests.Session) -> None:
        """Listing, reading, streams and an update parse into stravalib's models; Strava's error bodies become its
        exceptions (a missing path is ObjectNotFound, a missing permission AccessUnauthorized)."""
        client = Client(requests_session=session)
        code, _ = authorize(client, session, ["read", "activity:read_all", "activity:write"])
        pair, athlete = exchange(client, code)
        upload = f"{STRAVA}/_control/athletes/{athlete.id}/activities"
        made = [session.post(upload, json={"name": f"Run {n}", "points": 100}).json() for n in range(3)]
        listed = list(client.get_activities(limit=10))
        assert [a.id for a in listed] == [m["id"] for m in reversed(made)]
        one = client.get_activity(made[0]["id"])
        assert (one.name, one.distance, one.sport_type is not None) == ("Run 0", 5000.0, True)
        streams = client.get_activity_streams(made[0]["id"], types=["time", "heartrate", "latlng"])
        assert set(streams) == {"time", "distance", "heartrate", "latlng"}
        assert streams["time"].data == list(range(100))
        updated = client.update_activity(made[0]["id"], name="Renamed", description="via stravalib")
        assert (updated.name, updated.description) == ("Renamed", "via stravalib")
        with pytest.raises(exc.ObjectNotFound, match="Record Not Found"):
            client.protocol.get("/segments/starred")
        narrow = Client(requests_session=session)
        code, _ = authorize(narrow, session, ["read"])
        exchange(narrow, code)
        with pytest.raises(exc.AccessUnauthorized, match="activity:read_permission"):
            list(narrow.get_activities(limit=1))
        assert pair["access_token"]
