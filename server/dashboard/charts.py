"""Line charts as inline SVG, drawn on the server: the run page needs no script to plot.

:func:`line_chart` takes named series of ``(x, y)`` points and returns one ``<svg>``
element (a string already escaped for HTML) with axes, ticks, a line and dots per series
and a legend. Each dot carries a ``<title>`` with its value, which the browser shows on
hover, and the element has ``data-series`` and ``data-points`` attributes so a test can
read what was plotted without parsing paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Final

__all__ = ["PALETTE", "line_chart", "nice_ticks"]

PALETTE: Final = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
)
"""Series colours, in order (a series past the tenth reuses them)."""

_WIDTH: Final = 640
_HEIGHT: Final = 260
_LEFT: Final = 52
_RIGHT: Final = 150
_TOP: Final = 16
_BOTTOM: Final = 36


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]`` (1, 2 or 5 times 10^k)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high < low:
        low, high = high, low
    if high == low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_min: float | None = None,
    y_max: float | None = None,
) -> str:
    """One SVG line chart of ``series`` (name to points), or a short note if it is empty.

    Args:
        series: Points per series name, in x order.
        title: The chart's accessible name (``aria-label``).
        x_label: The x axis label.
        y_label: The y axis label.
        y_min: Lower end of the y axis (default: the data's, rounded).
        y_max: Upper end of the y axis (default: the data's, rounded).
    """
    points = [(x, y) for pts in series.values() for x, y in pts if math.isfinite(y)]
    if not points:
        return f'<p class="empty">{escape(title)}: nothing recorded yet.</p>'
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x_ticks = nice_ticks(min(xs), max(xs), min(8, max(1, len(set(xs)))))
    if all(float(t).is_integer() for t in xs):
        x_ticks = [t for t in x_ticks if float(t).is_integer()] or x_ticks
    y_ticks = nice_ticks(min(ys) if y_min is None else y_min, max(ys) if y_max is None else y_max)
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / ((x1 - x0) or 1.0) * plot_w

    def py(y: float) -> float:
        return _TOP + plot_h - (y - y0) / ((y1 - y0) or 1.0) * plot_h

    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" height="{_HEIGHT}" '
        f'data-series="{len(series)}" data-points="{len(points)}" '
        'xmlns="http://www.w3.org/2000/svg">'
    ]
    for t in y_ticks:
        y = py(t)
        parts.append(
            f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_fmt(t)}</text>"
        )
    for t in x_ticks:
        x = px(t)
        parts.append(
            f'<line class="axis" x1="{x:.1f}" y1="{_TOP + plot_h}" x2="{x:.1f}" '
            f'y2="{_TOP + plot_h + 4}"/>'
            f'<text class="tick" x="{x:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle">'
            f"{_fmt(t)}</text>"
        )
    parts.append(
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_LEFT + plot_w}" '
        f'y2="{_TOP + plot_h}"/>'
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + plot_h}"/>'
        f'<text class="label" x="{_LEFT + plot_w / 2:.1f}" y="{_HEIGHT - 4}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="label" transform="translate(12 {_TOP + plot_h / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        finite = [(x, y) for x, y in pts if math.isfinite(y)]
        if len(finite) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in finite)
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>'
            )
        for x, y in finite:
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(name)}: {_fmt(x)}, {_fmt(y)}</title></circle>"
            )
        ly = _TOP + 6 + i * 16
        if ly < _HEIGHT - _BOTTOM:
            label = name if len(name) <= 18 else name[:17] + "…"
            parts.append(
                f'<rect x="{_LEFT + plot_w + 12}" y="{ly - 6}" width="10" height="10" '
                f'fill="{colour}"/><text class="legend" x="{_LEFT + plot_w + 26}" '
                f'y="{ly + 3}">{escape(label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
