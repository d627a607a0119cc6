"""An emulator of Strava's OAuth and sync API, for tests, `tokensvc serve --sandbox` and multi-process runs."""

from .app import create_sandbox_app
from .faults import FaultSpec
from .grants import UnknownAthleteError
from .state import LedgerEntry, SandboxState

__all__ = ["FaultSpec", "LedgerEntry", "SandboxState", "UnknownAthleteError", "create_sandbox_app"]
