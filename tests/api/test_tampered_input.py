"""Inputs an attacker crafts (issue 14, low findings): each one is a 422, on both databases, never a 500 or a
`database_unavailable` that would set off the database-down alerts."""

from __future__ import annotations

import base64

import httpx
import pytest


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


TAMPERED_TOKEN_CURSORS = [
    b64(b"9223372036854775808:a"),  # one past BIGINT: OverflowError on SQLite
    b64(b"-9223372036854775809:a"),
    b64(b"-1:a"),
    b64(b"1700000000:a\x00b"),  # a NUL: Postgres refuses it in text
    b64(b"1700000000:" + "é".encode()),
    b64(b"1700000000:" + b"a" * 65),
    b64(b"1" * 100 + b":a"),
]
TAMPERED_EVENT_CURSORS = [
    b64(b"e:9223372036854775808"),
    b64(b"e:" + b"9" * 40),
    b64(b"e:0"),
]


class TestTamperedCursors:
    @pytest.mark.parametrize("cursor", TAMPERED_TOKEN_CURSORS)
    async def test_a_tampered_token_list_cursor_is_422(self, client: httpx.AsyncClient, cursor: str) -> None:
        """`GET /v1/tokens?cursor=…` with a cursor out of range: 422 validation_error."""
        response = await client.get("/v1/tokens", params={"cursor": cursor})
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error"

    @pytest.mark.parametrize("cursor", TAMPERED_EVENT_CURSORS)
    async def test_a_tampered_events_cursor_is_422(self, client: httpx.AsyncClient, cursor: str) -> None:
        """`GET /v1/users/{id}/events?cursor=…` with an event id out of range: 422 validation_error."""
        response = await client.get("/v1/users/u1/events", params={"cursor": cursor})
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error"


class TestLoneSurrogates:
    @pytest.mark.parametrize(
        "text",
        ['"\\ud800"', '"\\udc00"', '"a\\uDBFFb"', '"\\ud800\\ud800"', '"\\udc00\\ud800"'],
    )
    async def test_a_lone_surrogate_in_a_body_is_422(self, client: httpx.AsyncClient, text: str) -> None:
        """A string with a surrogate not paired as UTF-16 demands, anywhere in a JSON body: 422, nothing stored."""
        body = '{"access_token": ' + text + ', "refresh_token": "r", "expires_at": 1700000000}'
        response = await client.put(
            "/v1/users/u1/tokens", content=body.encode(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error"
        assert (await client.get("/v1/users/u1/token-status")).json()["status"] == "missing"

    async def test_a_lone_surrogate_in_a_webhook_event_is_422(self, client: httpx.AsyncClient) -> None:
        """The unauthenticated intake: 422 instead of the 500 the issue found."""
        event = (
            '{"aspect_type": "update", "event_time": 1700000000, "object_id": 1, "object_type": "athlete",'
            ' "owner_id": 1, "subscription_id": 1, "updates": {"authorized": "\\ud800"}}'
        )
        response = await client.post(
            "/v1/webhooks/strava", content=event.encode(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text

    @pytest.mark.parametrize("text", ['"\\ud83d\\ude00"', '"\\\\ud800"', '"caf\\u00e9"'])
    async def test_pairs_and_escaped_backslashes_are_fine(self, client: httpx.AsyncClient, text: str) -> None:
        """A proper pair (an emoji) or a literal backslash followed by `ud800` is no lone surrogate."""
        body = '{"access_token": ' + text + ', "refresh_token": "r", "expires_at": 1700000000}'
        response = await client.put(
            "/v1/users/u1/tokens", content=body.encode(), headers={"content-type": "application/json"}
        )
        assert response.status_code != 422 or "surrogate" not in response.text
        assert response.status_code < 500
