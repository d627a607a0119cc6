"""An activity's streams (`GET /activities/{id}/streams`), computed from its point count and sent in chunks.

The values are a deterministic function of the sample index, so nothing is stored and a body of any size (200,000
points of every stream is about 20 MB) is produced chunk by chunk, never held whole in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Final

from .activities import Activity

CHUNK_POINTS: Final = 4096
STREAM_TYPES: Final = (
    "time",
    "distance",
    "latlng",
    "altitude",
    "velocity_smooth",
    "heartrate",
    "cadence",
    "watts",
    "temp",
    "moving",
    "grade_smooth",
)
Sample = Callable[[range, float], list[object]]


def _values(kind: str) -> Sample:
    """The function computing `kind` for sample indexes; `speed` is metres a second."""
    samples: dict[str, Sample] = {
        "time": lambda r, v: list(r),
        "distance": lambda r, v: [round(i * v, 1) for i in r],
        "latlng": lambda r, v: [[round(51.5 + 0.002 * math.sin(i / 300), 6), round(-0.12 + 0.00002 * i, 6)] for i in r],
        "altitude": lambda r, v: [round(20 + 10 * math.sin(i / 500), 1) for i in r],
        "velocity_smooth": lambda r, v: [round(v + 0.3 * math.sin(i / 50), 2) for i in r],
        "heartrate": lambda r, v: [120 + i % 40 for i in r],
        "cadence": lambda r, v: [80 + i % 10 for i in r],
        "watts": lambda r, v: [150 + (i * 7) % 100 for i in r],
        "temp": lambda r, v: [20 for _ in r],
        "moving": lambda r, v: [True for _ in r],
        "grade_smooth": lambda r, v: [round(2 * math.sin(i / 200), 1) for i in r],
    }
    return samples[kind]


def selected(keys: str | None) -> list[str]:
    """The streams to send for a `keys` parameter: the known ones asked for, in Strava's order, always with
    `distance` (the series every stream is indexed by); every stream when `keys` is missing. Unknown keys are
    ignored, as Strava ignores them."""
    asked = {k.strip() for k in keys.split(",")} if keys else set(STREAM_TYPES)
    return [kind for kind in STREAM_TYPES if kind in asked or kind == "distance"]


def render(activity: Activity, kinds: list[str], *, key_by_type: bool) -> Iterator[bytes]:
    """The JSON body in chunks: a list of streams, or an object keyed by type when `key_by_type`."""
    if activity.points == 0:  # a manual activity has no streams
        yield b"{}" if key_by_type else b"[]"
        return
    speed = activity.distance / activity.points
    yield b"{" if key_by_type else b"["
    for n, kind in enumerate(kinds):
        separator = "," if n else ""
        head = f'{separator}"{kind}":{{' if key_by_type else f'{separator}{{"type":"{kind}",'
        yield f'{head}"data":['.encode()
        yield from _data(_values(kind), activity.points, speed)
        tail = {"series_type": "distance", "original_size": activity.points, "resolution": "high"}
        yield f"],{json.dumps(tail)[1:]}".encode()
    yield b"}" if key_by_type else b"]"


def _data(values: Sample, points: int, speed: float) -> Iterator[bytes]:
    for start in range(0, points, CHUNK_POINTS):
        chunk = json.dumps(values(range(start, min(start + CHUNK_POINTS, points)), speed), separators=(",", ":"))
        yield (chunk[1:-1] if start == 0 else "," + chunk[1:-1]).encode()
