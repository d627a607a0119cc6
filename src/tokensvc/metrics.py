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

WEBHOOK_EVENTS_TOTAL = Counter(
    "tokensvc_strava_webhook_events_total",
    "Strava push events received, by kind (deauthorization, duplicate, ignored)",
    ["kind"],
)
DEAUTHORIZATIONS_TOTAL = Counter(
    "tokensvc_strava_deauthorizations_total",
    "Deauthorization events processed, by outcome (confirmed, unconfirmed, no_user, retried)",
    ["outcome"],
)
