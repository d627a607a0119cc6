"""`GET /v1/users/{user_id}/access-token` on a lean route: the call other services make before every sync.

FastAPI's per-request machinery (dependency solving, parameter models, the middleware stack) was most of this
endpoint's cost once the database read was cheap (bench/README.md). This ASGI layer answers the requests it can
fully check by hand: a well-formed user id, a `min_ttl` of plain digits in 0..3600, no parameter given twice and a
valid API key. It calls the same service method and renders errors with the same problem handler, so answers are
identical (tests/api/test_fastpath_property.py compares both routes on generated requests). Anything else (a bad
id, parameter or key; another method) falls through untouched to the FastAPI route in `api/tokens.py`, which
documents the endpoint and stays its reference implementation.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.contextvars import bind_contextvars, reset_contextvars

from tokensvc.api.deps import ApiKeys
from tokensvc.api.problems import DATABASE_ERRORS, database_problem, service_problem
from tokensvc.api.request_id import HEADER as REQUEST_ID_HEADER
from tokensvc.api.request_id import valid_or_new
from tokensvc.api.security_headers import STATIC_HEADERS
from tokensvc.errors import TokenServiceError
from tokensvc.service.tokens import TokenService

_PATH = re.compile(r"/v1/users/([A-Za-z0-9._-]{1,64})/access-token")
_NO_STORE = [(b"cache-control", b"no-store")]
DEFAULT_MIN_TTL = 300
MAX_MIN_TTL = 3600


class AccessTokenFastPath:
    def __init__(self, app: ASGIApp, *, owner: FastAPI) -> None:
        self.app = app
        self._owner = owner  # its state holds the service once the lifespan has started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _PATH.fullmatch(scope["path"])
            if match is not None:
                min_ttl = _min_ttl(scope["query_string"])
                if min_ttl is not None:
                    authorization, request_id = _headers(scope)
                    if self._authorized(authorization):
                        # Bound like RequestId binds it, so what this call logs (a refresh, a failure) carries it;
                        # bind and reset, a fifth of `bound_contextvars`' cost on this path.
                        bound = bind_contextvars(request_id=request_id)
                        try:
                            response = await self._answer(match.group(1), min_ttl)
                        finally:
                            reset_contextvars(**bound)
                        response.raw_headers.append((REQUEST_ID_HEADER, request_id.encode("ascii")))
                        response.raw_headers.extend(STATIC_HEADERS)  # this path skips SecurityHeaders
                        await response(scope, receive, send)
                        return
        await self.app(scope, receive, send)

    def _authorized(self, authorization: bytes | None) -> bool:
        if authorization is None:
            return False
        keys: ApiKeys = self._owner.state.api_keys
        scheme, _, credential = authorization.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and keys.accepts(credential.strip())

    async def _answer(self, user_id: str, min_ttl: int) -> Response:
        service: TokenService = self._owner.state.token_service
        try:
            token = await service.access_token(user_id, min_ttl=min_ttl)
        except TokenServiceError as exc:
            return service_problem(exc)
        except DATABASE_ERRORS as exc:
            return database_problem(exc, path=f"/v1/users/{user_id}/access-token")
        response = Response(token.model_dump_json(), media_type="application/json")
        response.raw_headers.extend(_NO_STORE)
        return response


def _headers(scope: Scope) -> tuple[bytes | None, str]:
    """`Authorization` and the request id (the caller's `X-Request-ID`, or a new one), in one pass."""
    authorization = incoming_id = None
    for name, value in scope["headers"]:  # the first of each, as FastAPI's `request.headers` reads them
        if name == b"authorization" and authorization is None:
            authorization = value
        elif name == REQUEST_ID_HEADER and incoming_id is None:
            incoming_id = value
    return authorization, valid_or_new(incoming_id)


def _min_ttl(query_string: bytes) -> int | None:
    """`min_ttl` if the query is simple enough to check by hand (else None: let FastAPI validate it). A parameter
    given twice is FastAPI's to refuse (`single_query_values`)."""
    if not query_string:
        return DEFAULT_MIN_TTL
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    params = dict(pairs)
    if len(params) < len(pairs):
        return None
    value = params.get("min_ttl")
    if value is None:
        return DEFAULT_MIN_TTL
    if not value.isascii() or not value.isdigit() or int(value) > MAX_MIN_TTL:
        return None
    return int(value)
