"""The redaction net: applied after formatting (tracebacks, nested values) and to every logger, stdlib ones too."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from tests.logcapture import captured_logs
from tokensvc import logging as tokensvc_logging

TOKEN = "0123456789abcdef0123456789abcdef01234567"  # Strava-shaped: 40 hex characters


def fail(exc: Exception) -> None:
    raise exc


class TestAfterFormatting:
    def test_a_token_in_a_traceback_is_redacted(self) -> None:
        """Tracebacks were formatted after redaction, so an exception's message carried a token out."""
        log = structlog.get_logger("tokensvc.test")
        with captured_logs() as logs:
            try:
                fail(RuntimeError(f"Strava said no to {TOKEN}"))
            except RuntimeError:
                log.exception("token.refresh.crashed")
        assert TOKEN not in logs.text
        assert "RuntimeError" in logs.events("token.refresh.crashed")[0]["exception"]

    def test_a_token_nested_in_a_value_is_redacted(self) -> None:
        """Lists and dicts are rendered into the line; the rendered line is redacted too."""
        log = structlog.get_logger("tokensvc.test")
        with captured_logs() as logs:
            log.info("strava.answer", body={"pair": [TOKEN]}, also=(f"Bearer {TOKEN}",))
        assert TOKEN not in logs.text
        assert logs.events("strava.answer")


@pytest.fixture
def configured() -> Iterator[None]:
    """The production configuration, undone afterwards (root handlers and structlog's config)."""
    root = logging.getLogger()
    handlers, level, previous = list(root.handlers), root.level, structlog.get_config()
    tokensvc_logging.configure("DEBUG", json=True)
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level
        structlog.configure(**previous)


class TestStdlibLoggers:
    def test_a_stdlib_logger_goes_through_redaction_and_the_json_renderer(
        self, configured: None, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """aiosqlite at DEBUG logs every SQL parameter; uvicorn logs what it likes: both are redacted now."""
        logging.getLogger("aiosqlite").debug("executing %s with %r", "UPDATE user_tokens", (TOKEN,))
        try:
            fail(ValueError(TOKEN))
        except ValueError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        err = capsys.readouterr().err
        assert TOKEN not in err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert [line["logger"] for line in lines] == ["aiosqlite", "uvicorn.error"]
        assert "[redacted]" in lines[0]["event"]
        assert "ValueError" in lines[1]["exception"]
