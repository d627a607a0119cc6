"""Prometheus metrics. Labels never carry a user id or a token: only small, fixed sets of values."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REFRESH_TOTAL = Counter(
    "tokensvc_refresh_total",
    "Refresh decisions, by outcome (refreshed, not_needed, reauth_required, transient, rate_limited, "
    "misconfigured, sibling_refreshed) and by what triggered them",
    ["outcome", "trigger"],
)
REFRESH_SECONDS = Histogram(
    "tokensvc_refresh_duration_seconds",
    "Time from taking the refresh guard to the commit, for refreshes that called Strava",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
NOTIFICATIONS_TOTAL = Counter(
    "tokensvc_notifications_total",
    "Notification delivery attempts, by event type and result (delivered, failed: retried later)",
    ["event_type", "result"],
)
