"""The sandbox's world survives a restart: in its state file, and for `tokensvc serve --sandbox`, whose stored users
must stay refreshable (not `needs_reauth`) after the service and its sandbox restart."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx
import pytest

from tests.e2e.processes import start_service, wait_ready
from tests.sandbox.test_sandbox import FakeClock, asgi_client, error_of, refresh, seed
from tokensvc.config import SANDBOX_API_KEY
from tokensvc.sandbox import SandboxState, create_sandbox_app

API = {"Authorization": f"Bearer {SANDBOX_API_KEY}"}


class TestStateFile:
    async def test_grants_activities_ledger_and_knobs_come_back(self, tmp_path: Path) -> None:
        """A new sandbox on the same file knows the newest pair (the old one is still a stale token), the ledger,
        the activities, the rate windows' usage and the capacity; counters start afresh."""
        clock = FakeClock()
        path = tmp_path / "tokensvc.db.sandbox.json"
        async with asgi_client(create_sandbox_app(clock=clock, state_file=path)) as before:
            seeded = await seed(before, scope="activity:read_all")
            newer = (await refresh(before, seeded["refresh_token"])).json()
            activity = (await before.post(f"/_control/athletes/{seeded['athlete_id']}/activities", json={})).json()
            await before.post("/_control/capacity", json={"athlete_capacity": 5})
            headers = {"Authorization": f"Bearer {newer['access_token']}"}
            assert (await before.get("/api/v3/athlete", headers=headers)).status_code == 200
            ledger = (await before.get("/_control/ledger")).json()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        app = create_sandbox_app(clock=clock, state_file=path)
        async with asgi_client(app) as after:
            assert (await after.get("/_control/ledger")).json() == ledger
            got = await after.get(f"/api/v3/activities/{activity['id']}", headers=headers)
            assert (got.status_code, got.json()["name"]) == (200, activity["name"])
            assert got.headers["X-ReadRateLimit-Usage"] == "2,2"
            assert (await after.get("/_control/capacity")).json() == {"athlete_capacity": 5, "connected": 1}
            assert (await refresh(after, seeded["refresh_token"])).status_code == 400
            assert (await refresh(after, newer["refresh_token"])).status_code == 200
            state: SandboxState = app.state.sandbox
            assert state.violations[0]["athlete_id"] == seeded["athlete_id"]
            assert state.calls["refresh"] == 2

    async def test_control_reads_do_not_write_and_changes_do(self, tmp_path: Path) -> None:
        """Inspecting the sandbox leaves no file; the first change writes it, with no temporary file left over."""
        path = tmp_path / "world.json"
        async with asgi_client(create_sandbox_app(state_file=path)) as client:
            await client.get("/_control/stats")
            assert not path.exists()
            await seed(client)
            assert path.exists()
        assert os.listdir(tmp_path) == ["world.json"]  # no temporary file left over
        assert json.loads(path.read_text())["version"] == 1

    @pytest.mark.parametrize("content", ["{not json", '{"version": 99, "world": {}}', '{"version": 1, "world": []}'])
    async def test_an_unreadable_file_is_moved_aside_and_the_sandbox_starts_empty(
        self, tmp_path: Path, content: str
    ) -> None:
        """A corrupt or foreign file never stops the sandbox: it is kept as `.unreadable` and a new world begins."""
        path = tmp_path / "world.json"
        path.write_text(content)
        async with asgi_client(create_sandbox_app(state_file=path)) as client:
            assert (await client.get("/_control/stats")).json()["calls_by_athlete"] == {}
            assert error_of(await refresh(client, "0" * 40))[2] == "RefreshToken"
        assert (tmp_path / "world.json.unreadable").read_text() == content


class TestServeSandboxRestart:
    async def test_stored_users_stay_refreshable_after_a_restart(self, tmp_path: Path) -> None:
        """serve --sandbox, import a user's pair, restart the process: a forced refresh succeeds and the user stays
        valid (a sandbox that forgot its grants would reject the refresh token: `needs_reauth`)."""
        first = start_service("before", tmp_path, {"TOKENSVC_LOG_LEVEL": "WARNING"}, "--sandbox")
        try:
            await wait_ready(first)
            async with httpx.AsyncClient(base_url=first.url, headers=API, timeout=30) as http:
                pair = (await http.post("/sandbox/strava/_control/athletes", json={"expires_in": 600})).json()
                body = {k: pair[k] for k in ("access_token", "refresh_token", "expires_at", "athlete_id")}
                assert (await http.put("/v1/users/42/tokens", json=body)).status_code == 200
        finally:
            first.stop()
        assert (tmp_path / "tokensvc.db.sandbox.json").exists()
        second = start_service("after", tmp_path, {"TOKENSVC_LOG_LEVEL": "WARNING"}, "--sandbox")
        try:
            await wait_ready(second)
            async with httpx.AsyncClient(base_url=second.url, headers=API, timeout=30) as http:
                refreshed = await http.post("/v1/users/42/refresh", params={"force": "true"})
                assert refreshed.status_code == 200, refreshed.text
                assert refreshed.json()["refreshed"] is True
                status = (await http.get("/v1/users/42/token-status")).json()
                assert (status["status"], status["needs_reauth"]) == ("valid", False)
                ledger = (await http.get("/sandbox/strava/_control/ledger")).json()
                assert [e["accepted"] for e in ledger[str(pair["athlete_id"])]] == [True, False]
        finally:
            second.stop()
