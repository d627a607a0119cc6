"""An in-memory emulator of Strava's OAuth API, for tests, `tokensvc serve --sandbox` and multi-process runs."""

from .app import create_sandbox_app
from .faults import FaultSpec
from .state import LedgerEntry, SandboxState, UnknownAthleteError

__all__ = ["FaultSpec", "LedgerEntry", "SandboxState", "UnknownAthleteError", "create_sandbox_app"]
