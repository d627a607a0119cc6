"""The operators' dashboard at /dashboard: server-rendered HTML behind an admin login (not part of the OpenAPI API).

Sign in with TOKENSVC_ADMIN_PASSWORD (only: the form is no oracle for API keys), throttled per client
(service/sign_in.py); the login sets a signed, expiring `tokensvc_admin` cookie (HttpOnly, SameSite=Strict, scoped
to /dashboard). `Authorization: Bearer <api key>` also opens the page, for scripts and curl.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from tokensvc.api.dashboard_page import render_dashboard, render_login
from tokensvc.api.deps import ApiKeys, from_app_state
from tokensvc.api.problems import service_problem
from tokensvc.clock import Clock
from tokensvc.config import Settings
from tokensvc.errors import TooManyRequests
from tokensvc.service.dashboard import ADMIN_COOKIE, AdminSessions, DashboardService
from tokensvc.service.revocation import ADMIN, SessionRevocations
from tokensvc.service.sign_in import SignInThrottle, client_key

log = structlog.get_logger(__name__)

PREFIX = "/dashboard"
ADMIN_TTL_SECONDS = 8 * 3600
MAX_SECRET_LENGTH = 1024
# The pages need nothing but their own inline CSS: no script, no other origin, no framing.
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    # Not `no-referrer`: with it Chromium sends `Origin: null` on the form's POST, which the Origin check refuses.
    "Referrer-Policy": "same-origin",
}

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@dataclass(frozen=True, slots=True)
class DashboardAuth:
    """Who may sign in (the admin password, as a digest), the cookie signer, and the page's origin."""

    accepted: ApiKeys
    api_keys: ApiKeys
    sessions: AdminSessions
    origin: str
    secure_cookie: bool
    clock: Clock


def install(app: FastAPI, settings: Settings, *, clock: Clock) -> None:
    """Mount the dashboard on `app` (prepared settings; the session secret signs the admin cookie too)."""
    api_keys = [k.get_secret_value() for k in settings.api_keys]
    password = settings.admin_password.get_secret_value() if settings.admin_password else ""
    # `prepare` guarantees a session secret for `serve`; elsewhere a throwaway one makes logins last one process.
    secret = settings.session_secret.get_secret_value() if settings.session_secret else secrets.token_urlsafe(32)
    public = urlsplit(settings.public_url or "")
    app.state.dashboard_auth = DashboardAuth(
        accepted=ApiKeys([password] if password else []),
        api_keys=ApiKeys(api_keys),
        sessions=AdminSessions(secret, ttl_seconds=ADMIN_TTL_SECONDS, clock=clock),
        origin=f"{public.scheme}://{public.netloc}",
        secure_cookie=public.scheme == "https",
        clock=clock,
    )
    app.include_router(router)


get_auth = from_app_state("dashboard_auth", DashboardAuth)
get_dashboard = from_app_state("dashboard", DashboardService)


AuthDep = Annotated[DashboardAuth, Depends(get_auth)]


def _page(html: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status_code, headers=_HEADERS)


def _see_other(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303, headers=_HEADERS)


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _foreign_origin(request: Request, auth: AuthDep) -> HTMLResponse | None:
    """A 403 page for a form posted from another origin (a browser sends Origin with every POST)."""
    origin = request.headers.get("origin")
    if origin is None or origin.rstrip("/") == auth.origin:
        return None
    log.warning("dashboard.post.foreign_origin", origin=origin[:200])
    return _page(render_login(error="This form may only be sent from the dashboard's own pages."), 403)


def _revocations(request: Request) -> SessionRevocations:
    revocations: SessionRevocations = request.app.state.revocations
    return revocations


async def _signed_in(request: Request, auth: DashboardAuth) -> bool:
    """An admin cookie that is signed, unexpired, and minted after the last sign-out."""
    issued_ms = auth.sessions.issued_ms(request.cookies.get(ADMIN_COOKIE))
    return issued_ms is not None and not await _revocations(request).is_revoked(ADMIN, issued_ms=issued_ms)


@router.get("", response_class=HTMLResponse)
async def dashboard(
    request: Request, auth: AuthDep, service: Annotated[DashboardService, Depends(get_dashboard)]
) -> Response:
    """The dashboard for a signed-in operator (cookie or API key); anyone else is sent to the sign-in form."""
    presented = _bearer(request)
    if presented is not None:
        if not auth.api_keys.accepts(presented):
            return _page(render_login(error="That API key is not valid."), 401)
    elif not await _signed_in(request, auth):
        return _see_other(f"{PREFIX}/login")
    return _page(render_dashboard(await service.view()))


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, auth: AuthDep) -> Response:
    """The sign-in form (straight to the dashboard when already signed in)."""
    if await _signed_in(request, auth):
        return _see_other(PREFIX)
    return _page(render_login())


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, auth: AuthDep) -> Response:
    """Check the admin password (throttled per client) and set the admin cookie."""
    if (refused := _foreign_origin(request, auth)) is not None:
        return refused
    client = client_key(request.client.host if request.client else None)
    throttle = SignInThrottle(request.app.state.engine, clock=auth.clock)
    try:
        await throttle.check(client)
    except TooManyRequests as exc:
        log.warning("dashboard.login.throttled", client=client, retry_after=exc.retry_after)
        return _too_many(request, exc)
    form = await request.form(max_files=0, max_fields=4)
    secret = form.get("secret")
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET_LENGTH or not auth.accepted.accepts(secret):
        wait = await throttle.failed(client)
        log.warning("dashboard.login.failed", client=client, wait_seconds=wait)
        return _page(render_login(error="That is not the admin password."), 401)
    await throttle.succeeded(client)
    log.info("dashboard.login.succeeded", client=client)
    response = _see_other(PREFIX)
    response.set_cookie(
        ADMIN_COOKIE,
        auth.sessions.mint(),
        max_age=auth.sessions.ttl_seconds,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=auth.secure_cookie,
    )
    return response


def _too_many(request: Request, exc: TooManyRequests) -> Response:
    """429 with Retry-After: the sign-in page for a browser, problem+json for anything else."""
    if "text/html" in request.headers.get("accept", ""):
        message = f"Too many failed sign-ins from this address: try again in {exc.retry_after} seconds."
        page = _page(render_login(error=message), 429)
        page.headers["Retry-After"] = str(exc.retry_after)
        return page
    return service_problem(exc)


@router.post("/logout", response_class=HTMLResponse)
async def logout(request: Request, auth: AuthDep) -> Response:
    """End every admin session (on every replica) and forget the cookie."""
    if (refused := _foreign_origin(request, auth)) is not None:
        return refused
    await _revocations(request).revoke(ADMIN)
    log.info("dashboard.logout", client=client_key(request.client.host if request.client else None))
    response = _see_other(f"{PREFIX}/login")
    response.delete_cookie(ADMIN_COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=auth.secure_cookie)
    return response
