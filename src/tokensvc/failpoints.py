"""Failpoints: named places where a test makes the service fail on purpose. TESTS ONLY.

Off unless both `TOKENSVC_ENABLE_FAILPOINTS=1` and `TOKENSVC_FAILPOINTS` are set in the process environment (read
once, at import): `TOKENSVC_FAILPOINTS="refresh.before_commit=exit"` (comma-separated `name=action`). Actions:
`exit` ends the process at once with `os._exit` (no cleanup, no commit), as a `kill -9` would; `stop` freezes it with
SIGSTOP (as a stalled VM or a debugger would) until someone sends SIGCONT, then carries on where it stopped.
Disabled, `hit` is one dictionary truth test. They are deliberately not settings: no deployment should ever be able
to turn them on by accident through the ordinary configuration.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping

EXIT_CODE = 86  # what a test sees as the process's return code, telling a failpoint exit from a crash
ACTIONS = ("exit", "stop")


def parse(environ: Mapping[str, str]) -> dict[str, str]:
    """The active failpoints: `{name: action}`; empty unless the double guard is set."""
    if environ.get("TOKENSVC_ENABLE_FAILPOINTS") != "1":
        return {}
    active: dict[str, str] = {}
    for item in environ.get("TOKENSVC_FAILPOINTS", "").split(","):
        name, _, action = item.strip().partition("=")
        if name:
            if action not in ACTIONS:
                known = ", ".join(ACTIONS)
                raise ValueError(f"TOKENSVC_FAILPOINTS: unknown action {action!r} for {name!r} (known: {known})")
            active[name] = action
    return active


_ACTIVE = parse(os.environ)


def hit(name: str) -> None:
    """Trigger failpoint `name` if a test enabled it; otherwise do nothing."""
    if not _ACTIVE or name not in _ACTIVE:
        return
    action = _ACTIVE[name]
    # A plain line, not the structured logger: it must be on disk before the process vanishes (or freezes).
    sys.stderr.write(f"failpoint.triggered name={name} action={action}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once continued
        sys.stderr.write(f"failpoint.continued name={name}\n")
        sys.stderr.flush()
        return
    os._exit(EXIT_CODE)
