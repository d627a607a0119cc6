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
# In a rendered line a credential ends where its JSON string or Python repr does.
_TOKEN_IN_LINE = re.compile(r"\b[0-9a-f]{40}\b|(?i:bearer)\s+[^\s\"'\\,\]\})]+")
REDACTED = "[redacted]"


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if key not in _ALLOWED_KEYS and _SENSITIVE_KEY.search(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = _TOKEN_TEXT.sub(REDACTED, value)
    return event_dict


def redact_rendered(_logger: Any, _method: str, rendered: str) -> str:
    """The last word on the finished line, whatever rendered it: a token nested in a list or a dict, in a
    formatted traceback or in a stdlib logger's message is caught here even where `redact` did not look."""
    return _TOKEN_IN_LINE.sub(REDACTED, rendered)


class _CurrentStderr:
    """Whatever `sys.stderr` is at write time (test runners and CLIs swap it), not what it was at start-up."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def processors(*, json: bool) -> list[Any]:
    """The processor chain every log line goes through: request context, level, time, the traceback formatted,
    then redaction (of the fields, then of the rendered line)."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *_finishing(json=json),
    ]


def _finishing(*, json: bool) -> list[Any]:
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    return [structlog.processors.format_exc_info, redact, renderer, redact_rendered]


def stdlib_formatter(*, json: bool) -> logging.Formatter:
    """A formatter that sends stdlib loggers' records (uvicorn, aiosqlite, alembic) through the same chain."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_finishing(json=json)],
    )


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
    # Every stdlib logger through the same redaction and rendering (uvicorn's errors; aiosqlite at DEBUG logs
    # every SQL parameter).
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(stdlib_formatter(json=as_json))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # Request lines name URLs, and migration chatter names every plugin: neither helps an operator at INFO.
    for noisy in ("httpx", "httpcore", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
