"""Tables. One row per user of the application; token material is stored only as ciphertext."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """`timestamptz` on Postgres; on SQLite (which has no time zones) values are stored in UTC and read back aware."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _partial_index(name: str, *columns: sa.ColumnElement[object], where: str) -> sa.Index:
    """An index over only the rows matching `where`, a literal predicate that both dialects take as it is."""
    return sa.Index(name, *columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where))


class UserToken(SQLModel, table=True):
    """A user's Strava connection. `reauth_reason` set means `needs_reauth`; no row means `missing`."""

    __tablename__ = "user_tokens"

    user_id: str = Field(primary_key=True, max_length=64)
    # v1.<key id>.<data>; the key id is also kept in its own column so rotation can find old rows by index.
    access_token_enc: str | None = Field(default=None)
    refresh_token_enc: str | None = Field(default=None)
    key_id: str | None = Field(default=None, max_length=16, index=True)
    expires_at: int = Field(sa_type=sa.BigInteger)
    athlete_id: int | None = Field(default=None, sa_type=sa.BigInteger, index=True)
    scopes: str = Field(default="", max_length=512)
    reauth_reason: str | None = Field(default=None, max_length=32)
    last_refreshed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    # Bumped by every write: a refresh writes only if the row is still the version it read.
    version: int = Field(default=1)
    # When the background sweeper may next try this user (epoch seconds): inside the buffer with a per-user jitter
    # after a write, a short lease while a replica works on it, later after a transient failure (backoff).
    sweep_at: int = Field(sa_type=sa.BigInteger)
    failure_count: int = Field(default=0)
    last_error: str | None = Field(default=None, max_length=64)


user_tokens: sa.Table = UserToken.__table__  # type: ignore[attr-defined]

# "Who is due" is a range scan on expiry over the users that can still be refreshed.
_partial_index("ix_user_tokens_due", user_tokens.c.expires_at, where="reauth_reason IS NULL")

# "Whom should the sweeper take next" is a range scan too, over the same users.
_partial_index("ix_user_tokens_sweep", user_tokens.c.sweep_at, where="reauth_reason IS NULL")

# "Who must reconnect, most recent first" (the dashboard) and their count read only the flagged users. updated_at
# changes on every write, but a row enters this index only while flagged, and the writes that touch it were not HOT
# anyway (they change expires_at or sweep_at, both indexed).
_partial_index(
    "ix_user_tokens_needs_reauth",
    user_tokens.c.updated_at.desc(),
    user_tokens.c.user_id,
    where="reauth_reason IS NOT NULL",
)


class StravaRateBudget(SQLModel, table=True):
    """The one row every replica draws Strava calls from: usage in the current 15-minute and daily windows, and a
    pause set by a 429 that holds every replica back until it ends."""

    __tablename__ = "strava_rate_budget"

    id: int = Field(primary_key=True)
    window_start: int = Field(default=0, sa_type=sa.BigInteger)
    window_used: int = Field(default=0)
    day_start: int = Field(default=0, sa_type=sa.BigInteger)
    day_used: int = Field(default=0)
    paused_until: int = Field(default=0, sa_type=sa.BigInteger)
    # v1.1: the read window (same starts as above), and pauses for the read and the /oauth/token kinds of call.
    read_window_used: int = Field(default=0)
    read_day_used: int = Field(default=0)
    read_paused_until: int = Field(default=0, sa_type=sa.BigInteger)
    token_paused_until: int = Field(default=0, sa_type=sa.BigInteger)
    # v1.1: the service's own rate-counted calls in the same windows (its reserve, service/rate_budget.py).
    service_window_used: int = Field(default=0)
    service_day_used: int = Field(default=0)


strava_rate_budget: sa.Table = StravaRateBudget.__table__  # type: ignore[attr-defined]


class TokenUsage(SQLModel, table=True):
    """When something last asked for a user's token (epoch seconds). Its own table, written in coalesced batches,
    so that noting a use never bumps `user_tokens.version` or fires the token cache's NOTIFY."""

    __tablename__ = "token_usage"

    user_id: str = Field(primary_key=True, max_length=64)
    last_used_at: int = Field(sa_type=sa.BigInteger, index=True)


token_usage: sa.Table = TokenUsage.__table__  # type: ignore[attr-defined]


class OAuthStateUse(SQLModel, table=True):
    """A consumed OAuth `state` nonce. States are signed and stateless until used; recording the use here (a
    primary-key insert) is what makes each one single-use, even while it is young. Rows outlive the state's
    ten minutes only until the next purge."""

    __tablename__ = "oauth_state_uses"

    nonce: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(max_length=64)
    used_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: int = Field(sa_type=sa.BigInteger, index=True)


oauth_state_uses: sa.Table = OAuthStateUse.__table__  # type: ignore[attr-defined]


class ConnectConfirmation(SQLModel, table=True):
    """A callback waiting for the app to confirm it (`connect/complete`): the flow's user, the scopes to store and
    Strava's authorization code sealed with a key derived from the one-time `connect_id`. Only the id's hash is
    kept, so the table alone neither names a usable id nor reveals a code. Rows live ten minutes."""

    __tablename__ = "connect_confirmations"

    id_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(max_length=64)
    scopes: str = Field(max_length=512)
    code_sealed: str = Field(max_length=2048)
    expires_at: int = Field(sa_type=sa.BigInteger, index=True)


connect_confirmations: sa.Table = ConnectConfirmation.__table__  # type: ignore[attr-defined]


_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


class TokenEvent(SQLModel, table=True):
    """The audit trail: one row per refresh attempt at Strava and per change of a user's state. Append-only (rows
    leave only through the retention purge); never holds a token."""

    __tablename__ = "token_events"

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)
    occurred_at: datetime = Field(sa_type=UTCDateTime, index=True)
    user_id: str = Field(max_length=64)
    # refresh | connected | imported | needs_reauth | recovered | revoked | deauthorization_unconfirmed
    kind: str = Field(max_length=32)
    trigger: str | None = Field(default=None, max_length=32)
    # refresh: succeeded | rejected | transient | rate_limited | misconfigured | unreadable | answer_lost
    outcome: str | None = Field(default=None, max_length=32)
    strava_status: int | None = Field(default=None)
    duration_ms: int | None = Field(default=None)
    detail: str | None = Field(default=None, max_length=200)


token_events: sa.Table = TokenEvent.__table__  # type: ignore[attr-defined]

# A user's history, newest first, is a range scan on (user_id, id).
sa.Index("ix_token_events_user", token_events.c.user_id, token_events.c.id)

# The dashboard's "recent failures", newest first, however rare failures are among the other rows. A literal
# predicate (not a bound parameter) in both the index and the query, so every plan, generic ones too, can use it.
FAILED_REFRESH = "kind = 'refresh' AND outcome <> 'succeeded'"
_partial_index("ix_token_events_failures", token_events.c.id, where=FAILED_REFRESH)


class Notification(SQLModel, table=True):
    """The transactional outbox: a notification is written in the same transaction as the change it reports and
    delivered (signed, retried with backoff) by whichever replica claims it. `id` is the Standard Webhooks
    `webhook-id`, stable across retries so receivers can drop duplicates."""

    __tablename__ = "notifications"

    id: str = Field(primary_key=True, max_length=40)
    event_type: str = Field(max_length=32)
    user_id: str = Field(max_length=64)
    payload: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    next_attempt_at: int = Field(sa_type=sa.BigInteger)
    attempts: int = Field(default=0)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, max_length=200)


notifications: sa.Table = Notification.__table__  # type: ignore[attr-defined]

# "What is due for delivery" scans undelivered rows only.
_partial_index("ix_notifications_due", notifications.c.next_attempt_at, where="delivered_at IS NULL")

# The retention purge takes delivered rows by age.
_partial_index("ix_notifications_delivered", notifications.c.delivered_at, where="delivered_at IS NOT NULL")


class StravaWebhookEvent(SQLModel, table=True):
    """A Strava push event worth acting on (athlete deauthorizations), stored before Strava gets its 200 and
    processed in the background. `dedupe_key` makes Strava's retries one row."""

    __tablename__ = "strava_webhook_events"

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)
    dedupe_key: str = Field(max_length=128, unique=True)
    owner_id: int = Field(sa_type=sa.BigInteger)
    object_type: str = Field(max_length=16)
    aspect_type: str = Field(max_length=16)
    event_time: int = Field(sa_type=sa.BigInteger)
    subscription_id: int | None = Field(default=None, sa_type=sa.BigInteger)
    payload: str = Field(sa_type=sa.Text)
    received_at: datetime = Field(sa_type=UTCDateTime)
    # pending | confirmed | unconfirmed | no_user
    state: str = Field(default="pending", max_length=16)
    attempts: int = Field(default=0)
    next_attempt_at: int = Field(sa_type=sa.BigInteger)
    processed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    result: str | None = Field(default=None, max_length=200)


strava_webhook_events: sa.Table = StravaWebhookEvent.__table__  # type: ignore[attr-defined]

_partial_index("ix_strava_webhook_events_pending", strava_webhook_events.c.next_attempt_at, where="state = 'pending'")

# The retention purge takes processed events by age.
PROCESSED_EVENT = "state <> 'pending'"
_partial_index("ix_strava_webhook_events_processed", strava_webhook_events.c.processed_at, where=PROCESSED_EVENT)


class StravaSubscription(SQLModel, table=True):
    """The app's own push subscription id, once known (one row, `slot` 1): learned from `strava-subscription`
    and from Strava's list, so that events naming another subscription can be dropped."""

    __tablename__ = "strava_subscription"

    slot: int = Field(default=1, primary_key=True)
    subscription_id: int = Field(sa_type=sa.BigInteger)
    learned_at: datetime = Field(sa_type=UTCDateTime)


strava_subscription: sa.Table = StravaSubscription.__table__  # type: ignore[attr-defined]


class StravaEventWindow(SQLModel, table=True):
    """Forwarded Strava events per athlete in the current clock hour (one row per athlete, overwritten when the
    hour turns): what caps a burst of (unsigned) events."""

    __tablename__ = "strava_event_windows"

    athlete_id: int = Field(primary_key=True, sa_type=sa.BigInteger)
    window_start: int = Field(sa_type=sa.BigInteger)
    count: int = Field(default=0)


strava_event_windows: sa.Table = StravaEventWindow.__table__  # type: ignore[attr-defined]


class HourlyCount(SQLModel):
    """The columns of an hourly rollup (store/rollup.py): a count per hour, outcome and slot."""

    hour: int = Field(primary_key=True, sa_type=sa.BigInteger)  # epoch seconds at the start of the hour (UTC)
    outcome: str = Field(primary_key=True, max_length=32)
    slot: int = Field(primary_key=True)
    count: int = Field(default=0, sa_type=sa.BigInteger)


class RefreshCount(HourlyCount, table=True):
    """Refresh attempts at Strava per hour and outcome, counted in the transaction of each attempt: what
    `/v1/stats` and the dashboard's chart read (a few dozen rows a day, however many athletes). Successes are only
    counted here; failures also get an audit row (`token_events`). Each attempt adds one to one of a few `slot`
    rows chosen at random, so concurrent commits across replicas seldom wait on the same row; readers sum them."""

    __tablename__ = "refresh_counts"


refresh_counts: sa.Table = RefreshCount.__table__  # type: ignore[attr-defined]


class GatewayCount(HourlyCount, table=True):
    """Strava API gateway calls per hour and outcome (`ok`, `reauth`, `scope`, `rate_limited`, `strava_error`,
    `client_error`, `unavailable`, `refused`), every replica's: what `/v1/stats` and the dashboard read for the sync
    success rate. Each replica adds its tally in batches (service/gateway_stats.py) to one of a few `slot` rows
    chosen at random, like `refresh_counts`; readers sum them."""

    __tablename__ = "gateway_counts"


gateway_counts: sa.Table = GatewayCount.__table__  # type: ignore[attr-defined]


class SignInFailure(SQLModel, table=True):
    """Failed dashboard sign-ins of one client (an IPv4 address or an IPv6 /64) since its last success, and until
    when it must wait (epoch seconds). Shared by every replica; a row leaves at a success or a day after its last
    failure."""

    __tablename__ = "sign_in_failures"

    client: str = Field(primary_key=True, max_length=64)
    failures: int = Field(default=0)
    blocked_until: int = Field(default=0, sa_type=sa.BigInteger)
    last_failed_at: int = Field(default=0, sa_type=sa.BigInteger, index=True)


sign_in_failures: sa.Table = SignInFailure.__table__  # type: ignore[attr-defined]


class SessionRevocation(SQLModel, table=True):
    """Sessions of a subject (`admin`, or `user:<user_id>`) issued before `not_before_ms` (epoch milliseconds) are
    void: sign-out and `DELETE …/tokens` move it to their moment. No row: no session of the subject was ended."""

    __tablename__ = "session_revocations"

    subject: str = Field(primary_key=True, max_length=80)
    not_before_ms: int = Field(default=0, sa_type=sa.BigInteger)


session_revocations: sa.Table = SessionRevocation.__table__  # type: ignore[attr-defined]


class RefreshClaim(SQLModel, table=True):
    """A replica's short, durable claim on one user's refresh: taken and committed before the Strava call, removed
    with the result. A narrow table of its own, so claiming never touches the token row (no version bump, no
    NOTIFY, its updates stay HOT). Times are epoch milliseconds of the database's clock."""

    __tablename__ = "refresh_claims"

    user_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=64)
    # The token row's version the owner read: its write stores only over that version (or a flag set since).
    version_read: int
    # Until when the owner holds the claim; past it the claim has lapsed and another caller may take it over.
    until: int = Field(sa_type=sa.BigInteger)
    # Until when this owner may still store a pair Strava gave it (its claim plus the write budget).
    write_until: int = Field(sa_type=sa.BigInteger)
    # Until when an earlier, lapsed owner may still store its pair: a rejection meanwhile flags nobody.
    pending_until: int = Field(default=0, sa_type=sa.BigInteger)
    # The version whose refresh token Strava rejected while an earlier owner could still write (0: none): once
    # that budget is over, the next claimant flags the user without presenting the dead token again.
    rejected_version: int = Field(default=0)


refresh_claims: sa.Table = RefreshClaim.__table__  # type: ignore[attr-defined]


class RevocationTombstone(SQLModel, table=True):
    """A grant still to be revoked at Strava after its user's row is gone (DELETE): the tokens it needs, as the
    same ciphertexts `user_tokens` held (same keys, bound to the user id and field), until Strava confirms; then
    the row goes. A narrow table of its own, claimed by moving `due_at` past now (the claim's lease)."""

    __tablename__ = "revocation_tombstones"

    id: int | None = Field(default=None, primary_key=True, sa_type=_BigId)
    user_id: str = Field(max_length=64)
    athlete_id: int | None = Field(default=None, sa_type=sa.BigInteger)
    refresh_token_enc: str
    access_token_enc: str | None = Field(default=None)
    access_expires_at: int = Field(sa_type=sa.BigInteger)
    key_id: str | None = Field(default=None, max_length=16)
    # When the next attempt is due (epoch seconds); while a replica works on it, the end of its claim.
    due_at: int = Field(sa_type=sa.BigInteger, index=True)
    attempts: int = Field(default=0)
    last_error: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)


revocation_tombstones: sa.Table = RevocationTombstone.__table__  # type: ignore[attr-defined]
