"""Bar charts as inline SVG, drawn on the server: the HTML report needs no script and no network.

One chart kind covers the report: categories along the x axis, one bar per series in each, a y axis
with round ticks, a legend, and each bar's value as its tooltip (<title>)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 900, 300
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 30, 60


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    values: Sequence[float]
    colour: str


def _ticks(top: float) -> list[float]:
    """Round values from 0 to at least `top`: 0, 2, 4 … or 0, 50, 100 …, five or so of them; whole
    numbers, since the charts count tickets or percent."""
    if top <= 0:
        return [0.0, 1.0]
    raw = max(top / 5, 1.0)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def bar_chart(
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    value_label: Callable[[float], str] = lambda v: f"{v:g}",
    top: float | None = None,
) -> str:
    """An SVG bar chart; `top` fixes the y axis' end (100 for percentages)."""
    ticks = _ticks(top if top is not None else max((v for s in series for v in s.values), default=0))
    scale = (HEIGHT - TOP - BOTTOM) / ticks[-1]
    base = HEIGHT - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(len(categories), 1)
    bar = max(slot * 0.8 / max(len(series), 1), 0.5)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-label="{escape(title)}"><title>{escape(title)}</title>'
    ]
    for tick in ticks:
        y = base - tick * scale
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value_label(tick)}</text>')
    every = max(1, math.ceil(len(categories) / 10))  # at most ~10 labels under the axis
    for i, category in enumerate(categories):
        x0 = LEFT + i * slot + slot * 0.1
        for j, s in enumerate(series):
            value = s.values[i]
            height = value * scale
            parts.append(
                f'<rect class="bar" x="{x0 + j * bar:.2f}" y="{base - height:.2f}" width="{bar:.2f}"'
                f' height="{height:.2f}" fill="{s.colour}"><title>{escape(category)}: {escape(s.name)}'
                f" {value_label(value)}</title></rect>"
            )
        if i % every == 0:
            x = LEFT + (i + 0.5) * slot
            parts.append(
                f'<text class="label" x="{x:.1f}" y="{base + 16}" text-anchor="middle">{escape(category)}</text>'
            )
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}"/>')
    parts += _legend(series)
    parts.append("</svg>")
    return "".join(parts)


def _legend(series: Sequence[Series]) -> list[str]:
    parts = []
    for j, s in enumerate(series):
        x = LEFT + j * 200
        parts.append(f'<rect x="{x}" y="{HEIGHT - 22}" width="12" height="12" fill="{s.colour}"/>')
        parts.append(f'<text class="legend" x="{x + 18}" y="{HEIGHT - 12}">{escape(s.name)}</text>')
    return parts
