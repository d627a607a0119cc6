"""CORS for the browser endpoints only, for the exact configured origins, with credentials."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

BROWSER_PATHS = ("/proactive-token-refresh", "/v1/me/")


class BrowserCORS:
    """The service API is for servers; only the dashboard's endpoints answer browsers from other origins."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_credentials=True,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(BROWSER_PATHS):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
