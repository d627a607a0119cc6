"""Dependencies as `Annotated` aliases that read long-lived objects from app state.

All are `async def`: FastAPI runs plain `def` dependencies in a thread pool, a hop that cost the access-token hot
path a tenth of its CPU (bench/README.md).
"""

from __future__ import annotations

import hashlib
import hmac
import types
import typing
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from tokensvc.errors import Forbidden, Unauthorized, UnsupportedMediaType
from tokensvc.schemas import USER_ID_PATTERN
from tokensvc.service.oauth import ConnectLinks, OAuthService
from tokensvc.service.revocation import SessionRevocations, user_subject
from tokensvc.service.sessions import COOKIE_NAME, Session, Sessions
from tokensvc.service.tokens import TokenService

T = TypeVar("T")


def from_app_state(name: str, kind: type[T]) -> Callable[[Request], Coroutine[Any, Any, T]]:
    """A dependency handing over what the lifespan put in `app.state.<name>` (a `kind`: the type says so)."""

    async def dependency(request: Request) -> T:
        value: T = getattr(request.app.state, name)
        return value

    return dependency


async def single_query_values(request: Request) -> None:
    """A parameter declared as one value, given twice, is refused (422) rather than silently taking the last one."""
    names = [name for name, _ in request.query_params.multi_items()]
    repeated = {name for name in names if names.count(name) > 1}
    if not repeated:
        return
    route = request.scope.get("route")
    lists = {param.alias for param in getattr(getattr(route, "dependant", None), "query_params", ()) if _is_list(param)}
    errors = [
        {"type": "repeated", "loc": ("query", name), "msg": "give this parameter once", "input": None}
        for name in sorted(repeated - lists)
    ]
    if errors:
        raise RequestValidationError(errors)


def _is_list(param: Any) -> bool:
    annotation = param.field_info.annotation
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return any(typing.get_origin(option) in (list, set, tuple) for option in options)


get_token_service = from_app_state("token_service", TokenService)
get_oauth_service = from_app_state("oauth_service", OAuthService)
get_links = from_app_state("connect_links", ConnectLinks)
get_sessions = from_app_state("sessions", Sessions)


# The OpenAPI's security schemes: each names how a caller proves who it is, and sits on the operations that take it.
_api_key = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="The service API: `Authorization: Bearer <one of TOKENSVC_API_KEYS>`",
)
_session_cookie = APIKeyCookie(
    name=COOKIE_NAME,
    auto_error=False,
    scheme_name="SessionCookie",
    description="A browser session: the HttpOnly cookie the OAuth callback sets",
)
_session_token = HTTPBearer(
    auto_error=False,
    scheme_name="SessionToken",
    description="A browser session as a bearer: the `session_token` of `POST /v1/users/{user_id}/session`",
)


async def optional_session(
    request: Request,
    cookie: Annotated[str | None, Depends(_session_cookie)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_session_token)],
) -> Session | None:
    """The browser's session, from the `tokensvc_session` cookie or an `Authorization: Bearer <session token>`.

    A user id the browser sends in any other way is never trusted.
    """
    sessions: Sessions = request.app.state.sessions
    session = sessions.verify(cookie)
    if session is None and bearer is not None and bearer.scheme.lower() == "bearer":
        session = sessions.verify(bearer.credentials.strip())
    revocations: SessionRevocations = request.app.state.revocations
    if session is not None and await revocations.is_revoked(user_subject(session.user_id), issued_ms=session.issued_ms):
        return None  # ended by `DELETE …/tokens`
    return session


async def require_session(session: Annotated[Session | None, Depends(optional_session)]) -> Session:
    if session is None:
        raise Unauthorized("a browser session is required: connect with Strava first, or have the app mint one")
    return session


async def browser_post_guard(request: Request) -> None:
    """Cross-site protection for cookie-authenticated POSTs: JSON only (415), and a known Origin (403)."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType("send `Content-Type: application/json`")
    origin = request.headers.get("origin")
    allowed: frozenset[str] = request.app.state.allowed_origins
    if origin is not None and origin.rstrip("/") not in allowed:
        raise Forbidden("this origin may not call tokensvc's browser endpoints (see TOKENSVC_CORS_ORIGINS)")


class ApiKeys:
    """The configured keys, kept as SHA-256 digests and compared in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def accepts(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).digest()
        # Compare against every key, without stopping at the first match, so timing says nothing about which.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        return any(matches)


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_api_key)]
) -> None:
    keys: ApiKeys = request.app.state.api_keys
    if credentials is None or credentials.scheme.lower() != "bearer" or not keys.accepts(credentials.credentials):
        raise Unauthorized("a valid API key is required: `Authorization: Bearer <one of TOKENSVC_API_KEYS>`")


TokenServiceDep = Annotated[TokenService, Depends(get_token_service)]
OAuthServiceDep = Annotated[OAuthService, Depends(get_oauth_service)]
LinksDep = Annotated[ConnectLinks, Depends(get_links)]
SessionsDep = Annotated[Sessions, Depends(get_sessions)]
OptionalSession = Annotated[Session | None, Depends(optional_session)]
RequiredSession = Annotated[Session, Depends(require_session)]
UserId = Annotated[
    str, Path(pattern=USER_ID_PATTERN, description="The application's own user id: 1..64 of [A-Za-z0-9._-]")
]
