"""Status boundaries, exactly as CONTRACT.md states them."""

from __future__ import annotations

import pytest

from tokensvc.status import Status, classify

NOW = 1_000_000.0
BUFFER = 1800


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (BUFFER + 1, Status.VALID),
        (BUFFER + 0.5, Status.VALID),
        (BUFFER, Status.EXPIRING_SOON),
        (1, Status.EXPIRING_SOON),
        (0.5, Status.EXPIRING_SOON),
        (0, Status.EXPIRED),
        (-1, Status.EXPIRED),
        (-10_000, Status.EXPIRED),
    ],
)
def test_remaining_time_decides_between_valid_expiring_and_expired(remaining: float, expected: Status) -> None:
    """valid: remaining > buffer; expiring_soon: 0 < remaining <= buffer; expired: remaining <= 0."""
    assert classify(expires_at=NOW + remaining, reauth_reason=None, now=NOW, buffer_seconds=BUFFER) is expected


@pytest.mark.parametrize("reason", ["refresh_token_invalid", "deauthorized"])
def test_a_reauth_reason_wins_over_any_expiry(reason: str) -> None:
    """A user flagged for re-authorization stays `needs_reauth` even with a long-lived token."""
    status = classify(expires_at=NOW + 20_000, reauth_reason=reason, now=NOW, buffer_seconds=BUFFER)
    assert status is Status.NEEDS_REAUTH


def test_no_expiry_means_missing() -> None:
    """No stored tokens is `missing`."""
    assert classify(expires_at=None, reauth_reason=None, now=NOW, buffer_seconds=BUFFER) is Status.MISSING


@pytest.mark.parametrize("buffer", [60, 3600])
def test_the_buffer_moves_the_expiring_soon_boundary(buffer: int) -> None:
    """The configured buffer, not a constant, decides where `expiring_soon` starts."""
    assert classify(expires_at=NOW + buffer, reauth_reason=None, now=NOW, buffer_seconds=buffer) is Status.EXPIRING_SOON
    assert classify(expires_at=NOW + buffer + 1, reauth_reason=None, now=NOW, buffer_seconds=buffer) is Status.VALID
