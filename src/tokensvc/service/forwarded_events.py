"""Strava events forwarded to the app (`strava.activity.created|updated|deleted`, `strava.athlete.updated`): what
one notification says, and the id that makes Strava's retries of an event one notification per user.

Only what a receiver needs is kept: the ids, the aspect, the time, and of `updates` only the keys Strava documents
(`title`, `type`, `private`, `authorized`), each value a short string or a boolean. Events are unsigned, so the
notification is a hint: a receiver fetches what changed (through the gateway) and orders by `event_time`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Final

from pydantic import JsonValue

from tokensvc.schemas import StravaEvent

DOCUMENTED_UPDATES: Final = ("title", "type", "private", "authorized")
MAX_UPDATE_CHARS: Final = 255  # Strava's activity names are at most 255 characters

_TYPES: Final = {
    ("activity", "create"): "strava.activity.created",
    ("activity", "update"): "strava.activity.updated",
    ("activity", "delete"): "strava.activity.deleted",
    ("athlete", "update"): "strava.athlete.updated",
}


def forwarded_type(event: StravaEvent) -> str | None:
    """The notification type of an event the app is told about; None for an event of no known kind."""
    return _TYPES.get((event.object_type, event.aspect_type))


def documented_updates(updates: dict[str, JsonValue]) -> dict[str, str | bool]:
    """`updates` reduced to Strava's documented keys with short string or boolean values (anything else, and a
    string that is not valid Unicode, is left out)."""
    kept: dict[str, str | bool] = {}
    for key in DOCUMENTED_UPDATES:
        value = updates.get(key)
        if isinstance(value, bool):
            kept[key] = value
        elif isinstance(value, str) and len(value) <= MAX_UPDATE_CHARS and _is_unicode(value):
            kept[key] = value
    return kept


def _is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON can carry it, no receiver's string type can
        return False
    return True


def message_id(event: StravaEvent, updates: dict[str, str | bool], user_id: str) -> str:
    """A Standard Webhooks `webhook-id` made from the event's content and the user: Strava's retries of one event
    (the same content) are one notification, whichever replica receives each."""
    content = json.dumps(
        [
            user_id,
            event.owner_id,
            event.object_type,
            event.object_id,
            event.aspect_type,
            event.event_time,
            event.subscription_id,
            updates,
        ],
        separators=(",", ":"),
        sort_keys=True,
    )
    return f"msg_{hashlib.sha256(content.encode()).hexdigest()[:32]}"


def payload(event: StravaEvent, event_type: str, updates: dict[str, str | bool], user_id: str, *, now: datetime) -> str:
    """The notification body, as the contract (v1.1, forwarded events) fixes it."""
    body = {
        "type": event_type,
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": {
            "user_id": user_id,
            "athlete_id": event.owner_id,
            "object_type": event.object_type,
            "object_id": event.object_id,
            "aspect_type": event.aspect_type,
            "updates": updates,
            "event_time": event.event_time,
            "subscription_id": event.subscription_id,
        },
    }
    return json.dumps(body, separators=(",", ":"))
