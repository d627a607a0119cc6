"""One handler family renders every error as `application/problem+json` (RFC 9457) with the contract's `code`."""

from __future__ import annotations

import re
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

from tokensvc.errors import DatabaseUnavailable, TokenServiceError, Unauthorized, UnsupportedMediaType
from tokensvc.schemas import PROBLEM_TYPE

log = structlog.get_logger(__name__)

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
PROBLEM_JSON = "application/problem+json"
PROBLEM_SCHEMA_REF = "#/components/schemas/Problem"  # api/openapi.py puts the schema there


def problem_body(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The RFC 9457 members with the contract's `code`, then any extra members: every problem, and every example."""
    return {"type": PROBLEM_TYPE + code, "title": title, "status": status, "detail": detail, "code": code, **extra}


def problem_response(
    status: int, code: str, title: str, detail: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = problem_body(status, code, title, detail, **extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def service_problem(exc: TokenServiceError) -> JSONResponse:
    return problem_response(exc.status, exc.code, exc.title, exc.detail, headers=exc.headers, **exc.extra)


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TokenServiceError)
    return service_problem(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if isinstance(exc.body, bytes | bytearray) and exc.body:
        # FastAPI hands the body on as bytes only when it was not declared as JSON (form, text/plain, none at all):
        # not a body with wrong fields, but a body of the wrong kind (CONTRACT.md v1.1).
        return service_problem(UnsupportedMediaType(_not_json(request.headers.get("content-type"))))
    # Only where and why: echoing the input could echo a token someone sent.
    errors = [_issue(err, exc.body) for err in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors):
        detail = "the body is not valid JSON: " + next(e["msg"] for e in errors if e["type"] == "json_invalid")
    else:
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "the request is not valid"
    return problem_response(422, "validation_error", "Validation error", detail, errors=errors)


def _issue(err: Mapping[str, Any], body: object) -> dict[str, Any]:
    loc = [str(part) for part in err.get("loc", ())]
    if err.get("type") == "json_invalid" and isinstance(body, str) and len(loc) == 2 and loc[1].isdigit():
        # FastAPI puts the character offset where a field name would be (`["body", "24"]`): say where, in words.
        return {"loc": ["body"], "msg": _where(err, body, int(loc[1])), "type": "json_invalid"}
    return {"loc": loc, "msg": err.get("msg", ""), "type": err.get("type", "")}


def _where(err: Mapping[str, Any], body: str, offset: int) -> str:
    line = body.count("\n", 0, offset) + 1
    column = offset - (body.rfind("\n", 0, offset) + 1) + 1
    reason = str((err.get("ctx") or {}).get("error") or "JSON decode error")
    return f"{reason} at line {line}, column {column}"


_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")


def _not_json(content_type: str | None) -> str:
    declared = (content_type or "").split(";", 1)[0].strip()
    if not declared:
        said = "it came with no Content-Type"
    elif _MEDIA_TYPE.fullmatch(declared):
        said = f"this one was {declared.lower()}"
    else:
        said = "this one was declared as something else"
    return f"the body must be JSON, sent with `Content-Type: application/json` ({said})"


# FastAPI's answer to a body it cannot even decode (not UTF-8): for the contract that is malformed JSON, a 422.
_UNDECODABLE_BODY = "There was an error parsing the body"


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _UNDECODABLE_BODY:
        return problem_response(422, "validation_error", "Validation error", "the body is not valid JSON text")
    code = _CODE_BY_HTTP_STATUS.get(exc.status_code, "http_error")
    title = code.replace("_", " ").capitalize()
    headers = dict(exc.headers or {})
    if exc.status_code == 401:
        headers.setdefault("WWW-Authenticate", Unauthorized.challenge)
    return problem_response(exc.status_code, code, title, str(exc.detail), headers=headers or None)


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


_DESCRIPTIONS = {
    400: "Invalid or reused OAuth state (`invalid_state`), or Strava refused the code (`invalid_code`)",
    401: "Missing or wrong API key (service API) or session (browser): `unauthorized`",
    403: "Not allowed: a browser call from a foreign origin (`forbidden_origin`), or (webhooks) not this service's "
    "verify token (`forbidden`)",
    404: "Not found (`not_found`)",
    409: "The user must (re)connect with Strava: `tokens_missing` or `reauth_required`, with `needs_reauth` and an "
    "`authorize_url`",
    413: "Request body over 64 KiB (`payload_too_large`)",
    415: "The body is not declared as JSON: send `Content-Type: application/json` (`unsupported_media_type`)",
    422: "Invalid user id, parameter or body (`validation_error`, with `errors`)",
    429: "Too many requests; see Retry-After",
    503: "Strava or the database is unavailable, or Strava's rate limit is reached; nothing changed. See Retry-After",
}


def _example(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"summary": title, "value": problem_body(status, code, title, detail, **extra)}


_AUTHORIZE_URL = "https://tokens.example/v1/oauth/strava/authorize?user=42&state=eyJ1Ijoi..."
_EXAMPLES: dict[int, dict[str, dict[str, Any]]] = {
    400: {
        "invalid_state": _example(
            400, "invalid_state", "Invalid OAuth state", "this OAuth state was already used; start connecting again"
        )
    },
    401: {
        "unauthorized": _example(
            401,
            "unauthorized",
            "Unauthorized",
            "a valid API key is required: `Authorization: Bearer <one of TOKENSVC_API_KEYS>`",
        )
    },
    403: {
        "forbidden_origin": _example(
            403,
            "forbidden_origin",
            "Origin not allowed",
            "this origin may not call tokensvc's browser endpoints (see TOKENSVC_CORS_ORIGINS)",
        )
    },
    404: {"not_found": _example(404, "not_found", "Not found", "Not Found")},
    409: {
        "reauth_required": _example(
            409,
            "reauth_required",
            "Strava re-authorization required",
            "Strava rejected the stored refresh token; the user must reconnect with Strava.",
            needs_reauth=True,
            authorize_url=_AUTHORIZE_URL,
            reauth_reason="refresh_token_invalid",
        ),
        "stale_import": _example(
            409,
            "stale_import",
            "Import older than the stored tokens",
            "The imported pair expires before the stored one and has another refresh token: Strava has rotated "
            "since it was taken. Import a current pair, or pass replace=true to store it anyway.",
        ),
        "tokens_missing": _example(
            409,
            "tokens_missing",
            "No Strava tokens stored",
            "No Strava tokens are stored for this user; the user must connect with Strava.",
            needs_reauth=True,
            authorize_url=_AUTHORIZE_URL,
        ),
    },
    413: {
        "payload_too_large": _example(
            413, "payload_too_large", "Payload too large", "request bodies are limited to 65536 bytes"
        )
    },
    415: {
        "unsupported_media_type": _example(
            415,
            "unsupported_media_type",
            "Unsupported media type",
            "the body must be JSON, sent with `Content-Type: application/json` (this one was text/plain)",
        )
    },
    422: {
        "validation_error": _example(
            422,
            "validation_error",
            "Validation error",
            "body.expires_at: Input should be a valid integer",
            errors=[{"loc": ["body", "expires_at"], "msg": "Input should be a valid integer", "type": "int_type"}],
        ),
        "malformed_json": _example(
            422,
            "validation_error",
            "Validation error",
            "the body is not valid JSON: Expecting ',' delimiter at line 1, column 24",
            errors=[{"loc": ["body"], "msg": "Expecting ',' delimiter at line 1, column 24", "type": "json_invalid"}],
        ),
    },
    429: {
        "too_many_requests": _example(
            429, "too_many_requests", "Too many requests", "slow down; try again later", retry_after=30
        )
    },
    503: {
        "provider_unavailable": _example(
            503,
            "provider_unavailable",
            "Strava unavailable",
            "Strava did not answer in time; nothing was changed",
            retry_after=30,
        ),
        "provider_rate_limited": _example(
            503,
            "provider_rate_limited",
            "Strava rate limit reached",
            "the shared Strava budget for this 15-minute window is spent",
            retry_after=412,
        ),
        "database_unavailable": _example(
            503,
            "database_unavailable",
            "Database unavailable",
            "the database did not answer; nothing was changed",
            retry_after=5,
        ),
    },
}
_RETRY_AFTER = {"description": "Seconds to wait before trying again", "schema": {"type": "integer", "minimum": 1}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer` (RFC 6750)", "schema": {"type": "string"}}},
    429: {"Retry-After": _RETRY_AFTER},
    503: {"Retry-After": _RETRY_AFTER},
}


def problem_responses(*statuses: int, described: Mapping[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses=` of the problems a route can answer: each status under `application/problem+json`
    with the `Problem` schema, an example, and its headers (`WWW-Authenticate` on 401, `Retry-After` on 429/503).

    `described` overrides the generic description of a status for this route. 413, 415 and 422 need not be named
    for a JSON body: api/openapi.py declares them on every operation that takes one.
    """
    declared: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        media: dict[str, Any] = {"schema": {"$ref": PROBLEM_SCHEMA_REF}}
        if status in _EXAMPLES:
            media["examples"] = _EXAMPLES[status]
        response: dict[str, Any] = {
            "description": (described or {}).get(status, _DESCRIPTIONS.get(status, "A problem")),
            "content": {PROBLEM_JSON: media},
        }
        if status in _HEADERS:
            response["headers"] = _HEADERS[status]
        declared[status] = response
    return declared
