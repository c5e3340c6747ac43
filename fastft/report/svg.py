"""Line charts as inline SVG: a figure the HTML report embeds without network, JavaScript or files."""
from __future__ import annotations

import html
import math

COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:g}" if abs(v) >= 1 else f"{v:.3g}"


def svg_chart(series: list[tuple[str, list[tuple[float, float]]]], title: str, xlabel: str = "step",
              ylabel: str = "", width: int = 560, height: int = 240) -> str:
    """Line chart (points marked) of ``[(label, [(x, y), ...]), ...]``, one color per series."""
    pts = [(x, y) for _, s in series for x, y in s if y is not None and math.isfinite(y)]
    esc = html.escape
    if not pts:
        return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="60" role="img">'
                f'<title>{esc(title)}</title><text x="10" y="35" font-size="13" fill="#57606a">{esc(title)}: '
                'nothing logged</text></svg>')
    left, right, top, bottom = 64, 16, 28, 40
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    if min(ys) >= 0 > y0:
        y0 = 0.0
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [(f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{esc(title)}</title>'),
           f'<text x="{left}" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    for t in _ticks(y0, y1):
        if y0 <= t <= y1:
            y = sy(t)
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d0d7de" '
                       'stroke-width="0.6"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                       f'{_tick_label(t)}</text>')
    for t in _ticks(x0, x1, 6):
        if x0 <= t <= x1:
            x = sx(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#57606a"/>')
            out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="10" text-anchor="middle">'
                       f'{_tick_label(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#57606a" '
               'stroke-width="0.8"/>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{esc(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="12" y="{top + ph / 2:.0f}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 12 {top + ph / 2:.0f})">{esc(ylabel)}</text>')
    for i, (label, s) in enumerate(series):
        s = [(x, y) for x, y in s if y is not None and math.isfinite(y)]
        color = COLORS[i % len(COLORS)]
        if len(s) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{path}"/>')
        for x, y in s if len(s) <= 60 else []:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{color}">'
                       f'<title>{esc(label)}: step {_tick_label(x)}, {y:.6g}</title></circle>')
        if len(series) > 1 or label:
            room = max(80, (pw - 8) // len(series))  # legend: one slot per series across the plot
            lx = left + 8 + room * i
            out.append(f'<rect x="{lx}" y="{top + 6}" width="10" height="10" fill="{color}"/>'
                       f'<text x="{lx + 14}" y="{top + 15}" font-size="10">{esc(label[:(room - 18) // 6])}</text>')
    out.append("</svg>")
    return "".join(out)
