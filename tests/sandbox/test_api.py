"""The sandbox's sync API (athlete, activities, one activity, streams, uploads) with Strava's scope rules and
error bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.sandbox.test_sandbox import START, FakeClock, asgi_client, error_of, seed
from tokensvc.sandbox import SandboxState, create_sandbox_app
from tokensvc.sandbox.streams import render, selected

MISSING_READ = (401, "Authorization Error", "AccessToken", "activity:read_permission", "missing")
MISSING_WRITE = (401, "Authorization Error", "AccessToken", "activity:write_permission", "missing")
NOT_FOUND = (404, "Record Not Found", "Activity", "id", "invalid")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock) -> FastAPI:
    return create_sandbox_app(clock=clock)


@pytest.fixture
def sandbox(app: FastAPI) -> SandboxState:
    state: SandboxState = app.state.sandbox
    return state


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def upload(client: httpx.AsyncClient, athlete_id: int, **spec: Any) -> dict[str, Any]:
    response = await client.post(f"/_control/athletes/{athlete_id}/activities", json=spec)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def athlete_with(client: httpx.AsyncClient, scope: str) -> tuple[int, str]:
    seeded = await seed(client, scope=scope, expires_in=86400)
    return seeded["athlete_id"], seeded["access_token"]


class TestActivityList:
    async def test_newest_first_paged_with_strava_defaults(self, client: httpx.AsyncClient) -> None:
        """Newest first; per_page defaults to 30 and is cut to 200; page 2 continues where page 1 ended."""
        athlete_id, token = await athlete_with(client, "read,activity:read_all")
        ids = [(await upload(client, athlete_id, start_date=int(START) - 3600 * n))["id"] for n in range(35)]
        first = (await client.get("/api/v3/athlete/activities", headers=bearer(token))).json()
        assert [a["id"] for a in first] == ids[:30]
        second = await client.get("/api/v3/athlete/activities", params={"page": 2}, headers=bearer(token))
        assert [a["id"] for a in second.json()] == ids[30:]
        everything = await client.get("/api/v3/athlete/activities", params={"per_page": 500}, headers=bearer(token))
        assert len(everything.json()) == 35
        summary = first[0]
        assert (summary["resource_state"], summary["athlete"]) == (2, {"id": athlete_id, "resource_state": 1})
        assert {"name", "distance", "moving_time", "elapsed_time", "sport_type", "start_date", "private"} <= set(
            summary
        )

    async def test_before_and_after_bound_the_start_date(self, client: httpx.AsyncClient) -> None:
        """`before`/`after` are exclusive epoch bounds; with only `after` the oldest comes first, as on Strava."""
        athlete_id, token = await athlete_with(client, "activity:read")
        starts = [int(START) - 86400 * n for n in (3, 2, 1)]
        ids = [(await upload(client, athlete_id, start_date=s))["id"] for s in starts]
        params = {"after": starts[0], "before": starts[2]}
        window = await client.get("/api/v3/athlete/activities", params=params, headers=bearer(token))
        assert [a["id"] for a in window.json()] == [ids[1]]
        after = await client.get("/api/v3/athlete/activities", params={"after": starts[0] - 1}, headers=bearer(token))
        assert [a["id"] for a in after.json()] == ids
        before = await client.get("/api/v3/athlete/activities", params={"before": starts[2]}, headers=bearer(token))
        assert [a["id"] for a in before.json()] == [ids[1], ids[0]]

    async def test_only_the_athletes_own_activities(self, client: httpx.AsyncClient) -> None:
        """Another athlete's activities never appear."""
        mine, token = await athlete_with(client, "activity:read_all")
        other, _ = await athlete_with(client, "activity:read_all")
        await upload(client, other)
        own = await upload(client, mine)
        listed = (await client.get("/api/v3/athlete/activities", headers=bearer(token))).json()
        assert [a["id"] for a in listed] == [own["id"]]

    @pytest.mark.parametrize("params", [{"page": "x"}, {"per_page": "0"}, {"page": "0"}, {"after": "soon"}])
    async def test_junk_parameters_are_a_strava_400(self, client: httpx.AsyncClient, params: dict[str, str]) -> None:
        """A parameter that is not a usable integer is 400 naming it."""
        _, token = await athlete_with(client, "activity:read")
        response = await client.get("/api/v3/athlete/activities", params=params, headers=bearer(token))
        assert error_of(response)[:3] == (400, "Bad Request", "Activity")
        assert error_of(response)[3] == next(iter(params))


class TestScopes:
    async def test_without_an_activity_scope_the_list_is_refused(self, client: httpx.AsyncClient) -> None:
        """A grant of `read` only gets Strava's missing-permission 401, with the rate headers."""
        _, token = await athlete_with(client, "read")
        response = await client.get("/api/v3/athlete/activities", headers=bearer(token))
        assert error_of(response) == MISSING_READ
        assert "X-RateLimit-Usage" in response.headers

    async def test_activity_read_sees_only_non_private_activities(self, client: httpx.AsyncClient) -> None:
        """`activity:read` lists public activities only, and reading a private one is the missing-permission 401."""
        athlete_id, token = await athlete_with(client, "read,activity:read")
        public = await upload(client, athlete_id, name="Public")
        private = await upload(client, athlete_id, name="Private", private=True)
        listed = (await client.get("/api/v3/athlete/activities", headers=bearer(token))).json()
        assert [a["id"] for a in listed] == [public["id"]]
        assert (await client.get(f"/api/v3/activities/{public['id']}", headers=bearer(token))).status_code == 200
        refused = await client.get(f"/api/v3/activities/{private['id']}", headers=bearer(token))
        assert error_of(refused) == MISSING_READ
        streams = await client.get(f"/api/v3/activities/{private['id']}/streams", headers=bearer(token))
        assert error_of(streams) == MISSING_READ

    async def test_activity_read_all_sees_private_ones_too(self, client: httpx.AsyncClient) -> None:
        """`activity:read_all` lists and reads private activities."""
        athlete_id, token = await athlete_with(client, "activity:read_all")
        private = await upload(client, athlete_id, private=True)
        listed = (await client.get("/api/v3/athlete/activities", headers=bearer(token))).json()
        assert [(a["id"], a["private"], a["visibility"]) for a in listed] == [(private["id"], True, "only_me")]
        assert (await client.get(f"/api/v3/activities/{private['id']}", headers=bearer(token))).status_code == 200

    async def test_writes_need_activity_write(self, client: httpx.AsyncClient) -> None:
        """A PUT without `activity:write` is the missing write-permission 401 and changes nothing."""
        athlete_id, token = await athlete_with(client, "read,activity:read_all")
        activity = await upload(client, athlete_id, name="Before")
        response = await client.put(
            f"/api/v3/activities/{activity['id']}", json={"name": "After"}, headers=bearer(token)
        )
        assert error_of(response) == MISSING_WRITE
        assert (await client.get(f"/api/v3/activities/{activity['id']}", headers=bearer(token))).json()["name"] == (
            "Before"
        )

    async def test_the_consent_pages_narrowed_grant_is_what_the_token_may_do(self, client: httpx.AsyncClient) -> None:
        """The scopes a grant was given through the consent page are the ones enforced for its tokens."""
        from tests.sandbox.test_sandbox import connect

        await client.post("/_control/next-grant", json={"scope": "read"})
        pair = await connect(client, scope="read,activity:read_all")
        snapshot = (await client.get(f"/_control/athletes/{pair['athlete']['id']}")).json()
        assert snapshot["scope"] == "read"
        response = await client.get("/api/v3/athlete/activities", headers=bearer(pair["access_token"]))
        assert error_of(response) == MISSING_READ


class TestOneActivity:
    async def test_detailed_activity_of_the_owner(self, client: httpx.AsyncClient) -> None:
        """GET answers Strava's DetailedActivity; another athlete's or an unknown id is 404 Record Not Found."""
        athlete_id, token = await athlete_with(client, "activity:read_all")
        other, other_token = await athlete_with(client, "activity:read_all")
        activity = await upload(client, athlete_id, name="Morning Run", distance=10000.0, points=3600)
        body = (await client.get(f"/api/v3/activities/{activity['id']}", headers=bearer(token))).json()
        assert (body["id"], body["resource_state"], body["name"], body["distance"]) == (
            activity["id"],
            3,
            "Morning Run",
            10000.0,
        )
        assert (body["elapsed_time"], body["type"], body["sport_type"]) == (3600, "Run", "Run")
        assert body["id"] > 2**32
        theirs = await client.get(f"/api/v3/activities/{activity['id']}", headers=bearer(other_token))
        assert error_of(theirs) == NOT_FOUND
        assert error_of(await client.get("/api/v3/activities/1", headers=bearer(token))) == NOT_FOUND
        assert other != athlete_id

    async def test_put_updates_the_fields_strava_allows(self, client: httpx.AsyncClient) -> None:
        """PUT (JSON or form) changes name, sport_type, description …; a bad sport_type is a 400 naming it."""
        athlete_id, token = await athlete_with(client, "activity:read_all,activity:write")
        activity = await upload(client, athlete_id)
        path = f"/api/v3/activities/{activity['id']}"
        body = {"name": "Renamed", "sport_type": "TrailRun", "description": "muddy", "commute": True, "private": True}
        updated = await client.put(path, json=body, headers=bearer(token))
        assert updated.status_code == 200
        got = updated.json()
        assert (got["name"], got["sport_type"], got["type"], got["description"], got["commute"]) == (
            "Renamed",
            "TrailRun",
            "Run",
            "muddy",
            True,
        )
        assert got["private"] is False  # not changeable through the API, as on Strava
        form = await client.put(path, data={"trainer": "true", "name": "Form"}, headers=bearer(token))
        assert (form.json()["trainer"], form.json()["name"]) == (True, "Form")
        bad = await client.put(path, json={"sport_type": "Teleport"}, headers=bearer(token))
        assert error_of(bad) == (400, "Bad Request", "Activity", "sport_type", "invalid")
        empty_name = await client.put(path, json={"name": ""}, headers=bearer(token))
        assert error_of(empty_name)[3] == "name"

    async def test_invalid_expired_and_invalidated_tokens_get_the_invalid_token_401(
        self, client: httpx.AsyncClient, clock: FakeClock
    ) -> None:
        """Every API path answers Athlete/access_token/invalid to a token that is unknown, expired or invalidated."""
        athlete_id, token = await athlete_with(client, "activity:read_all")
        activity = await upload(client, athlete_id)
        paths = ["/api/v3/athlete", "/api/v3/athlete/activities", f"/api/v3/activities/{activity['id']}"]
        await client.post(f"/_control/athletes/{athlete_id}/invalidate")
        for path in [*paths, f"{paths[2]}/streams"]:
            for value in (token, "f" * 40):
                response = await client.get(path, headers=bearer(value))
                assert error_of(response) == (401, "Authorization Error", "Athlete", "access_token", "invalid")


class TestStreams:
    async def test_list_shape_with_the_points_asked_for(self, client: httpx.AsyncClient) -> None:
        """Without key_by_type: a list of streams in Strava's order, each with `original_size` points; distance
        comes along whatever was asked, unknown keys are ignored."""
        athlete_id, token = await athlete_with(client, "activity:read_all")
        activity = await upload(client, athlete_id, points=5000, distance=10000.0)
        response = await client.get(
            f"/api/v3/activities/{activity['id']}/streams",
            params={"keys": "heartrate,latlng,nonsense"},
            headers=bearer(token),
        )
        assert response.headers["content-type"] == "application/json"
        streams = response.json()
        assert [s["type"] for s in streams] == ["distance", "latlng", "heartrate"]
        for stream in streams:
            assert (len(stream["data"]), stream["original_size"]) == (5000, 5000)
            assert (stream["series_type"], stream["resolution"]) == ("distance", "high")
        distance = streams[0]["data"]
        assert distance == sorted(distance)
        assert (distance[0], distance[-1]) == (0, pytest.approx(10000, rel=1e-3))
        assert all(len(point) == 2 for point in streams[1]["data"])

    async def test_keyed_by_type_and_every_stream_without_keys(self, client: httpx.AsyncClient) -> None:
        """key_by_type=true answers an object keyed by stream type; no `keys` means every stream."""
        athlete_id, token = await athlete_with(client, "activity:read_all")
        activity = await upload(client, athlete_id, points=10)
        response = await client.get(
            f"/api/v3/activities/{activity['id']}/streams", params={"key_by_type": "true"}, headers=bearer(token)
        )
        streams = response.json()
        assert set(streams) == {
            "time",
            "distance",
            "latlng",
            "altitude",
            "velocity_smooth",
            "heartrate",
            "cadence",
            "watts",
            "temp",
            "moving",
            "grade_smooth",
        }
        assert streams["time"]["data"] == list(range(10))
        assert streams["moving"]["data"] == [True] * 10

    async def test_a_manual_activity_has_none(self, client: httpx.AsyncClient) -> None:
        """An activity without points has no streams: an empty list or object."""
        athlete_id, token = await athlete_with(client, "activity:read_all")
        activity = await upload(client, athlete_id, points=0, elapsed_time=600)
        path = f"/api/v3/activities/{activity['id']}/streams"
        assert (await client.get(path, headers=bearer(token))).json() == []
        assert (await client.get(path, params={"key_by_type": "true"}, headers=bearer(token))).json() == {}

    async def test_a_twenty_megabyte_body_is_produced_in_small_chunks(
        self, client: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """300,000 points of every stream is over 20 MB of valid JSON, produced in chunks of under 100 kB (the body
        is never built whole, so the sandbox's memory stays flat however large the activity)."""
        athlete_id, token = await athlete_with(client, "activity:read_all")
        activity = await upload(client, athlete_id, points=300_000, distance=600_000.0)
        response = await client.get(f"/api/v3/activities/{activity['id']}/streams", headers=bearer(token))
        assert len(response.content) > 20_000_000
        assert [len(s["data"]) for s in response.json()] == [300_000] * 11
        stored = sandbox.activities.get(activity["id"])
        sizes = [len(chunk) for chunk in render(stored, selected(None), key_by_type=True)]
        assert sum(sizes) > 20_000_000
        assert max(sizes) < 100_000


class TestUploads:
    async def test_an_upload_is_counted_and_answered_with_stravas_upload_status(
        self, client: httpx.AsyncClient
    ) -> None:
        """`POST /uploads` with `activity:write`: 201 with a queued upload's status and every byte received;
        rate-counted as a write (the overall windows, not the read ones)."""
        _, token = await athlete_with(client, "read,activity:write")
        body = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + b"x" * 300_000 + b"\r\n--b--\r\n"
        headers = bearer(token) | {"Content-Type": "multipart/form-data; boundary=b"}
        first = await client.post("/api/v3/uploads", content=body, headers=headers)
        second = await client.post("/api/v3/uploads", content=body, headers=headers)
        assert first.status_code == 201, first.text
        assert first.json() | {"id": 0, "id_str": ""} == {
            "id": 0,
            "id_str": "",
            "external_id": None,
            "error": None,
            "status": "Your activity is still being processed.",
            "activity_id": None,
            "bytes_received": len(body),
        }
        assert second.json()["id"] == first.json()["id"] + 1
        assert str(first.json()["id"]) == first.json()["id_str"]
        assert second.headers["X-RateLimit-Usage"] == "2,2"
        assert second.headers["X-ReadRateLimit-Usage"] == "0,0"
        assert (await client.get("/_control/stats")).json()["calls"]["upload"] == 2

    async def test_an_upload_needs_activity_write(self, client: httpx.AsyncClient) -> None:
        _, token = await athlete_with(client, "read,activity:read_all")
        response = await client.post("/api/v3/uploads", content=b"file", headers=bearer(token))
        assert error_of(response) == MISSING_WRITE
        assert response.headers["X-RateLimit-Usage"] == "1,1"  # refused calls count too


class TestUnknownPaths:
    async def test_unknown_paths_get_stravas_body_not_fastapis(self, client: httpx.AsyncClient) -> None:
        """A path Strava does not serve is 404 Record Not Found in Strava's shape; a wrong method is 405 likewise;
        a non-numeric id is a record Strava does not have."""
        missing = await client.get("/api/v3/segments/starred")
        assert error_of(missing) == (404, "Record Not Found", "resource", "path", "invalid")
        assert "detail" not in missing.json()
        wrong_method = await client.delete("/api/v3/athlete")
        assert error_of(wrong_method)[:2] == (405, "Method Not Allowed")
        assert error_of(await client.get("/api/v3/activities/abc"))[:2] == (404, "Record Not Found")

    async def test_the_control_api_keeps_fastapis_errors(self, client: httpx.AsyncClient) -> None:
        """Control calls are not Strava's: an unknown athlete or a bad body answers FastAPI's {"detail"}."""
        assert (await client.get("/_control/athletes/999")).json() == {"detail": "athlete 999 is unknown"}
        bad = await client.post("/_control/rate-limit", json={"limit_15min": -1})
        assert bad.status_code == 422
        assert "detail" in bad.json()
        assert (await client.post("/_control/athletes/999/activities", json={})).status_code == 404
        assert (await client.get("/_control/nothing-here")).json() == {"detail": "Not Found"}


class TestCallCounts:
    async def test_calls_are_counted_per_athlete_and_endpoint(
        self, client: httpx.AsyncClient, sandbox: SandboxState
    ) -> None:
        """`calls_by_athlete` says exactly which calls reached Strava for whom, refused ones included."""
        athlete_id, token = await athlete_with(client, "read")
        other, other_token = await athlete_with(client, "activity:read_all")
        activity = await upload(client, other)
        await client.get("/api/v3/athlete", headers=bearer(token))
        await client.get("/api/v3/athlete/activities", headers=bearer(token))  # refused: no activity scope
        await client.get(f"/api/v3/activities/{activity['id']}", headers=bearer(other_token))
        await client.get(f"/api/v3/activities/{activity['id']}/streams", headers=bearer(other_token))
        await client.get("/api/v3/athlete", headers=bearer("0" * 40))  # nobody's
        stats = (await client.get("/_control/stats")).json()
        assert stats["calls_by_athlete"] == {
            str(athlete_id): {"athlete": 1, "activities": 1},
            str(other): {"activity": 1, "streams": 1},
        }
        assert (stats["calls"]["athlete"], stats["calls"]["activities"], stats["calls"]["streams"]) == (2, 1, 1)
        assert sandbox.calls["activity"] == 1
