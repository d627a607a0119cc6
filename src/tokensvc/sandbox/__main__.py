"""Run the sandbox standalone: `python -m tokensvc.sandbox --port 0` prints `SANDBOX_READY <url>` once listening."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from tokensvc.config import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET

from .app import create_sandbox_app
from .ratelimit import DEFAULT_LIMITS, DEFAULT_READ_LIMITS, parse_pair


class _ReadyServer(uvicorn.Server):
    """Announces the URL on stdout only after uvicorn is accepting connections, so parents can wait on it."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(f"SANDBOX_READY {self.url}", flush=True)


def _bind(host: str, port: int) -> socket.socket:
    """Bind ourselves so that `--port 0` yields a real port we can announce."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _pair(text: str) -> tuple[int, int]:
    try:
        return parse_pair(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tokensvc.sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--client-id", default=SANDBOX_CLIENT_ID)
    parser.add_argument("--client-secret", default=SANDBOX_CLIENT_SECRET)
    parser.add_argument("--no-rotate", action="store_true", help="refresh returns the same refresh token")
    limits = ",".join(map(str, DEFAULT_LIMITS))
    read_limits = ",".join(map(str, DEFAULT_READ_LIMITS))
    parser.add_argument("--rate-limit", type=_pair, default=DEFAULT_LIMITS, help=f"15-min,daily (default {limits})")
    parser.add_argument(
        "--read-rate-limit", type=_pair, default=DEFAULT_READ_LIMITS, help=f"15-min,daily for GETs ({read_limits})"
    )
    parser.add_argument("--athlete-capacity", type=int, default=None, help="connected athletes allowed (unlimited)")
    parser.add_argument("--state-file", type=Path, default=None, help="keep the world in this JSON file")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    app = create_sandbox_app(
        client_id=args.client_id,
        client_secret=args.client_secret,
        rotate=not args.no_rotate,
        rate_limits=args.rate_limit,
        read_rate_limits=args.read_rate_limit,
        athlete_capacity=args.athlete_capacity,
        state_file=args.state_file,
    )
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"
    # No access log: query strings may carry tokens. A short graceful timeout so held or hanging
    # requests (injected faults) do not keep a terminated sandbox alive.
    config = uvicorn.Config(
        app, log_level=args.log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=1
    )
    _ReadyServer(config, url).run(sockets=[sock])


if __name__ == "__main__":
    main()
