"""Keeping the sandbox's world across restarts: a JSON file written atomically before each answer goes out.

Strava remembers its grants; a sandbox that forgot them on restart would make every user tokensvc stores
`needs_reauth` at its next refresh. So `serve --sandbox` (and `python -m tokensvc.sandbox --state-file`) loads the
file at start and rewrites it (temporary file, then `os.replace`) after every request that reached the sandbox,
before the response starts, so a client that saw an answer finds its effect after a restart. The file holds the
sandbox's own (fake) tokens in clear text, as Strava's database would; it is created mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .state import SandboxState

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1


class StateFile:
    """The file one sandbox keeps its world in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load_into(self, state: SandboxState) -> bool:
        """Restore the world from the file if there is one; return whether it did.

        A file that cannot be read back (corrupt, another version) is moved aside to `<name>.unreadable` with a
        warning, and the sandbox starts empty: a sandbox is for trying things, not a reason to refuse to start.
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return False
        try:
            _restore(state, json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            logger.warning("sandbox state %s unreadable (%s); moved to %s, starting empty", self.path, exc, aside)
            state.reset()
            return False
        logger.info("sandbox state restored from %s", self.path)
        return True

    def save(self, state: SandboxState) -> None:
        """Write the world atomically: readers (and a restart) see the old file or the new one, never half."""
        body = json.dumps({"version": FORMAT_VERSION, "world": state.dump()}, separators=(",", ":"))
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as sink:
            sink.write(body)
        os.replace(temporary, self.path)


class SaveBeforeAnswer:
    """ASGI middleware: after the sandbox handled a request, and before its answer starts, save the world.

    Control reads (`GET /_control/…`) change nothing and skip the write; everything else may have changed
    something (an API GET counts toward the rate windows), so it is saved.
    """

    def __init__(self, app: ASGIApp, *, state: SandboxState, state_file: StateFile) -> None:
        self.app = app
        self.state = state
        self.state_file = state_file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_control_read(scope):
            await self.app(scope, receive, send)
            return

        async def save_then_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.state_file.save(self.state)
            await send(message)

        await self.app(scope, receive, save_then_send)


def _restore(state: SandboxState, data: Any) -> None:
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"version {data.get('version')!r}, expected {FORMAT_VERSION}")
    state.load(data["world"])


def _is_control_read(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    relative = path[len(root) :] if root and path.startswith(root) else path
    method: Any = scope.get("method")
    return method in ("GET", "HEAD") and relative.startswith("/_control")
