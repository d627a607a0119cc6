"""Structured logs: JSON when not on a terminal, and a redaction processor as the safety net (never the plan)."""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SENSITIVE_KEY = re.compile(r"(token|secret|password|authorization|cookie)$", re.IGNORECASE)
_ALLOWED_KEYS = frozenset({"event"})
# Strava tokens are 40 hex characters; bearer credentials follow "Bearer ".
_TOKEN_TEXT = re.compile(r"\b[0-9a-f]{40}\b|(?i:bearer)\s+\S+")
REDACTED = "[redacted]"


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if key not in _ALLOWED_KEYS and _SENSITIVE_KEY.search(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = _TOKEN_TEXT.sub(REDACTED, value)
    return event_dict


class _CurrentStderr:
    """Whatever `sys.stderr` is at write time (test runners and CLIs swap it), not what it was at start-up."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def processors(*, json: bool) -> list[Any]:
    """The processor chain every log line goes through: request context, level, time, redaction, rendering."""
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
        structlog.processors.format_exc_info,
        renderer,
    ]


def detached_context() -> contextvars.Context:
    """A copy of the current context for a task that outlives its request: the request id moves to
    `parent_request_id`, so the task's lines are not mistaken for the request's own (which has ended)."""
    context = contextvars.copy_context()
    context.run(_detach_request)
    return context


def _detach_request() -> None:
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id is not None:
        structlog.contextvars.unbind_contextvars("request_id")
        structlog.contextvars.bind_contextvars(parent_request_id=request_id)


def configure(level: str = "INFO", *, json: bool | None = None) -> None:
    """Set up structlog (and the stdlib root logger, for uvicorn and alembic) once per process."""
    as_json = not sys.stderr.isatty() if json is None else json
    structlog.configure(
        processors=processors(json=as_json),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(levelname)s [%(name)s] %(message)s")
    # Request lines name URLs, and migration chatter names every plugin: neither helps an operator at INFO.
    for noisy in ("httpx", "httpcore", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
