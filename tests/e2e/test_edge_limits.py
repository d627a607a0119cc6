"""Limits at the edge, against a real `tokensvc serve` at default settings: head size, head and body deadlines."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.processes import Process, start_service, wait_ready
from tokensvc.config import Settings
from tokensvc.edge import EdgeLimits

DEFAULTS = EdgeLimits()
SLACK_SECONDS = 3.0  # a shared, busy test machine: the server's timer, then the kernel, then this loop


@pytest.fixture(scope="module")
def defaults_documented() -> None:
    """The settings' defaults are the protocol's defaults (so these tests measure what an operator gets)."""
    settings = Settings()
    assert settings.max_header_bytes == DEFAULTS.max_header_bytes == 16 * 1024
    assert settings.header_timeout_seconds == DEFAULTS.header_timeout_seconds == 10
    assert settings.body_timeout_seconds == DEFAULTS.body_timeout_seconds == 20


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, defaults_documented: None) -> Iterator[Process]:
    """One `serve --sandbox` on SQLite for the module: each test uses its own connections."""
    tmp_path = tmp_path_factory.mktemp("edge")
    process = start_service(
        "tokensvc", tmp_path, {"TOKENSVC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'tokensvc.db'}"}, "--sandbox"
    )
    try:
        asyncio.run(wait_ready(process))
        yield process
    finally:
        process.stop()


async def _open(service: Process) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = service.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Everything the server sent until it closed the connection: status, headers, body."""
    raw = await reader.read()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


async def _closed_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickle: bytes) -> float:
    """Send `trickle` one byte a second until the server closes; the seconds that took."""
    started = time.monotonic()

    async def trickling() -> None:
        for byte in trickle:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1)  # the attacker's pace, not a synchronisation

    sender = asyncio.create_task(trickling())
    try:
        async with asyncio.timeout(60):
            await reader.read()  # returns at the server's close (what it sent before is read in _answer's place)
    finally:
        sender.cancel()
    return time.monotonic() - started


def _rss_kib(process: Process) -> int:
    for line in Path(f"/proc/{process.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class TestHeadSize:
    async def test_a_head_over_the_bound_is_431_problem_json(self, service: Process) -> None:
        """A request head over 16 KiB is refused with 431 problem+json and the connection closed."""
        reader, writer = await _open(service)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (DEFAULTS.max_header_bytes + 1024))
        await writer.drain()
        status, headers, body = await _answer(reader)
        writer.close()
        assert status == 431
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(body)["code"] == "headers_too_large"

    async def test_a_head_under_the_bound_is_served(self, service: Process) -> None:
        """Large but legitimate heads (12 KiB of cookies) still work."""
        reader, writer = await _open(service)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: " + b"a" * 12_000 + b"\r\n\r\n")
        await writer.drain()
        status, _, _ = await _answer(reader)
        writer.close()
        assert status == 200


class TestDeadlines:
    async def test_a_trickled_head_is_closed_within_the_header_timeout(self, service: Process) -> None:
        """A head sent a byte a second (never finished) gets 408 and the close within the header timeout."""
        reader, writer = await _open(service)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        elapsed = await _closed_after(reader, writer, b"X-Slow: " + b"a" * 100)
        writer.close()
        assert DEFAULTS.header_timeout_seconds - 1 <= elapsed <= DEFAULTS.header_timeout_seconds + SLACK_SECONDS

    async def test_a_silent_connection_is_closed_within_the_header_timeout(self, service: Process) -> None:
        """A connection that opens and sends nothing is answered 408 and closed within the header timeout."""
        reader, writer = await _open(service)
        started = time.monotonic()
        status, _, body = await asyncio.wait_for(_answer(reader), timeout=60)
        elapsed = time.monotonic() - started
        writer.close()
        assert status == 408
        assert json.loads(body)["code"] == "request_timeout"
        assert elapsed <= DEFAULTS.header_timeout_seconds + SLACK_SECONDS

    async def test_a_trickled_body_is_408_within_the_body_timeout(self, service: Process) -> None:
        """A body sent a byte a second gets 408 problem+json and the close within the body timeout."""
        reader, writer = await _open(service)
        writer.write(
            b"POST /v1/users/u1/tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        started = time.monotonic()
        elapsed = await _closed_after(reader, writer, b"{" * 1000)
        writer.close()
        assert DEFAULTS.body_timeout_seconds - 1 <= elapsed <= DEFAULTS.body_timeout_seconds + SLACK_SECONDS
        assert time.monotonic() - started < 60

    async def test_a_kept_alive_connection_outlives_the_header_timeout(self, service: Process) -> None:
        """After an answer, a quiet connection is kept alive (75 s), not cut at the header timeout."""
        reader, writer = await _open(service)
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(request)
        await writer.drain()
        first = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200")
        length = int(next(h for h in first.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        await reader.readexactly(length)
        await asyncio.sleep(DEFAULTS.header_timeout_seconds + 2)  # idle longer than the head may take
        writer.write(request)
        await writer.drain()
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        writer.close()
        assert second.startswith(b"HTTP/1.1 200")


class TestMemory:
    async def test_rss_stays_flat_under_20_oversized_and_20_slow_connections(self, service: Process) -> None:
        """20 clients sending 10 MB heads and 20 trickling ones do not grow the process (was +260 MB for one)."""
        before = _rss_kib(service)

        async def huge_head() -> None:
            _, writer = await _open(service)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            try:
                for _ in range(160):  # 10 MB in 64 KiB writes, until the server has closed
                    writer.write(b"a" * 65536)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()

        slow = [await _open(service) for _ in range(20)]
        for _, writer in slow:
            writer.write(b"POST /v1/users/u1/tokens HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{")
        await asyncio.gather(*(huge_head() for _ in range(20)))
        during = _rss_kib(service)
        for _, writer in slow:
            writer.close()
        assert during - before < 20 * 1024, f"RSS grew from {before} KiB to {during} KiB"
