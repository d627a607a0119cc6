"""Capture the service's structlog output as JSON lines, through the production processor chain (redaction too)."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from tokensvc.logging import processors


class CapturedLogs:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]


def _uncache_module_loggers() -> None:
    """A CLI test in this process may have configured structlog with `cache_logger_on_first_use`, pinning each
    module's lazy logger to that configuration; drop the pins so they follow the configuration in force."""
    for name, module in list(sys.modules.items()):
        proxy = getattr(module, "log", None) if name.startswith("tokensvc") else None
        if isinstance(proxy, structlog._config.BoundLoggerLazyProxy) and "bind" in vars(proxy):
            del proxy.bind


@contextmanager
def captured_logs(level: int = logging.DEBUG) -> Iterator[CapturedLogs]:
    captured = CapturedLogs()
    previous = structlog.get_config()
    _uncache_module_loggers()
    structlog.configure(
        processors=processors(json=True),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=captured.stream),
        cache_logger_on_first_use=False,
    )
    try:
        yield captured
    finally:
        structlog.configure(**previous)
        _uncache_module_loggers()
