"""The `tokensvc` command line (Typer)."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import structlog
import typer
import uvicorn
from pydantic import SecretStr, ValidationError
from sqlalchemy.engine import make_url

from tokensvc import logging as tokensvc_logging
from tokensvc.config import SANDBOX_API_KEY, ConfigError, Settings, encryption_keys, prepare
from tokensvc.crypto import generate_key, generate_notify_secret
from tokensvc.edge import EdgeLimits, edge_protocol
from tokensvc.service.keys import BatchDone, KeyRotator, RotationReport
from tokensvc.service.sweeper import SweepReport

if TYPE_CHECKING:
    from tokensvc.providers.strava import StravaClient

_T = TypeVar("_T")

KEEP_ALIVE_SECONDS = 75

app = typer.Typer(
    name="tokensvc",
    help="Keeps Strava OAuth tokens fresh for every user of an application.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"tokensvc: {message}", err=True)
    return typer.Exit(code=2)


def _load_settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"TOKENSVC_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise _fail(f"invalid settings: {problems}") from exc
    # Before anything logs: logs go to stderr, so stdout carries only a command's result.
    tokensvc_logging.configure(settings.log_level)
    return settings


def _storage_settings() -> Settings:
    """Settings for commands that touch only the database (migrate, import): no Strava credentials needed."""
    settings = _load_settings()
    try:
        keys = encryption_keys(settings)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    return settings.model_copy(update={"encryption_keys": [SecretStr(k) for k in keys]})


async def _migrate(database_url: str, *, statement_cache: bool = True) -> None:
    from tokensvc.db import make_engine, migrate

    engine = make_engine(database_url, pool_size=1, statement_cache=statement_cache)  # one connection, then closed
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port)")] = 8000,
    sandbox: Annotated[
        bool, typer.Option("--sandbox", help="Mount the built-in Strava emulator and use it instead of Strava")
    ] = False,
    migrate: Annotated[bool, typer.Option("--migrate/--no-migrate", help="Migrate the database first")] = True,
) -> None:
    """Run the HTTP service."""
    settings = _load_settings()
    # The port first: a clash is one sentence before any migration, sweep or start-up work has been done.
    listener = _listen(host, port)
    port = listener.getsockname()[1]
    try:
        prepared = prepare(settings, sandbox=sandbox, host=host, port=port)
    except ConfigError as exc:
        listener.close()
        raise _fail(str(exc)) from exc
    if migrate:
        asyncio.run(_migrate(prepared.database_url, statement_cache=prepared.db_statement_cache))
    from tokensvc.app import create_app

    if sandbox:
        _print_sandbox_tour(prepared)
    application = create_app(prepared, sandbox=sandbox)
    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        # Requests in flight get most of TOKENSVC_SHUTDOWN_TIMEOUT_SECONDS; the lifespan's drain the rest.
        timeout_graceful_shutdown=max(1, int(prepared.shutdown_timeout_seconds * 0.6)),
        # Longer than the idle timeout of clients' pools (httpx: 5 s, the same as uvicorn's default, so a request
        # could meet the server's close on a reused connection) and of load balancers (typically 60 s): the
        # caller, not the server, should be the one to close an idle connection.
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        # h11 with a head cap and read deadlines (edge.py); httptools has neither.
        http=edge_protocol(
            EdgeLimits(
                max_header_bytes=prepared.max_header_bytes,
                header_timeout_seconds=prepared.header_timeout_seconds,
                body_timeout_seconds=prepared.body_timeout_seconds,
            )
        ),
        # X-Forwarded-For / -Proto only from TOKENSVC_TRUSTED_PROXIES (uvicorn would trust 127.0.0.1 by default).
        proxy_headers=bool(prepared.trusted_proxies),
        forwarded_allow_ips=prepared.trusted_proxies or None,
    )
    server = _DrainingServer(config, on_exit=application.state.shutdown.begin)
    # Uvicorn announces its address only for sockets it bound itself.
    structlog.get_logger(__name__).info("server.listening", host=host, port=port, public_url=prepared.public_url)
    server.run(sockets=[listener])
    if not server.started:
        raise typer.Exit(code=3)  # the app failed to start (uvicorn logged why), as `uvicorn.run` exits


class _DrainingServer(uvicorn.Server):
    """Uvicorn, telling the app the moment a signal asks it to stop: readiness fails from then on."""

    def __init__(self, config: uvicorn.Config, *, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn to serve on; exit 2 with one sentence when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a TIME_WAIT is no clash
    try:
        listener.bind((host.strip("[]"), port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise _fail(
                f"port {port} on {host} is already in use (another tokensvc, or another server): stop that one, "
                f"or choose another port with --port (make run PORT=...)"
            ) from None
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


def _print_sandbox_tour(settings: Settings) -> None:
    """Commands a newcomer can paste as they are: a sandbox athlete's pair piped into the import, then the API."""
    base = settings.public_url
    key = settings.api_keys[0].get_secret_value() if settings.api_keys else ""
    # Only the sandbox's own, public key is printed: a key the operator configured is a secret.
    shown_key = key if key == SANDBOX_API_KEY else "<one of TOKENSVC_API_KEYS>"
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    typer.echo(
        f"""
tokensvc is starting on {base} with the built-in Strava sandbox ({database}).
Try it (paste into a shell):
  B={base} A='authorization: Bearer {shown_key}' J='content-type: application/json'
  # an athlete connected in the sandbox, 10 minutes left on its access token, imported as user 42:
  curl -s -X POST $B/sandbox/strava/_control/athletes -H "$J" -d '{{"expires_in": 600}}' \\
    | curl -s -X PUT $B/v1/users/42/tokens -H "$A" -H "$J" --data-binary @-; echo
  curl -s $B/v1/users/42/token-status -H "$A"; echo
  curl -s "$B/v1/users/42/access-token?min_ttl=900" -H "$A"; echo
  curl -s -X POST "$B/v1/users/42/refresh?force=true" -H "$A"; echo
API docs: {base}/docs
""",
        err=True,
    )


@app.command("migrate")
def migrate_command() -> None:
    """Migrate the database to the newest schema (for a prestart step); safe to run from several replicas."""
    settings = _load_settings()
    asyncio.run(_migrate(settings.database_url, statement_cache=settings.db_statement_cache))
    typer.echo("database is at the newest schema")


@app.command("refresh-due")
def refresh_due() -> None:
    """Refresh every user that is due now (for cron or a cloud scheduler); exits 1 when any refresh failed.

    Uses the same bounded concurrency, rate budget and exactly-once rules as the service's own sweeper, so it is
    safe to run while replicas are serving.
    """
    settings = _storage_settings()
    if not settings.strava_client_id or settings.strava_client_secret is None:
        raise _fail("set TOKENSVC_STRAVA_CLIENT_ID and TOKENSVC_STRAVA_CLIENT_SECRET: refreshing calls Strava")
    report = asyncio.run(_refresh_due(settings, show_progress=sys.stdout.isatty()))
    typer.echo(
        f"checked {report.checked}, refreshed {report.refreshed}, failed {report.failed}, "
        f"needs_reauth {report.needs_reauth}"
    )
    if report.failed:
        raise typer.Exit(code=1)


async def _refresh_due(settings: Settings, *, show_progress: bool) -> SweepReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokensvc.app import open_resources

    async with open_resources(settings) as res:
        if not show_progress:
            return await res.sweeper.sweep_once()
        total = await res.sweeper.count_due()
        columns = (TextColumn("refreshing due users"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True) as progress:
            bar = progress.add_task("sweep", total=total)
            return await res.sweeper.sweep_once(progress=lambda n: progress.advance(bar, n))


@app.command("gen-key")
def gen_key(
    notify: Annotated[
        bool, typer.Option("--notify", help="A signing secret for TOKENSVC_NOTIFY_SECRET (Standard Webhooks whsec_…)")
    ] = False,
) -> None:
    """Print a fresh encryption key for TOKENSVC_ENCRYPTION_KEYS (or, with --notify, a notification secret)."""
    typer.echo(generate_notify_secret() if notify else generate_key())


@app.command("import")
def import_tokens(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A file of JSON lines")],
    replace: Annotated[
        bool, typer.Option("--replace", help="Store pairs older than the stored ones too (else they are skipped)")
    ] = False,
) -> None:
    """Import tokens from JSON lines: user_id, access_token, refresh_token, expires_at, athlete_id?, scopes?.

    Good lines are imported, each bad line is reported by number; a pair older than the stored one (Strava has
    rotated since) is skipped and named unless --replace. Exits 1 when any line was bad or skipped.
    """
    settings = _storage_settings()
    lines = file.read_text(encoding="utf-8").splitlines()
    imported, failures = asyncio.run(_import_lines(settings, lines, replace=replace))
    for failure in failures:
        typer.echo(failure, err=True)
    stale = sum(1 for failure in failures if STALE_MARK in failure)
    summary = f"imported {imported}, failed {len(failures) - stale}"
    typer.echo(f"{summary}, skipped as stale {stale}" if stale else summary)
    if stale:
        typer.echo("stale pairs were skipped; run again with --replace to store them anyway", err=True)
    if failures:
        raise typer.Exit(code=1)


STALE_MARK = "skipped, stale:"


async def _import_lines(settings: Settings, lines: list[str], *, replace: bool = False) -> tuple[int, list[str]]:
    from tokensvc.app import open_resources
    from tokensvc.errors import AthleteInUse, StaleImport, ValidationFailed
    from tokensvc.schemas import USER_ID_RE, TokenImport

    imported, failures = 0, []
    await _migrate(
        settings.database_url, statement_cache=settings.db_statement_cache
    )  # importing into a new database should just work
    async with open_resources(settings) as res:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as exc:
                failures.append(f"line {number}: not JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                failures.append(f"line {number}: not a JSON object")
                continue
            user_id = record.pop("user_id", None)
            if not isinstance(user_id, str) or not USER_ID_RE.fullmatch(user_id):
                failures.append(f"line {number}: user_id must be 1..64 characters of [A-Za-z0-9._-]")
                continue
            try:
                body = TokenImport.model_validate(record)
            except ValidationError as exc:
                reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                failures.append(f"line {number}: {reasons}")
                continue
            try:
                await res.service.import_tokens(user_id, body, replace=replace)
            except AthleteInUse:
                failures.append(f"line {number}: athlete {body.athlete_id} is connected to another user")
                continue
            except StaleImport:
                failures.append(f"line {number}: user {user_id} {STALE_MARK} older than the stored pair")
                continue
            except ValidationFailed as exc:
                failures.append(f"line {number}: {exc.detail}")
                continue
            imported += 1
    return imported, failures


subscription_app = typer.Typer(
    help="Manage the Strava push subscription that sends events to /v1/webhooks/strava (one per app).",
    no_args_is_help=True,
)
app.add_typer(subscription_app, name="strava-subscription")


def _strava_settings() -> Settings:
    settings = _load_settings()
    if not settings.strava_client_id or settings.strava_client_secret is None:
        raise _fail(
            "set TOKENSVC_STRAVA_CLIENT_ID and TOKENSVC_STRAVA_CLIENT_SECRET: push subscriptions belong to the app"
        )
    return settings


async def _with_strava(settings: Settings, action: Callable[[StravaClient], Awaitable[_T]]) -> _T:
    from tokensvc.providers.strava import StravaClient

    secret = settings.strava_client_secret.get_secret_value() if settings.strava_client_secret else ""
    strava = StravaClient(
        base_url=settings.strava_base_url,
        client_id=settings.strava_client_id or "",
        client_secret=secret,
        timeout=settings.strava_timeout_seconds,
    )
    try:
        return await action(strava)
    finally:
        await strava.aclose()


async def _learn_subscription(settings: Settings, subscription_id: int | None) -> None:
    """Tell the service's database the app's subscription id (None: none), so events naming another are dropped."""
    from datetime import UTC, datetime

    from tokensvc.db import make_engine
    from tokensvc.store import webhook_events

    engine = make_engine(settings.database_url, statement_cache=settings.db_statement_cache)
    try:
        async with engine.begin() as conn:
            await webhook_events.learn_subscription(conn, subscription_id, now=datetime.now(UTC))
    finally:
        await engine.dispose()


def _remember_subscription(settings: Settings, subscription_id: int | None) -> None:
    """Best effort: a database that cannot be written (not migrated, unreachable) is reported, not fatal, since
    the subscription at Strava is what was asked for."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        asyncio.run(_learn_subscription(settings, subscription_id))
    except (SQLAlchemyError, OSError) as exc:
        typer.echo(
            f"tokensvc: could not record the subscription id in the database ({type(exc).__name__}); events "
            "naming other subscriptions are not dropped until it is (run `strava-subscription show`)",
            err=True,
        )


def _callback_path(settings: Settings) -> str:
    secret = settings.strava_webhook_path_secret
    return "/v1/webhooks/strava" + (f"/{secret.get_secret_value()}" if secret is not None else "")


def _strava_failure(exc: Exception) -> typer.Exit:
    """Strava said no, or could not be reached: the reason on stderr, exit 1."""
    typer.echo(f"tokensvc: {exc}", err=True)
    return typer.Exit(code=1)


def _shown(callback_url: str, settings: Settings) -> str:
    """The callback URL with the path secret masked (terminal output ends up in logs and tickets)."""
    secret = settings.strava_webhook_path_secret
    return callback_url.replace(secret.get_secret_value(), "<path-secret>") if secret is not None else callback_url


@subscription_app.command("create")
def subscription_create(
    callback_url: Annotated[
        str | None,
        typer.Option(
            help="Where Strava sends events; default <TOKENSVC_PUBLIC_URL>/v1/webhooks/strava (plus "
            "/<TOKENSVC_STRAVA_WEBHOOK_PATH_SECRET> when that is set)"
        ),
    ] = None,
) -> None:
    """Subscribe: Strava checks the callback (the running service must answer it), then sends events there."""
    from tokensvc.providers.strava import ProviderError

    settings = _strava_settings()
    if settings.strava_webhook_verify_token is None:
        raise _fail(
            "set TOKENSVC_STRAVA_WEBHOOK_VERIFY_TOKEN (the same value as the running service's): Strava's check of "
            "the callback presents it"
        )
    if callback_url is None:
        if not settings.public_url:
            raise _fail("pass --callback-url, or set TOKENSVC_PUBLIC_URL (the service's external base URL)")
        callback_url = f"{settings.public_url.rstrip('/')}{_callback_path(settings)}"
    verify_token = settings.strava_webhook_verify_token.get_secret_value()
    url = callback_url
    try:
        subscription_id = asyncio.run(
            _with_strava(settings, lambda strava: strava.create_subscription(url, verify_token))
        )
    except ProviderError as exc:
        raise _strava_failure(exc) from exc
    _remember_subscription(settings, subscription_id)
    typer.echo(f"created push subscription {subscription_id} for {_shown(callback_url, settings)}")


@subscription_app.command("show")
def subscription_show() -> None:
    """Print the app's push subscription (id and callback), or say there is none (exit 1)."""
    from tokensvc.providers.strava import ProviderError

    settings = _strava_settings()
    try:
        subscriptions = asyncio.run(_with_strava(settings, lambda strava: strava.list_subscriptions()))
    except ProviderError as exc:
        raise _strava_failure(exc) from exc
    # Strava's list is the authority on the app's subscription: remember it (or that there is none).
    _remember_subscription(settings, subscriptions[0].id if len(subscriptions) == 1 else None)
    if not subscriptions:
        typer.echo("no push subscription", err=True)
        raise typer.Exit(code=1)
    for subscription in subscriptions:
        created = f" (created {subscription.created_at})" if subscription.created_at else ""
        typer.echo(f"push subscription {subscription.id}: {_shown(subscription.callback_url, settings)}{created}")


@subscription_app.command("delete")
def subscription_delete(
    subscription_id: Annotated[
        int | None, typer.Argument(help="The subscription's id; default the app's one subscription")
    ] = None,
) -> None:
    """Delete the push subscription; with no id, the app's only one. Nothing to delete is not an error."""
    from tokensvc.providers.strava import ProviderError

    settings = _strava_settings()

    async def delete(strava: StravaClient) -> list[int]:
        ids = [subscription_id] if subscription_id is not None else [s.id for s in await strava.list_subscriptions()]
        for each in ids:
            await strava.delete_subscription(each)
        return ids

    try:
        deleted = asyncio.run(_with_strava(settings, delete))
    except ProviderError as exc:
        raise _strava_failure(exc) from exc
    if subscription_id is None or deleted:
        _remember_subscription(settings, None)
    if not deleted:
        typer.echo("no push subscription to delete")
    for each in deleted:
        typer.echo(f"deleted push subscription {each}")


@app.command("rotate-keys")
def rotate_keys(
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=10_000, help="Rows re-encrypted per (short) transaction")
    ] = 500,
) -> None:
    """Re-encrypt every stored token under the first key of TOKENSVC_ENCRYPTION_KEYS, in batches, reading rows
    under any key of TOKENSVC_ENCRYPTION_KEYS or TOKENSVC_DECRYPTION_KEYS.

    Safe while replicas serve (every replica encrypting with the new key and reading the old one first): rows a
    refresh holds are skipped and taken later, and a refresh's newer tokens are never overwritten. Idempotent.
    Exits 1 when a row cannot be decrypted with any configured key (its user id is printed) or stayed locked;
    remove the old key only after a run that exits 0.
    """
    settings = _storage_settings()
    if len(settings.all_encryption_keys) < 2:
        typer.echo(
            "note: only one encryption key is configured; rows under any other key cannot be read. To rotate, set "
            'TOKENSVC_ENCRYPTION_KEYS="<new key>" and TOKENSVC_DECRYPTION_KEYS="<old key>" (docs/operations.md)',
            err=True,
        )
    report = asyncio.run(_rotate_keys(settings, batch_size))
    typer.echo(f"re-encrypted {report.reencrypted} rows under key {report.key_id} in {report.passes} pass(es)")
    if report.unreadable:
        shown = sorted(report.unreadable)
        listed = ", ".join(shown[:50]) + (f" and {len(shown) - 50} more" if len(shown) > 50 else "")
        typer.echo(
            f"tokensvc: the tokens of {len(shown)} user(s) cannot be decrypted with any configured key (left "
            f"untouched; keep the old key until they are reconnected or re-imported): {listed}",
            err=True,
        )
    if report.still_locked:
        typer.echo(
            f"tokensvc: {report.still_locked} row(s) stayed locked by refreshes in flight; run rotate-keys again",
            err=True,
        )
    if not report.ok:
        raise typer.Exit(code=1)


async def _rotate_keys(settings: Settings, batch_size: int) -> RotationReport:
    from tokensvc.crypto import TokenCipher
    from tokensvc.db import make_engine

    def progress(batch: BatchDone) -> None:
        typer.echo(f"batch: re-encrypted {batch.reencrypted} rows ({batch.total} so far)")

    engine = make_engine(
        settings.database_url,
        pool_size=2,
        lock_timeout_seconds=settings.lock_timeout_seconds,
        statement_cache=settings.db_statement_cache,
    )
    try:
        rotator = KeyRotator(
            engine=engine,
            cipher=TokenCipher(settings.all_encryption_keys),
            batch_size=batch_size,
            locked_wait_seconds=2 * settings.lock_timeout_seconds,
        )
        return await rotator.rotate(on_batch=progress)
    finally:
        await engine.dispose()
