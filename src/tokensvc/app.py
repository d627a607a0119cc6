"""The application factory. The lifespan owns the engine, the Strava client and the token service."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import structlog
from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc import __version__
from tokensvc.api import (
    audit,
    browser,
    docs,
    gateway,
    health,
    oauth,
    openapi,
    operations,
    problems,
    tokens,
    webhooks,
)
from tokensvc.api import dashboard as dashboard_api
from tokensvc.api.cors import BrowserCORS
from tokensvc.api.deps import ApiKeys, single_query_values
from tokensvc.api.fastpath import AccessTokenFastPath
from tokensvc.api.inflight import InFlightLimit
from tokensvc.api.limits import BodySizeLimit
from tokensvc.api.request_id import RequestId
from tokensvc.api.security_headers import SecurityHeaders
from tokensvc.background import PeriodicJob
from tokensvc.clock import SYNC_INTERVAL_SECONDS, Clock, DatabaseClock
from tokensvc.config import Settings, sandbox_state_path
from tokensvc.crypto import TokenCipher
from tokensvc.db import make_engine
from tokensvc.providers.strava import StravaClient
from tokensvc.service.audit import Audit
from tokensvc.service.dashboard import DashboardService
from tokensvc.service.gateway import Gateway
from tokensvc.service.gateway_stats import GatewayTally
from tokensvc.service.grant_revocation import GrantRevoker
from tokensvc.service.housekeeping import Housekeeping
from tokensvc.service.journal import Journal
from tokensvc.service.notify import NotificationDeliverer
from tokensvc.service.oauth import ConnectLinks, OAuthService
from tokensvc.service.rate_budget import RateBudget
from tokensvc.service.revocation import SessionRevocations
from tokensvc.service.sessions import Sessions
from tokensvc.service.stats import StatsService
from tokensvc.service.sweeper import Sweeper
from tokensvc.service.tokens import TokenService
from tokensvc.service.usage import UsageRecorder
from tokensvc.service.webhooks import StravaWebhooks
from tokensvc.shutdown import Shutdown
from tokensvc.store.reader import RowReader, open_reader
from tokensvc.store.token_cache import CachedReader

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Resources:
    engine: AsyncEngine
    strava: StravaClient
    service: TokenService
    budget: RateBudget
    sweeper: Sweeper
    links: ConnectLinks
    oauth: OAuthService
    sessions: Sessions
    webhooks: StravaWebhooks
    notifier: NotificationDeliverer | None
    housekeeping: Housekeeping
    revoker: GrantRevoker
    audit: Audit
    stats: StatsService
    dashboard: DashboardService
    rows: RowReader
    clock: Clock
    clock_sync: PeriodicJob | None  # re-measures the offset of a DatabaseClock
    # /readyz's own one-connection pool: readiness answers at once however busy the main pool is
    probe: AsyncEngine
    usage: UsageRecorder | None = None  # who asks for tokens, flushed in batches
    gateway_tally: GatewayTally | None = None  # the gateway's outcomes, flushed in batches

    def start_background(self, *, sweeper: bool = True) -> None:
        """Start every replica's background loops; `open_resources` stops them on the way out."""
        if sweeper:
            self.sweeper.start()  # when TOKENSVC_SWEEP_INTERVAL_SECONDS > 0
        self.webhooks.start()  # when TOKENSVC_WEBHOOK_POLL_INTERVAL_SECONDS > 0
        if self.notifier is not None:
            self.notifier.start()
        self.housekeeping.start()
        self.revoker.start()  # when TOKENSVC_REVOKE_POLL_INTERVAL_SECONDS > 0
        if self.usage is not None:
            self.usage.job.start()
        if self.gateway_tally is not None:
            self.gateway_tally.job.start()
        self.stats.gauges.start()
        if self.clock_sync is not None:
            self.clock_sync.start()


@asynccontextmanager
async def open_resources(
    settings: Settings,
    *,
    clock: Clock | None = None,
    strava_transport: httpx.AsyncBaseTransport | None = None,
    shutdown: Shutdown | None = None,
) -> AsyncIterator[Resources]:
    """Engine, Strava client and token service for a prepared `Settings`; drained and closed on the way out
    within `shutdown`'s deadline (TOKENSVC_SHUTDOWN_TIMEOUT_SECONDS).

    The clock is the database's (`DatabaseClock`, measured here and re-measured by a background job) unless one
    is given (tests pass a fake one)."""
    shutdown = shutdown if shutdown is not None else Shutdown(settings.shutdown_timeout_seconds)
    engine, probe = _engines(settings)
    clock = clock if clock is not None else DatabaseClock()
    clock_sync = await _start_clock(clock, engine)
    res = _build_resources(settings, engine, probe, clock, clock_sync, strava_transport)
    try:
        yield res
    finally:
        await _close(res, shutdown)


def _build_resources(
    settings: Settings,
    engine: AsyncEngine,
    probe: AsyncEngine,
    clock: Clock,
    clock_sync: PeriodicJob | None,
    strava_transport: httpx.AsyncBaseTransport | None,
) -> Resources:
    """Every service of a replica, in the order they need each other (nothing runs yet: `start_background`)."""
    budget = _rate_budget(settings, engine, clock)
    strava = _strava_client(settings, budget, clock, strava_transport)
    parts = _Parts(settings, engine, clock, budget, strava, TokenCipher(settings.all_encryption_keys))
    secret = _session_secret(settings)
    links = _connect_links(settings, strava, secret, clock)
    rows = _row_reader(settings, engine, clock)
    revoker = _revoker(parts)
    service = _token_service(parts, rows, links, revoker)
    usage = UsageRecorder(engine, clock=clock, buffer_seconds=settings.refresh_buffer_seconds)
    service.usage = usage
    gateway_tally = GatewayTally(engine, clock=clock, flush_interval_seconds=settings.gauge_interval_seconds)
    return Resources(
        engine=engine,
        strava=strava,
        service=service,
        budget=budget,
        sweeper=_sweeper(parts, service),
        links=links,
        oauth=OAuthService(links=links, tokens=service, strava=strava, engine=engine, clock=clock),
        sessions=Sessions(secret, ttl_seconds=settings.session_ttl_seconds, clock=clock),
        webhooks=_strava_webhooks(parts, service),
        notifier=notification_deliverer(settings, engine, clock=clock),
        housekeeping=Housekeeping(engine, clock=clock, retention_days=settings.audit_retention_days),
        revoker=revoker,
        audit=Audit(engine),
        stats=_stats(parts, gateway_tally),
        dashboard=_dashboard(parts),
        rows=rows,
        clock=clock,
        clock_sync=clock_sync,
        probe=probe,
        usage=usage,
        gateway_tally=gateway_tally,
    )


@dataclass(frozen=True, slots=True)
class _Parts:
    """What most of a replica's services are built from (`_build_resources`)."""

    settings: Settings
    engine: AsyncEngine
    clock: Clock
    budget: RateBudget
    strava: StravaClient
    cipher: TokenCipher


def _engines(settings: Settings) -> tuple[AsyncEngine, AsyncEngine]:
    """The main engine, and /readyz's own one-connection engine."""
    engine = make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        pool_timeout_seconds=settings.db_pool_timeout_seconds,
        lock_timeout_seconds=settings.lock_timeout_seconds,
        statement_cache=settings.db_statement_cache,
    )
    probe = make_engine(
        settings.database_url, pool_size=1, lock_timeout_seconds=1.0, statement_cache=settings.db_statement_cache
    )
    return engine, probe


def _rate_budget(settings: Settings, engine: AsyncEngine, clock: Clock) -> RateBudget:
    limit_15min, limit_daily = settings.rate_limits
    read_15min, read_daily = settings.read_rate_limits
    return RateBudget(
        engine,
        limit_15min=limit_15min,
        limit_daily=limit_daily,
        read_limit_15min=read_15min,
        read_limit_daily=read_daily,
        clock=clock,
    )


def _strava_client(
    settings: Settings, budget: RateBudget, clock: Clock, transport: httpx.AsyncBaseTransport | None
) -> StravaClient:
    return StravaClient(
        base_url=settings.strava_base_url,
        client_id=settings.strava_client_id or "",
        client_secret=settings.strava_client_secret.get_secret_value() if settings.strava_client_secret else "",
        timeout=settings.strava_timeout_seconds,
        token_timeout=settings.strava_token_timeout_seconds,
        transport=transport,
        clock=clock,
        on_usage=budget.note_usage,
        token_concurrency=settings.strava_token_concurrency,
        api_base_url=settings.api_base_url,
    )


def _session_secret(settings: Settings) -> str:
    """`prepare` guarantees a secret for `serve`; commands that serve no browser may sign with a throwaway one."""
    return settings.session_secret.get_secret_value() if settings.session_secret else secrets.token_urlsafe(32)


def _connect_links(settings: Settings, strava: StravaClient, secret: str, clock: Clock) -> ConnectLinks:
    return ConnectLinks(
        strava=strava,
        secret=secret,
        redirect_uri=f"{settings.public_url}/v1/oauth/strava/callback",
        default_scopes=settings.scopes,
        allowlist=settings.redirect_allowlist,
        clock=clock,
    )


def _row_reader(settings: Settings, engine: AsyncEngine, clock: Clock) -> RowReader:
    """The hot path's reader; on Postgres with TOKENSVC_TOKEN_CACHE, behind the token cache (started here).
    The connection budget (config.py): the engine's pool, this reader's pool, the token cache's listener."""
    rows: RowReader = open_reader(
        engine,
        size=settings.db_reader_pool_size,
        statement_cache=settings.db_statement_cache,
        acquire_timeout_seconds=settings.db_pool_timeout_seconds,
    )
    if not (settings.token_cache and engine.dialect.name == "postgresql"):
        return rows
    buffer = settings.refresh_buffer_seconds
    cache = CachedReader(
        rows,
        dsn=engine.url.set(drivername="postgresql").render_as_string(hide_password=False),
        max_entries=settings.token_cache_max_entries,
        # only `valid` rows: anything due for a refresh, or flagged, is read from the database every time
        keep=lambda row: row.reauth_reason is None and row.expires_at - clock() > buffer,
    )
    cache.start()
    return cache


def _revoker(p: _Parts) -> GrantRevoker:
    return GrantRevoker(
        engine=p.engine,
        cipher=p.cipher,
        strava=p.strava,
        budget=p.budget,
        clock=p.clock,
        endpoint=p.settings.strava_revoke_endpoint,
        interval_seconds=p.settings.revoke_poll_interval_seconds,
    )


def _token_service(p: _Parts, rows: RowReader, links: ConnectLinks, revoker: GrantRevoker) -> TokenService:
    settings = p.settings
    journal = Journal(
        clock=p.clock,
        notify=settings.notify_url is not None,
        connect_url=f"{settings.public_url}/v1/oauth/strava/authorize" if settings.public_url else None,
    )
    return TokenService(
        engine=p.engine,
        budget=p.budget,
        rows=rows,
        cipher=p.cipher,
        strava=p.strava,
        clock=p.clock,
        buffer_seconds=settings.refresh_buffer_seconds,
        claim_seconds=settings.refresh_claim_seconds,
        write_budget_seconds=settings.refresh_write_budget_seconds,
        token_timeout_seconds=settings.strava_token_timeout_seconds,
        authorize_url=links.for_user,
        journal=journal,
        revoker=revoker,
    )


def _sweeper(p: _Parts, service: TokenService) -> Sweeper:
    settings = p.settings
    return Sweeper(
        engine=p.engine,
        tokens=service,
        clock=p.clock,
        concurrency=settings.sweep_concurrency,
        batch_size=settings.sweep_batch_size,
        lease_seconds=settings.sweep_lease_seconds,
        interval_seconds=settings.sweep_interval_seconds,
        active_days=settings.sweep_active_days,
        keepalive_days=settings.sweep_idle_keepalive_days,
    )


def _strava_webhooks(p: _Parts, service: TokenService) -> StravaWebhooks:
    settings = p.settings
    verify_token = settings.strava_webhook_verify_token
    path_secret = settings.strava_webhook_path_secret
    return StravaWebhooks(
        engine=p.engine,
        tokens=service,
        strava=p.strava,
        budget=p.budget,
        verify_token=verify_token.get_secret_value() if verify_token else None,
        clock=p.clock,
        path_secret=path_secret.get_secret_value() if path_secret else None,
        forward_per_athlete_hour=settings.webhook_forward_per_athlete_hour,
        poll_interval_seconds=settings.webhook_poll_interval_seconds,
    )


def _stats(p: _Parts, tally: GatewayTally) -> StatsService:
    settings = p.settings
    return StatsService(
        p.engine,
        budget=p.budget,
        tally=tally,
        clock=p.clock,
        buffer_seconds=settings.refresh_buffer_seconds,
        gauge_interval_seconds=settings.gauge_interval_seconds,
        active_days=settings.sweep_active_days,
        athlete_capacity=settings.strava_athlete_capacity,
    )


def _dashboard(p: _Parts) -> DashboardService:
    return DashboardService(
        engine=p.engine,
        budget=p.budget,
        clock=p.clock,
        buffer_seconds=p.settings.refresh_buffer_seconds,
        active_days=p.settings.sweep_active_days,
        athlete_capacity=p.settings.strava_athlete_capacity,
    )


async def _close(res: Resources, shutdown: Shutdown) -> None:
    """Refreshes in flight finish (or give their claim back) while every loop stops, all at once; then the usage
    noted so far is written, and the client and the engines close. Each step gets what is left of the one deadline."""
    left = shutdown.remaining()
    periodic = (res.clock_sync, res.stats.gauges, res.housekeeping.job)
    loops = [job.stop(deadline_seconds=left) for job in periodic if job]
    stops = [
        *loops,
        res.revoker.stop(deadline_seconds=left),
        res.webhooks.stop(deadline_seconds=left),
        res.sweeper.stop(deadline_seconds=left),
        *([res.notifier.stop(deadline_seconds=left)] if res.notifier else []),
    ]
    service_closed = res.service.aclose(max(0.5, left - CLOSE_RESERVE_SECONDS))
    drained = asyncio.gather(service_closed, *stops, return_exceptions=True)
    try:
        await asyncio.wait_for(drained, timeout=max(1.0, left - CLOSE_RESERVE_SECONDS / 2))
    except TimeoutError:
        log.warning("service.shutdown_deadline_passed", deadline_seconds=shutdown.timeout_seconds)
    for flushed in (res.usage, res.gateway_tally):  # what is left of the noted uses and gateway outcomes
        if flushed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flushed.job.stop(), timeout=max(0.5, shutdown.remaining()))
    await res.rows.aclose()
    await res.strava.aclose()
    await res.engine.dispose()
    await res.probe.dispose()
    log.info("service.drained", seconds_left=round(shutdown.remaining(), 1))


# What the shutdown keeps back from the drain for closing the client and the engines.
CLOSE_RESERVE_SECONDS = 2.0


def create_app(
    settings: Settings,
    *,
    sandbox: bool = False,
    clock: Clock | None = None,
    strava_transport: httpx.AsyncBaseTransport | None = None,
    run_sweeper: bool = True,
    fast_path: bool = True,
) -> FastAPI:
    """Build the ASGI app from prepared settings (see `config.prepare`). The background sweeper runs when
    `run_sweeper` and TOKENSVC_SWEEP_INTERVAL_SECONDS > 0; `fast_path=False` leaves access-token to FastAPI alone
    (tests compare the two). The clock is the database's unless one is given (see `open_resources`)."""
    app_clock = clock if clock is not None else DatabaseClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_resources(
            settings, clock=app_clock, strava_transport=strava_transport, shutdown=app.state.shutdown
        ) as res:
            _publish(app, res, settings)
            res.start_background(sweeper=run_sweeper)
            # What start-up allocated lives as long as the process: keep it out of every garbage collection.
            gc.collect()
            gc.freeze()
            log.info("service.started", strava_base_url=settings.strava_base_url, sandbox=sandbox)
            yield
        log.info("service.stopped")

    app = FastAPI(
        title="tokensvc",
        version=__version__,
        summary="Keeps Strava OAuth tokens fresh for every user of an application.",
        lifespan=lifespan,
        openapi_tags=openapi.TAGS,
        generate_unique_id_function=openapi.operation_id,
        # api/docs.py serves the console with its own assets (no CDN) under its own CSP.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        dependencies=[Depends(single_query_values)],
    )
    _configure(app, settings)
    _install_routes(app, settings, clock=app_clock)
    if sandbox:
        _mount_sandbox(app, settings)
    _install_middleware(app, settings, fast_path=fast_path)
    return app


def _publish(app: FastAPI, res: Resources, settings: Settings) -> None:
    """What the routers find on `app.state` once the lifespan has opened the resources."""
    app.state.engine = res.engine
    app.state.probe_engine = res.probe
    app.state.token_service = res.service
    app.state.connect_links = res.links
    app.state.oauth_service = res.oauth
    app.state.sessions = res.sessions
    app.state.revocations = SessionRevocations(res.engine, clock=res.clock)
    app.state.sweeper = res.sweeper
    app.state.dashboard = res.dashboard
    app.state.audit = res.audit
    app.state.stats = res.stats
    app.state.webhooks = res.webhooks
    app.state.gateway = Gateway(
        tokens=res.service,
        strava=res.strava,
        budget=res.budget,
        authorize_url=lambda user_id, scopes: res.links.authorize_url(user_id, scopes=scopes)[0],
        tally=res.stats.tally,
    )
    app.state.gateway_max_body_bytes = settings.gateway_max_body_bytes


def _configure(app: FastAPI, settings: Settings) -> None:
    """What the app knows before the lifespan runs: its settings, its shutdown, the API keys and origins."""
    app.state.settings = settings
    app.state.shutdown = Shutdown(settings.shutdown_timeout_seconds)  # begun by SIGTERM (cli.serve) or the lifespan
    app.state.api_keys = ApiKeys([k.get_secret_value() for k in settings.api_keys])
    app.state.allowed_origins = frozenset([_origin_of(settings.public_url or ""), *_cors_origins(settings)])


def _install_routes(app: FastAPI, settings: Settings, *, clock: Clock) -> None:
    problems.install(app)
    openapi.install(app)
    docs.install(app)
    app.include_router(health.router)
    app.include_router(tokens.router)
    app.include_router(operations.router)
    app.include_router(oauth.service_router)
    app.include_router(oauth.browser_router)
    app.include_router(browser.router)
    app.include_router(audit.router)
    dashboard_api.install(app, settings, clock=clock)
    app.include_router(webhooks.router)
    app.include_router(gateway.router)


def _mount_sandbox(app: FastAPI, settings: Settings) -> None:
    """`serve --sandbox`: the Strava emulator under /sandbox/strava, on the service's own port."""
    from tokensvc.sandbox import create_sandbox_app

    app.mount(
        "/sandbox/strava",
        create_sandbox_app(
            client_id=settings.strava_client_id or "",
            client_secret=settings.strava_client_secret.get_secret_value() if settings.strava_client_secret else "",
            state_file=sandbox_state_path(settings),  # Strava remembers its grants across our restarts
        ),
    )


def _install_middleware(app: FastAPI, settings: Settings, *, fast_path: bool) -> None:
    """Innermost first: each one added wraps those before it."""
    app.add_middleware(BrowserCORS, origins=_cors_origins(settings))
    app.add_middleware(BodySizeLimit)  # 64 KiB and no lone surrogates, read once
    app.add_middleware(RequestId)  # inside the fast path, so the hot call pays nothing for it
    app.add_middleware(SecurityHeaders)  # every answer but the fast path's, which adds them itself
    if fast_path:
        app.add_middleware(AccessTokenFastPath, owner=app)  # the hot call skips everything else
    app.add_middleware(InFlightLimit, limit=settings.max_requests_in_flight)  # outermost: refusing costs nothing


def notification_deliverer(
    settings: Settings, engine: AsyncEngine, *, clock: Clock, transport: httpx.AsyncBaseTransport | None = None
) -> NotificationDeliverer | None:
    """The outbox deliverer every replica runs when TOKENSVC_NOTIFY_URL is set (None otherwise)."""
    if settings.notify_url is None or settings.notify_secret is None:
        return None
    return NotificationDeliverer(
        engine=engine,
        url=settings.notify_url,
        secret=settings.notify_secret.get_secret_value(),
        clock=clock,
        timeout_seconds=settings.notify_timeout_seconds,
        poll_seconds=settings.notify_poll_seconds,
        concurrency=settings.notify_concurrency,
        backoff_seconds=settings.notify_backoff_seconds,
        backoff_max_seconds=settings.notify_backoff_max_seconds,
        transport=transport,
    )


CLOCK_SYNC_DEADLINE_SECONDS = 3.0


async def _start_clock(clock: Clock, engine: AsyncEngine) -> PeriodicJob | None:
    """Measure a DatabaseClock's offset now (best effort: a database that is down must not stop the start; the
    job measures again later) and return the job that keeps it measured; None for any other clock."""
    if not isinstance(clock, DatabaseClock):
        return None
    try:
        await asyncio.wait_for(clock.sync(engine), timeout=CLOCK_SYNC_DEADLINE_SECONDS)
    except Exception as exc:  # the database's errors, or the deadline: run on local time until the next measurement
        log.warning("clock.sync_failed", error=type(exc).__name__)
    return PeriodicJob(
        "clock-sync", lambda: clock.sync(engine), interval_seconds=SYNC_INTERVAL_SECONDS, run_at_start=False
    )


def _cors_origins(settings: Settings) -> list[str]:
    return [origin.rstrip("/") for origin in settings.cors_origins]


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
