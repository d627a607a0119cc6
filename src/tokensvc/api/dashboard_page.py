"""HTML for the operators' dashboard: Jinja2 templates with autoescape on, and the chart's geometry.

Self-contained pages: inline CSS and an inline SVG chart, no JavaScript, nothing fetched from another origin.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from tokensvc.service.dashboard import DashboardView, HourBar

TEMPLATES = Path(__file__).with_name("templates")

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else ""


def _epoch(value: int) -> str:
    return _when(datetime.fromtimestamp(value, UTC)) if value else ""


_env.filters["when"] = _when

# The chart's drawing area in SVG user units (the SVG scales to the page width).
WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 40
SERIES = ("success", "failure", "reauth_required")


@dataclass(frozen=True, slots=True)
class Rect:
    series: str
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    top: int
    bottom: float  # y of the x axis
    right: float  # x where the plot ends
    bars: list[Rect]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    totals: dict[str, int]


def _scale_max(highest: int) -> int:
    """A round top for the y axis at or above `highest` (1, 2 or 5 times a power of ten), never 0."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= highest:
                return max(1, step * factor)
        step *= 10


def chart(hours: list[HourBar]) -> Chart:
    """Stacked bars (success at the bottom, then failure, then reauth_required) for each hour with attempts."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top_value = _scale_max(max((h.total for h in hours), default=0))
    slot = plot_w / max(1, len(hours))
    bars: list[Rect] = []
    x_ticks: list[Tick] = []
    for i, hour in enumerate(hours):
        x = LEFT + i * slot
        if i % 3 == 0:
            x_ticks.append(Tick(x + slot / 2, hour.hour.strftime("%H:00")))
        base: float = TOP + plot_h
        for series in SERIES:
            count: int = getattr(hour, series)
            if count == 0:
                continue
            height = plot_h * count / top_value
            base -= height
            title = f"{hour.hour:%Y-%m-%d %H:00} UTC: {count} {series.replace('_', ' ')}"
            bars.append(Rect(series, round(x + slot * 0.15, 2), round(base, 2), round(slot * 0.7, 2), height, title))
    # Whole attempts only, each label at its own height (a top of 5 gets 0, 2, 5).
    y_ticks = [Tick(TOP + plot_h * (1 - v / top_value), str(v)) for v in sorted({0, top_value // 2, top_value})]
    totals = {series: sum(getattr(h, series) for h in hours) for series in SERIES}
    return Chart(WIDTH, HEIGHT, LEFT, TOP, TOP + plot_h, LEFT + plot_w, bars, y_ticks, x_ticks, totals)


def render_dashboard(view: DashboardView, *, refresh_seconds: int = 30) -> str:
    """The dashboard page. Every value from the database goes through autoescape."""
    budget = view.budget
    pauses = {"rate-counted": budget.paused_until, "read": budget.read_paused_until, "token": budget.token_paused_until}
    now = int(view.as_of.timestamp())
    return _env.get_template("dashboard.html").render(
        view=view,
        chart=chart(view.hours),
        resets_15min=_epoch(now - now % 900 + 900),
        resets_daily=_epoch(now - now % 86_400 + 86_400),
        success_rate="n/a" if view.gateway.success_rate is None else f"{view.gateway.success_rate:.1%}",
        paused_until=_epoch(max(pauses.values())),
        paused_kinds=", ".join(f"{kind} calls" for kind, until in pauses.items() if until),
        refresh_seconds=refresh_seconds,
    )


def render_login(*, error: str | None = None) -> str:
    """The sign-in form, with an optional message saying why the last attempt failed."""
    return _env.get_template("login.html").render(error=error)
