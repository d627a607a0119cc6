"""Prometheus metrics. Labels never carry a user id or a token: only small, fixed sets of values."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

# -- observability (audit API branch): Strava calls, lock waits, and DB-wide gauges set at scrape time ----------

STRAVA_REQUESTS = Counter(
    "tokensvc_strava_requests_total",
    "HTTP requests to Strava, by endpoint (token_refresh, token_exchange, deauthorize, revoke, athlete, "
    "push_subscriptions, api) and by status code "
    "(or `error` when no response came back)",
    ["endpoint", "status"],
)
LOCK_WAIT_SECONDS = Histogram(
    "tokensvc_lock_wait_seconds",
    "Time spent claiming a user's refresh (the short claim transaction in refresh_claims)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# The gauges below describe the shared database, not this process: each replica's gauges job reads them every
# TOKENSVC_GAUGE_INTERVAL_SECONDS (service/stats.py), so every replica reports the same DB-wide value, at most one
# interval old, and a scrape never queries the database. Aggregate them with max(), not sum().
USERS = Gauge("tokensvc_users", "Stored users by token status (DB-wide, refreshed periodically)", ["status"])
RATE_BUDGET_REMAINING = Gauge(
    "tokensvc_rate_budget_remaining",
    "Rate-counted Strava calls left in the current window (15min, daily, read_15min, read_daily), shared by every "
    "replica; /oauth/token calls are not counted",
    ["window"],
)
RATE_LIMIT_PAUSED_UNTIL = Gauge(
    "tokensvc_rate_limit_paused_until",
    "Epoch seconds until which Strava calls of some kind (rate-counted, read or /oauth/token) are paused after a "
    "429; 0 when none is",
)
USERS_BY_ACTIVITY = Gauge(
    "tokensvc_users_by_activity",
    "Users who can be refreshed, by activity: active (asked for within TOKENSVC_SWEEP_ACTIVE_DAYS; swept) or idle "
    "(refreshed on demand plus a keep-alive) (DB-wide)",
    ["activity"],
)
ACTIVE_USERS_EXPIRED = Gauge(
    "tokensvc_active_users_expired",
    "Active users whose access token has expired: the sweeper should keep this at 0 (idle users expire by design)",
)
TOKEN_CALLS_IN_FLIGHT = Gauge(
    "tokensvc_strava_token_calls_in_flight",
    "This process's /oauth/token calls at Strava now (bounded by TOKENSVC_STRAVA_TOKEN_CONCURRENCY)",
)
NOTIFICATIONS_PENDING = Gauge("tokensvc_notifications_pending", "Outbox notifications not yet delivered (DB-wide)")
WEBHOOK_EVENTS_TOTAL = Counter(
    "tokensvc_strava_webhook_events_total",
    "Strava push events received, by what became of them (deauthorization, coalesced, forwarded, duplicate, "
    "over_cap, unknown_athlete, other_subscription, ignored)",
    ["kind"],
)
DEAUTHORIZATIONS_TOTAL = Counter(
    "tokensvc_strava_deauthorizations_total",
    "Deauthorization events processed, by outcome (confirmed, unconfirmed, no_user, retried)",
    ["outcome"],
)
REVOCATIONS_PENDING = Gauge(
    "tokensvc_revocation_tombstones_pending",
    "Deleted users' grants still to be revoked at Strava (tombstones waiting for Strava to confirm; DB-wide)",
)
REVOCATIONS_TOTAL = Counter(
    "tokensvc_strava_revocations_total",
    "Attempts to end a deleted user's grant at Strava, by outcome (revoked, deauthorized, token_dead: nothing was "
    "left alive; superseded: the athlete reconnected, so nothing was sent; retried: a 429, 5xx, timeout or "
    "refusal, tried again later)",
    ["outcome"],
)
NOTIFICATIONS_TOTAL = Counter(
    "tokensvc_notifications_total",
    "Notification delivery attempts, by event type and result (delivered, failed: retried later)",
    ["event_type", "result"],
)

GATEWAY_CALLS_TOTAL = Counter(
    "tokensvc_gateway_calls_total",
    "Strava API gateway calls of this process, by outcome (ok: Strava answered 2xx or 304; reauth, scope, "
    "rate_limited, strava_error: Strava failed or the call could not be made, client_error: another 4xx, the "
    "caller's request); the same outcomes as /v1/stats `gateway`",
    ["outcome"],
)

CONNECTS_TOTAL = Counter(
    "tokensvc_connect_total",
    "Code exchanges of connects (callback or connect/complete), by outcome (connected; capacity: Strava's 403 "
    "`Limit of connected athletes exceeded`; code_rejected, athlete_in_use, unavailable, misconfigured)",
    ["outcome"],
)
ATHLETES_CONNECTED = Gauge(
    "tokensvc_strava_athletes_connected",
    "Users holding a live Strava connection (stored tokens, not needs_reauth): one athlete each (DB-wide)",
)
ATHLETE_CAPACITY = Gauge(
    "tokensvc_strava_athlete_capacity",
    "TOKENSVC_STRAVA_ATHLETE_CAPACITY, the connected athletes the Strava app may have; absent when unset",
)
GATEWAY_CALLS_LAST_24H = Gauge(
    "tokensvc_gateway_calls_last_24h",
    "Strava API gateway calls in the last 24 hours by every replica (DB-wide, as flushed), by outcome (the labels "
    "of tokensvc_gateway_calls_total)",
    ["outcome"],
)
GATEWAY_SUCCESS_RATIO = Gauge(
    "tokensvc_gateway_success_ratio",
    "Sync success rate: the share of the last 24 hours' gateway calls (DB-wide) that Strava answered 2xx or 304; "
    "1 when there were none",
)
STRAVA_WINDOW_USED = Gauge(
    "tokensvc_strava_window_used",
    "Rate-counted Strava calls spent in the current window (15min, daily, read_15min, read_daily), DB-wide",
    ["window"],
)
STRAVA_WINDOW_LIMIT = Gauge(
    "tokensvc_strava_window_limit",
    "The app's Strava limit of the window (15min, daily, read_15min, read_daily): the configured one or Strava's, "
    "the smaller",
    ["window"],
)
STRAVA_WINDOW_RESET = Gauge(
    "tokensvc_strava_window_reset_timestamp_seconds",
    "Epoch seconds at which the current window (15min, daily, read_15min, read_daily) resets",
    ["window"],
)
