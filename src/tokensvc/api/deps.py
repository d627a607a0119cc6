"""Dependencies as `Annotated` aliases that read long-lived objects from app state."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tokensvc.errors import Unauthorized
from tokensvc.schemas import USER_ID_PATTERN
from tokensvc.service.tokens import TokenService


def get_token_service(request: Request) -> TokenService:
    service: TokenService = request.app.state.token_service
    return service


_bearer = HTTPBearer(auto_error=False, description="One of TOKENSVC_API_KEYS")


class ApiKeys:
    """The configured keys, kept as SHA-256 digests and compared in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def accepts(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).digest()
        # Compare against every key, without stopping at the first match, so timing says nothing about which.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        return any(matches)


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    keys: ApiKeys = request.app.state.api_keys
    if credentials is None or credentials.scheme.lower() != "bearer" or not keys.accepts(credentials.credentials):
        raise Unauthorized("a valid API key is required: `Authorization: Bearer <one of TOKENSVC_API_KEYS>`")


TokenServiceDep = Annotated[TokenService, Depends(get_token_service)]
UserId = Annotated[
    str, Path(pattern=USER_ID_PATTERN, description="The application's own user id: 1..64 of [A-Za-z0-9._-]")
]
