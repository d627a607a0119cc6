"""The sandbox as an ASGI app that works at the root of its own server or mounted under a prefix."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path
from typing import Unpack

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import errors
from .grants import UnknownAthleteError
from .persist import SaveBeforeAnswer, StateFile
from .routes import api, control, control_world, oauth, subscriptions
from .state import SandboxState, WorldOptions


def create_sandbox_app(*, state_file: Path | None = None, **world: Unpack[WorldOptions]) -> FastAPI:
    """Build a sandbox (`world`: SandboxState's options); its world is `app.state.sandbox`. Nothing depends on
    lifespan, so mounting works.

    `push_transport` (tests) carries the webhook requests the sandbox makes to a subscription's callback.
    `state_file`: keep the world there across restarts (see `persist`); None keeps it in memory only.
    """
    state = SandboxState(**world)
    app = FastAPI(title="Strava sandbox", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sandbox = state
    for module in (oauth, api, subscriptions, control, control_world):
        app.include_router(module.router)
    app.add_exception_handler(errors.StravaError, _strava_error)
    app.add_exception_handler(UnknownAthleteError, _unknown_athlete)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    if state_file is not None:
        file = StateFile(state_file)
        file.load_into(state)
        app.add_middleware(SaveBeforeAnswer, state=state, state_file=file)
    return app


def _is_control(request: Request) -> bool:
    root = request.scope.get("root_path", "")
    path = request.url.path
    return (path[len(root) :] if root and path.startswith(root) else path).startswith("/_control")


async def _strava_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.StravaError)
    return exc.response()


async def _unknown_athlete(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": f"athlete {exc} is unknown"}, status_code=404)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Strava's body for a path or method it does not serve; the control API keeps FastAPI's `{"detail"}`."""
    assert isinstance(exc, StarletteHTTPException)
    if _is_control(request):
        return await http_exception_handler(request, exc)
    if exc.status_code == 404:
        return errors.unknown_path().response()
    if exc.status_code == 405:
        return errors.method_not_allowed().response()
    phrase = HTTPStatus(exc.status_code).phrase
    return errors.StravaError(exc.status_code, phrase, "resource", "", "invalid").response()


async def _validation_error(request: Request, exc: Exception) -> Response:
    """A path id that is not a number is a record Strava does not have; control bodies get FastAPI's 422."""
    assert isinstance(exc, RequestValidationError)
    if _is_control(request):
        return await request_validation_exception_handler(request, exc)
    location = exc.errors()[0]["loc"] if exc.errors() else ()
    if location and location[0] == "path":
        return errors.not_found("resource", str(location[-1])).response()
    return errors.bad_request("resource", str(location[-1]) if location else "").response()
