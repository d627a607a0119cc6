"""The status rules of CONTRACT.md, as one pure function of (row, now, buffer).

Below both `store/` (which filters and counts by status in SQL) and `service/`, so neither reaches up for it.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    VALID = "valid"
    EXPIRING_SOON = "expiring_soon"
    EXPIRED = "expired"
    NEEDS_REAUTH = "needs_reauth"
    MISSING = "missing"


def classify(*, expires_at: float | None, reauth_reason: str | None, now: float, buffer_seconds: int) -> Status:
    """valid: remaining > buffer; expiring_soon: 0 < remaining <= buffer; expired: remaining <= 0."""
    if reauth_reason is not None:
        return Status.NEEDS_REAUTH
    if expires_at is None:
        return Status.MISSING
    remaining = expires_at - now
    if remaining > buffer_seconds:
        return Status.VALID
    if remaining > 0:
        return Status.EXPIRING_SOON
    return Status.EXPIRED
