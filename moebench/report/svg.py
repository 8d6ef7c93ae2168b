"""Small self-contained SVG charts (no plotting library): a histogram, lines against an x axis, horizontal bars.
Each chart is an <svg class="plot"> whose data-marks attribute counts the marks it drew (bars, lines, points)."""

import math
from html import escape

W, H = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 34, 46
COLORS = ("#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.2e}"


class _Frame:
    """Axes with ticks mapping data (x, y) into the chart's pixels."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xs: list[float], ys: list[float], y0: bool = True):
        self.xt = _ticks(min(xs), max(xs))
        self.yt = _ticks(min([*ys, 0.0] if y0 else ys), max(ys))
        self.parts = [f'<text x="{W / 2}" y="20" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
                      f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{escape(xlabel)}</text>',
                      f'<text x="16" y="{H / 2}" text-anchor="middle" transform="rotate(-90 16 {H / 2})">'
                      f'{escape(ylabel)}</text>']
        for t in self.yt:
            y = self.y(t)
            self.parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                              f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        for t in self.xt:
            x = self.x(t)
            self.parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{H - BOTTOM}" y2="{H - BOTTOM + 4}" stroke="#333"/>'
                              f'<text x="{x:.1f}" y="{H - BOTTOM + 17}" text-anchor="middle">{_fmt(t)}</text>')
        self.parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{H - BOTTOM}" y2="{H - BOTTOM}" stroke="#333"/>')
        self.marks = 0

    def x(self, v: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return LEFT + (v - lo) / ((hi - lo) or 1) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        return H - BOTTOM - (v - lo) / ((hi - lo) or 1) * (H - TOP - BOTTOM)

    def svg(self, title: str) -> str:
        return (f'<svg class="plot" data-marks="{self.marks}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
                f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg" '
                f'font-family="sans-serif" font-size="11">{"".join(self.parts)}</svg>')


def histogram(values: list[float], title: str, xlabel: str, bins: int = 30) -> str:
    """Counts of values in equal bins, with the median and p99 marked."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return empty(title)
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    f = _Frame(title, xlabel, "runs", [lo, lo + width * bins], [0, max(counts)])
    for i, c in enumerate(counts):
        if c:
            x0, x1, y = f.x(lo + i * width), f.x(lo + (i + 1) * width), f.y(c)
            f.parts.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                           f'height="{f.y(0) - y:.1f}" fill="{COLORS[0]}"><title>{c}</title></rect>')
            f.marks += 1
    ordered = sorted(values)
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        v = ordered[min(int(q * len(ordered)), len(ordered) - 1)]
        f.parts.append(f'<line x1="{f.x(v):.1f}" x2="{f.x(v):.1f}" y1="{TOP}" y2="{H - BOTTOM}" stroke="{COLORS[1]}" '
                       f'stroke-dasharray="4 3"/><text x="{f.x(v) + 3:.1f}" y="{TOP + 10}" fill="{COLORS[1]}">'
                       f'{name} {_fmt(v)}</text>')
    return f.svg(title)


def lines(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
          limits: dict[str, float] | None = None, points: bool = False) -> str:
    """One polyline per named series of (x, y); limits are horizontal dashed lines (a tolerance, say)."""
    series = {k: [(x, y) for x, y in v if math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return empty(title)
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v] + list((limits or {}).values())
    f = _Frame(title, xlabel, ylabel, xs, ys)
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{f.x(x):.1f},{f.y(y):.1f}" for x, y in pts)
        f.parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        f.marks += 1
        if points or len(pts) == 1:
            f.parts.extend(f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="3" fill="{color}"/>' for x, y in pts)
            f.marks += len(pts)
        f.parts.append(f'<text x="{W - RIGHT - 4}" y="{TOP + 12 + 13 * i}" text-anchor="end" fill="{color}">'
                       f'{escape(name)}</text>')
    for i, (name, v) in enumerate((limits or {}).items()):
        color = COLORS[(len(series) + i) % len(COLORS)]
        f.parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{f.y(v):.1f}" y2="{f.y(v):.1f}" stroke="{color}" '
                       f'stroke-dasharray="6 3"/><text x="{LEFT + 4}" y="{f.y(v) - 4:.1f}" fill="{color}">'
                       f'{escape(name)} {_fmt(v)}</text>')
    return f.svg(title)


def bars(items: list[tuple[str, float]], title: str, xlabel: str, highlight: set | frozenset = frozenset()) -> str:
    """Horizontal bars, one per (label, value); labels in `highlight` drawn in the second color."""
    if not items:
        return empty(title)
    height = TOP + BOTTOM + 22 * len(items)
    top = max(v for _, v in items) or 1.0
    parts = [f'<text x="{W / 2}" y="20" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
             f'<text x="{W / 2}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>']
    left = 250
    for i, (label, v) in enumerate(items):
        y = TOP + 22 * i
        w = (W - left - RIGHT - 60) * v / top
        color = COLORS[1] if label in highlight else COLORS[0]
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(label[:40])}</text>'
                     f'<rect x="{left}" y="{y + 3}" width="{max(w, 1):.1f}" height="16" fill="{color}"/>'
                     f'<text x="{left + w + 4:.1f}" y="{y + 15}">{_fmt(v)}</text>')
    return (f'<svg class="plot" data-marks="{len(items)}" viewBox="0 0 {W} {height}" width="{W}" height="{height}" '
            f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" '
            f'font-size="11">{"".join(parts)}</svg>')


def empty(title: str) -> str:
    return (f'<svg class="plot" data-marks="0" viewBox="0 0 {W} 60" width="{W}" height="60" '
            f'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="12">'
            f'<text x="10" y="34">{escape(title)}: no data</text></svg>')
