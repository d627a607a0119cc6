"""One handler family renders every error as `application/problem+json` (RFC 9457) with the contract's `code`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokensvc.errors import DatabaseUnavailable, RetryLater, TokenServiceError
from tokensvc.schemas import Problem

log = structlog.get_logger(__name__)

PROBLEM_TYPE = "https://tokensvc.dev/problems/"
# What a database that is down or full looks like: SQLAlchemy's errors, and (from the hot-path reader, or when
# asyncpg cannot connect at all) asyncpg's own errors and the socket's OSError. Nothing else in a request does
# I/O unwrapped.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    DBAPIError,
    PoolTimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
_CODE_BY_HTTP_STATUS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}


def problem_response(
    status: int, code: str, title: str, detail: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"type": PROBLEM_TYPE + code, "title": title, "status": status, "detail": detail, "code": code, **extra}
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


def service_problem(exc: TokenServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RetryLater) else None
    return problem_response(exc.status, exc.code, exc.title, exc.detail, headers=headers, **exc.extra)


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TokenServiceError)
    return service_problem(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only where and why: echoing the input could echo a token someone sent.
    errors = [
        {"loc": [str(part) for part in err.get("loc", ())], "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "the request is not valid"
    return problem_response(422, "validation_error", "Validation error", detail, errors=errors)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI's only 400: a body it could not even decode (not UTF-8). To a caller that is malformed JSON: 422.
        return problem_response(
            422, "validation_error", "Validation error", "the request body is not valid JSON (UTF-8)", errors=[]
        )
    code = _CODE_BY_HTTP_STATUS.get(exc.status_code, "http_error")
    title = code.replace("_", " ").capitalize()
    return problem_response(exc.status_code, code, title, str(exc.detail), headers=exc.headers)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    return database_problem(exc, path=request.url.path)


def database_problem(exc: Exception, *, path: str) -> JSONResponse:
    orig = getattr(exc, "orig", exc)  # the driver's own error; its text can quote SQL parameters, so not logged
    log.error(
        "database.unavailable",
        path=path,
        error=type(exc).__name__,
        driver_error=type(orig).__name__,
        sqlstate=getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None),
    )
    return service_problem(DatabaseUnavailable("the database did not answer; nothing was changed"))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request.unhandled_error", path=request.url.path, error=type(exc).__name__)
    return problem_response(500, "internal_error", "Internal error", "an unexpected error occurred")


def install(app: FastAPI) -> None:
    app.add_exception_handler(TokenServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, _database_error)
    app.add_exception_handler(Exception, _unexpected)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the problem responses an endpoint can give."""
    described = {
        400: "Invalid OAuth state",
        401: "Missing or wrong API key (service API) or session (browser)",
        403: "Origin not allowed for a browser call",
        404: "Not found",
        409: "The user must (re)connect with Strava (`tokens_missing` or `reauth_required`)",
        413: "Request body over 64 KiB",
        415: "Content type is not application/json",
        422: "Invalid user id, parameter or body",
        503: "Strava or the database is unavailable, or rate limited; see Retry-After",
    }
    return {
        s: {"model": Problem, "description": described[s], "content": {"application/problem+json": {}}}
        for s in statuses
    }
