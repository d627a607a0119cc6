"""`token.connected`: a connect the app can start (or widen) a backfill on, written with the connect, delivered signed.

Connects run as in production, at the service: a signed state from ConnectLinks, the sandbox's consent form, the
callback, and (with `redirect_to`) the app's confirmation; the outbox is delivered to a receiver that checks each
signature with `standardwebhooks`. Both databases.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.api.oauth_helpers import consent, query_of
from tests.conftest import APP_ORIGIN, STRAVA_TEST_BASE, FakeClock, import_body, make_settings, seed_athlete
from tests.service.test_notify import RECEIVER_URL, SECRET, Receiver, assert_no_token, outbox_rows, recorded_text
from tokensvc.app import Resources, notification_deliverer
from tokensvc.config import Settings
from tokensvc.errors import ReauthRequired
from tokensvc.sandbox import SandboxState
from tokensvc.schemas import TokenStatus
from tokensvc.service.journal import connect_news
from tokensvc.service.notify import NotificationDeliverer
from tokensvc.service.oauth import CallbackBrowser

pytestmark = pytest.mark.dialects("sqlite", "postgres")

DASHBOARD = APP_ORIGIN + "/dashboard"
CONNECTED = "token.connected"


@pytest.fixture
def clock() -> FakeClock:
    """Near the real time: `Webhook.verify` refuses a `webhook-timestamp` more than 5 minutes off."""
    return FakeClock(float(int(time.time())))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, notify_url=RECEIVER_URL, notify_secret=SecretStr(SECRET))


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
async def deliverer(
    settings: Settings, resources: Resources, clock: FakeClock, receiver: Receiver
) -> AsyncIterator[NotificationDeliverer]:
    notifier = notification_deliverer(settings, resources.engine, clock=clock, transport=receiver.transport())
    assert notifier is not None
    yield notifier
    await notifier.stop()


@pytest.fixture
async def strava(strava_transport: httpx.AsyncBaseTransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=strava_transport, base_url=STRAVA_TEST_BASE) as http:
        yield http


async def connect(
    res: Resources,
    strava: httpx.AsyncClient,
    user_id: str,
    *,
    confirmed: bool,
    scopes: Sequence[str] = ("read", "activity:read_all"),
    athlete_id: int | None = None,
) -> TokenStatus:
    """One connect as a browser and the app make it: confirmed by the app's backend (`redirect_to`), or bound to
    the browser that started it (the callback stores)."""
    binding = secrets.token_urlsafe(32)
    if confirmed:
        url, _expires_at = res.links.authorize_url(user_id, redirect_to=DASHBOARD, scopes=scopes)
    else:
        url = res.links.browser_authorize_url(user_id, scopes=scopes, browser_secret=binding)
    query = query_of(await consent(strava, url, athlete_id=athlete_id))
    result = await res.oauth.callback(
        state=query["state"],
        code=query.get("code"),
        scope=query.get("scope"),
        error=None,
        browser=None if confirmed else CallbackBrowser(binding=binding),
    )
    if confirmed:
        assert result.outcome == "confirm"
        assert result.connect_id is not None
        return await res.oauth.complete(user_id, result.connect_id)
    assert result.outcome == "connected"
    assert result.token_status is not None
    return result.token_status


async def delivered(deliverer: NotificationDeliverer, receiver: Receiver, event_type: str) -> list[dict[str, Any]]:
    """Deliver what is due; the `data` of every `event_type` notification received so far, each signature
    verified."""
    await deliverer.deliver_due()
    payloads = [r.verified() for r in receiver.received]
    return [p["data"] for p in payloads if p["type"] == event_type]


@pytest.mark.parametrize("confirmed", [True, False], ids=["confirmed", "browser_bound"])
class TestTokenConnected:
    async def test_a_first_connect_is_one_signed_token_connected(
        self,
        resources: Resources,
        strava: httpx.AsyncClient,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
        confirmed: bool,
    ) -> None:
        """The user had no row: one `token.connected` with the user, the athlete and the granted scopes, whose
        signature verifies; no token in it or in any recorded row."""
        status = await connect(resources, strava, "u-1", confirmed=confirmed)

        assert await delivered(deliverer, receiver, CONNECTED) == [
            {"user_id": "u-1", "athlete_id": status.athlete_id, "scopes": ["read", "activity:read_all"]}
        ]
        assert len(receiver.received) == 1
        assert receiver.received[0].headers["webhook-id"].startswith("msg_")
        text = receiver.received[0].body.decode() + await recorded_text(resources)
        token = (await resources.service.access_token("u-1", min_ttl=0)).access_token
        assert token not in text

    async def test_a_reconnect_with_the_same_or_fewer_scopes_notifies_nothing_new(
        self,
        resources: Resources,
        strava: httpx.AsyncClient,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
        confirmed: bool,
    ) -> None:
        """Connecting the same athlete again, with the same scopes and then with fewer, changes nothing the app's
        backfill needs: still the one `token.connected`, and nothing else in the outbox."""
        first = await connect(resources, strava, "u-1", confirmed=confirmed)
        await connect(resources, strava, "u-1", confirmed=confirmed, athlete_id=first.athlete_id)
        await connect(resources, strava, "u-1", confirmed=not confirmed, athlete_id=first.athlete_id)
        narrower = await connect(
            resources, strava, "u-1", confirmed=confirmed, scopes=["read"], athlete_id=first.athlete_id
        )
        assert narrower.scopes == ["read"]

        assert len(await delivered(deliverer, receiver, CONNECTED)) == 1
        assert [r["event_type"] for r in await outbox_rows(resources)] == [CONNECTED]

    async def test_a_reconnect_that_adds_scopes_notifies_again_with_scopes_added(
        self,
        resources: Resources,
        strava: httpx.AsyncClient,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
        confirmed: bool,
    ) -> None:
        """`read` first, then `read,activity:read_all`: a second `token.connected` naming the scope added (the app
        can now backfill private activities)."""
        first = await connect(resources, strava, "u-1", confirmed=confirmed, scopes=["read"])
        await connect(resources, strava, "u-1", confirmed=confirmed, athlete_id=first.athlete_id)

        assert sorted(await delivered(deliverer, receiver, CONNECTED), key=len) == [
            {"user_id": "u-1", "athlete_id": first.athlete_id, "scopes": ["read"]},
            {
                "user_id": "u-1",
                "athlete_id": first.athlete_id,
                "scopes": ["read", "activity:read_all"],
                "scopes_added": ["activity:read_all"],
            },
        ]

    async def test_connecting_again_after_delete_is_a_first_connect_again(
        self,
        resources: Resources,
        strava: httpx.AsyncClient,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
        confirmed: bool,
    ) -> None:
        """DELETE (`token.revoked`) leaves no row: the next connect of the same athlete, same scopes, is a first
        connect again."""
        first = await connect(resources, strava, "u-1", confirmed=confirmed)
        await resources.service.delete("u-1")
        await connect(resources, strava, "u-1", confirmed=confirmed, athlete_id=first.athlete_id)

        await deliverer.deliver_due()
        types = sorted(r.verified()["type"] for r in receiver.received)
        assert types == [CONNECTED, CONNECTED, "token.revoked"]
        connected = [r.verified()["data"] for r in receiver.received if r.verified()["type"] == CONNECTED]
        assert all("scopes_added" not in data for data in connected)
        assert {data["athlete_id"] for data in connected} == {first.athlete_id}


class TestOtherWaysIn:
    async def test_moving_an_athlete_to_another_user_is_that_users_first_connect(
        self,
        resources: Resources,
        strava: httpx.AsyncClient,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
    ) -> None:
        """`second` takes the athlete from `first` (`replace`): `first` is revoked (moved), `second` connected."""
        first = await connect(resources, strava, "first", confirmed=True)
        url, _expires_at = resources.links.authorize_url("second", redirect_to=DASHBOARD)
        query = query_of(await consent(strava, url, athlete_id=first.athlete_id))
        result = await resources.oauth.callback(
            state=query["state"], code=query["code"], scope=query["scope"], error=None
        )
        assert result.connect_id is not None
        await resources.oauth.complete("second", result.connect_id, replace=True)

        assert [d["user_id"] for d in await delivered(deliverer, receiver, CONNECTED)] in (
            ["first", "second"],
            ["second", "first"],
        )
        revoked = [r.verified()["data"] for r in receiver.received if r.verified()["type"] == "token.revoked"]
        assert [(d["user_id"], d["reason"]) for d in revoked] == [("first", "moved")]

    async def test_an_import_is_no_connect(
        self,
        resources: Resources,
        sandbox: SandboxState,
        clock: FakeClock,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
    ) -> None:
        """PUT tokens moves tokens the app already had (a migration): it notifies no `token.connected`, for a new
        user or an existing one; a connect of that athlete afterwards, same scopes, is a reconnect."""
        seeded = seed_athlete(sandbox, clock, expires_in=21600)
        await resources.service.import_tokens(seeded.user_id, import_body(seeded))
        await resources.service.import_tokens(seeded.user_id, import_body(seeded))
        assert await outbox_rows(resources) == []
        assert_no_token(await recorded_text(resources), seeded)

    async def test_a_needs_reauth_user_reconnecting_with_the_same_scopes_has_recovered_only(
        self,
        resources: Resources,
        strava: httpx.AsyncClient,
        sandbox: SandboxState,
        deliverer: NotificationDeliverer,
        receiver: Receiver,
    ) -> None:
        """The row stayed (`needs_reauth`): its reconnect is `token.recovered` (`via: connected`), not a first
        connect; the app's sync picks up where it stopped."""
        first = await connect(resources, strava, "u-1", confirmed=True)
        assert first.athlete_id is not None
        sandbox.revoke(first.athlete_id)
        with pytest.raises(ReauthRequired):
            await resources.service.refresh("u-1", force=True)
        await connect(resources, strava, "u-1", confirmed=True, athlete_id=first.athlete_id)

        await deliverer.deliver_due()
        types = sorted(r.verified()["type"] for r in receiver.received)
        assert types == [CONNECTED, "token.needs_reauth", "token.recovered"]


class TestConnectNews:
    """The decision itself, for the cases a test cannot time: two first connects of one user at once."""

    @pytest.mark.parametrize(
        ("previous", "inserted", "athlete_id", "scopes", "expected"),
        [
            pytest.param(None, True, 1, ["read"], (True, None), id="first"),
            pytest.param(None, False, 1, ["read"], (False, None), id="a-concurrent-first-connect-notified"),
            pytest.param((1, ["read"]), False, 1, ["read"], (False, None), id="same"),
            pytest.param((1, ["read", "activity:read"]), False, 1, ["read"], (False, None), id="fewer"),
            pytest.param((1, ["read"]), False, 1, ["read", "activity:read"], (True, ["activity:read"]), id="added"),
            pytest.param((1, ["read"]), False, 2, ["read"], (True, None), id="another-athlete"),
            pytest.param((None, ["read"]), False, 2, ["read"], (False, None), id="imported-without-athlete"),
        ],
    )
    def test_what_a_connect_tells_the_app(
        self,
        previous: tuple[int | None, list[str]] | None,
        inserted: bool,
        athlete_id: int,
        scopes: list[str],
        expected: tuple[bool, list[str] | None],
    ) -> None:
        assert connect_news(previous, inserted=inserted, athlete_id=athlete_id, scopes=scopes) == expected
