"""Athletes' activities: what the sync API reads and writes, Strava's JSON shapes, and the scope rules for them.

Strava's rules, as the sandbox enforces them: reading activities needs `activity:read` (public and followers-only
ones) or `activity:read_all` (private ones too); writing needs `activity:write`. A token without the permission gets
401 `AccessToken` / `activity:read_permission` (or `activity:write_permission`) / `missing`. Only the owner's
activities are served; anyone else's is 404 `Record Not Found`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import errors

FIRST_ACTIVITY_ID: Final = 10_000_000_001  # past 2**32, as Strava's ids are
MAX_POINTS: Final = 2_000_000
DEFAULT_PER_PAGE: Final = 30
MAX_PER_PAGE: Final = 200
READ_SCOPES: Final = frozenset({"activity:read", "activity:read_all"})
SPORT_TYPES: Final = {  # sport_type → the legacy `type` Strava still sends
    "Run": "Run",
    "TrailRun": "Run",
    "VirtualRun": "VirtualRun",
    "Walk": "Walk",
    "Hike": "Hike",
    "Ride": "Ride",
    "GravelRide": "Ride",
    "MountainBikeRide": "Ride",
    "EBikeRide": "EBikeRide",
    "VirtualRide": "VirtualRide",
    "Swim": "Swim",
    "Rowing": "Rowing",
    "WeightTraining": "WeightTraining",
    "Workout": "Workout",
    "Yoga": "Yoga",
}


@dataclass
class Activity:
    """One activity as the sandbox keeps it; streams are computed from `points` (one a second), never stored."""

    id: int
    athlete_id: int
    name: str
    sport_type: str
    start_date: int
    elapsed_time: int
    distance: float
    points: int
    private: bool = False
    description: str | None = None
    commute: bool = False
    trainer: bool = False
    hide_from_home: bool = False
    gear_id: str | None = None

    @property
    def type(self) -> str:
        return SPORT_TYPES[self.sport_type]


class NewActivity(BaseModel):
    """An upload through the control API (`POST /_control/athletes/{id}/activities`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="Sandbox Run", min_length=1, max_length=255)
    sport_type: str = "Run"
    start_date: int | None = Field(default=None, ge=0, description="epoch seconds; default: now minus elapsed_time")
    elapsed_time: int | None = Field(default=None, ge=1, description="seconds; default: points, or 1800")
    distance: float = Field(default=5000.0, ge=0)
    points: int = Field(default=600, ge=0, le=MAX_POINTS, description="stream samples, one a second")
    private: bool = False
    description: str | None = Field(default=None, max_length=10_000)
    commute: bool = False
    trainer: bool = False


class ActivityChanges(BaseModel):
    """What `PUT /api/v3/activities/{id}` may change (Strava's UpdatableActivity); other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = Field(default=None, min_length=1, max_length=255)
    type: str | None = None
    sport_type: str | None = None
    description: str | None = Field(default=None, max_length=10_000)
    commute: bool | None = None
    trainer: bool | None = None
    hide_from_home: bool | None = None
    gear_id: str | None = Field(default=None, max_length=64)


class ControlChanges(ActivityChanges):
    """What `PATCH /_control/activities/{id}` may change: the API's fields and privacy, as on strava.com."""

    model_config = ConfigDict(extra="forbid")

    private: bool | None = None


def parse_changes(data: dict[str, Any]) -> ActivityChanges:
    """Validate a PUT body. Raises StravaError 400 naming the first bad field."""
    try:
        changes = ActivityChanges.model_validate(data)
    except ValidationError as exc:
        location = exc.errors()[0]["loc"]
        raise errors.bad_request("Activity", str(location[0]) if location else "") from None
    check_sport(changes)
    return changes


def check_sport(changes: ActivityChanges | NewActivity) -> None:
    sports = [changes.sport_type] if isinstance(changes, NewActivity) else [changes.sport_type, changes.type]
    for sport in sports:
        if sport is not None and sport not in SPORT_TYPES:
            raise errors.bad_request("Activity", "sport_type")


def require_read(scopes: frozenset[str], activity: Activity | None = None) -> None:
    """Raise the 401 Strava gives a token that may not read activities (or this private one)."""
    if not scopes & READ_SCOPES or (activity is not None and activity.private and "activity:read_all" not in scopes):
        raise errors.missing_permission("activity:read_permission")


def require_write(scopes: frozenset[str]) -> None:
    if "activity:write" not in scopes:
        raise errors.missing_permission("activity:write_permission")


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ActivityStore:
    """Every athlete's activities, newest id last."""

    def __init__(self) -> None:
        self._by_id: dict[int, Activity] = {}
        self._next_id = FIRST_ACTIVITY_ID

    def create(self, athlete_id: int, spec: NewActivity, now: int) -> Activity:
        check_sport(spec)
        elapsed = spec.elapsed_time or spec.points or 1800
        activity = Activity(
            id=self._next_id,
            athlete_id=athlete_id,
            name=spec.name,
            sport_type=spec.sport_type,
            start_date=now - elapsed if spec.start_date is None else spec.start_date,
            elapsed_time=elapsed,
            distance=spec.distance,
            points=spec.points,
            private=spec.private,
            description=spec.description,
            commute=spec.commute,
            trainer=spec.trainer,
        )
        self._by_id[activity.id] = activity
        self._next_id += 1
        return activity

    def get(self, activity_id: int) -> Activity:
        """Raises StravaError 404 for an id no activity has."""
        activity = self._by_id.get(activity_id)
        if activity is None:
            raise errors.not_found("Activity")
        return activity

    def owned(self, athlete_id: int, activity_id: int) -> Activity:
        """The athlete's own activity; raises StravaError 404 for anyone else's, as for one that does not exist."""
        activity = self.get(activity_id)
        if activity.athlete_id != athlete_id:
            raise errors.not_found("Activity")
        return activity

    def page(self, athlete_id: int, scopes: frozenset[str], query: ListQuery) -> list[Activity]:
        """Strava's list: newest first, except oldest first when only `after` is given (as Strava does)."""
        found = [
            a
            for a in self._by_id.values()
            if a.athlete_id == athlete_id
            and (not a.private or "activity:read_all" in scopes)
            and (query.before is None or a.start_date < query.before)
            and (query.after is None or a.start_date > query.after)
        ]
        ascending = query.after is not None and query.before is None
        found.sort(key=lambda a: (a.start_date, a.id), reverse=not ascending)
        start = (query.page - 1) * query.per_page
        return found[start : start + query.per_page]

    def update(self, activity: Activity, changes: ActivityChanges) -> dict[str, str]:
        """Apply changes; return the `updates` a webhook event carries (title, type, private), empty if none."""
        before = (activity.name, activity.type, activity.private)
        values = changes.model_dump(exclude_none=True)
        legacy_type = values.pop("type", None)
        if legacy_type is not None and "sport_type" not in values:
            values["sport_type"] = legacy_type  # Strava: `type` counts only without `sport_type`
        for name, value in values.items():
            setattr(activity, name, value)
        updates: dict[str, str] = {}
        if activity.name != before[0]:
            updates["title"] = activity.name
        if activity.type != before[1]:
            updates["type"] = activity.type
        if activity.private != before[2]:
            updates["private"] = "true" if activity.private else "false"
        return updates

    def delete(self, activity_id: int) -> Activity:
        activity = self.get(activity_id)
        del self._by_id[activity_id]
        return activity

    def dump(self) -> dict[str, Any]:
        return {"next_id": self._next_id, "items": [asdict(a) for a in self._by_id.values()]}

    def load(self, data: dict[str, Any]) -> None:
        names = {f.name for f in fields(Activity)}
        items = [Activity(**{k: v for k, v in item.items() if k in names}) for item in data["items"]]
        self._by_id = {a.id: a for a in items}
        self._next_id = int(data["next_id"])


@dataclass(frozen=True)
class ListQuery:
    """`GET /athlete/activities` parameters, checked."""

    before: int | None = None
    after: int | None = None
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    @classmethod
    def parse(cls, params: dict[str, str]) -> ListQuery:
        """Integers as Strava takes them; `per_page` over 200 is cut to 200. Raises StravaError 400 on junk."""
        values: dict[str, int] = {}
        for name in ("before", "after", "page", "per_page"):
            raw = params.get(name, "").strip()
            if not raw:
                continue
            try:
                values[name] = int(float(raw)) if name in ("before", "after") else int(raw)
            except ValueError:
                raise errors.bad_request("Activity", name) from None
        if values.get("page", 1) < 1 or values.get("per_page", 1) < 1:
            raise errors.bad_request("Activity", "page" if values.get("page", 1) < 1 else "per_page")
        values["per_page"] = min(values.get("per_page", DEFAULT_PER_PAGE), MAX_PER_PAGE)
        return cls(**values)


def activity_json(activity: Activity, *, detailed: bool) -> dict[str, Any]:
    """Strava's SummaryActivity (list) or DetailedActivity (one) for the owner."""
    moving = max(activity.elapsed_time - activity.elapsed_time // 20, 1)
    body: dict[str, Any] = {
        "resource_state": 3 if detailed else 2,
        "athlete": {"id": activity.athlete_id, "resource_state": 1},
        "name": activity.name,
        "distance": activity.distance,
        "moving_time": moving,
        "elapsed_time": activity.elapsed_time,
        "total_elevation_gain": round(activity.distance / 200, 1),
        "type": activity.type,
        "sport_type": activity.sport_type,
        "workout_type": None,
        "id": activity.id,
        "external_id": f"sandbox-{activity.id}.fit",
        "upload_id": activity.id + 1_000_000_000,
        "start_date": iso(activity.start_date),
        "start_date_local": iso(activity.start_date),
        "timezone": "(GMT+00:00) Europe/London",
        "utc_offset": 0.0,
        "achievement_count": 0,
        "kudos_count": 0,
        "comment_count": 0,
        "athlete_count": 1,
        "photo_count": 0,
        "map": {"id": f"a{activity.id}", "summary_polyline": "", "resource_state": 2},
        "trainer": activity.trainer,
        "commute": activity.commute,
        "manual": activity.points == 0,
        "private": activity.private,
        "visibility": "only_me" if activity.private else "everyone",
        "flagged": False,
        "gear_id": activity.gear_id,
        "average_speed": round(activity.distance / moving, 3),
        "max_speed": round(activity.distance / moving * 1.5, 3),
        "has_heartrate": activity.points > 0,
        "heartrate_opt_out": False,
        "pr_count": 0,
        "total_photo_count": 0,
        "has_kudoed": False,
    }
    if detailed:
        body |= {
            "description": activity.description,
            "calories": round(activity.distance / 15, 1),
            "hide_from_home": activity.hide_from_home,
            "device_name": "Strava sandbox",
            "segment_efforts": [],
            "splits_metric": [],
            "laps": [],
            "photos": {"primary": None, "count": 0},
        }
    return body
