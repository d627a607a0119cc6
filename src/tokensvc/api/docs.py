"""The API console: Swagger UI at /docs and ReDoc at /redoc, served with their assets by the service itself.

The assets come from the `fastapi-offline` package (Swagger UI's and ReDoc's release bundles, and a favicon), so
the pages load where the browser reaches nothing but this service: an internal network, an offline laptop. Each
page names no other host and carries its own Content-Security-Policy, which lets exactly these assets run: scripts
from this origin only (the start-up code is a file, not inline), the inline styles both UIs set, `data:` images
from Swagger's stylesheet, ReDoc's search worker (a `blob:`), and calls to this origin (Try it out, the OpenAPI).
"""

from __future__ import annotations

import html

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
# Ours first (the start-up script), then the package's bundles.
_ASSET_PACKAGES: list[str | tuple[str, str]] = [("tokensvc.api", "docs_static"), ("fastapi_offline", "static")]
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def install(app: FastAPI) -> None:
    """Serve the console pages and their assets on `app` (whose own /docs and /redoc are switched off)."""
    app.include_router(router)
    app.mount(ASSETS, StaticFiles(packages=_ASSET_PACKAGES), name="docs-assets")


def _page(request: Request, title: str, head: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title>"
        f"<link rel=icon type=image/png href='{_root(request)}{ASSETS}/favicon.png'>{head}</head>"
        f"<body style='margin:0'>{body}</body></html>",
        headers=_HEADERS,
    )


def _root(request: Request) -> str:
    """The prefix a proxy mounted the service under (ASGI `root_path`), already HTML-safe."""
    return html.escape(str(request.scope.get("root_path", "")).rstrip("/"), quote=True)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI: read the API, Authorize with an API key, and Try it out."""
    root = _root(request)
    return _page(
        request,
        f"{request.app.title} · API console",
        f"<link rel=stylesheet href='{root}{ASSETS}/swagger-ui.css'>",
        f"<div id=swagger-ui data-openapi-url='{root}{request.app.openapi_url}'></div>"
        f"<script src='{root}{ASSETS}/swagger-ui-bundle.js'></script>"
        f"<script src='{root}{ASSETS}/swagger-init.js'></script>",
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc: the same API as a reference to read."""
    root = _root(request)
    return _page(
        request,
        f"{request.app.title} · API reference",
        "",
        f"<redoc spec-url='{root}{request.app.openapi_url}'></redoc>"
        f"<script src='{root}{ASSETS}/redoc.standalone.js'></script>",
    )
