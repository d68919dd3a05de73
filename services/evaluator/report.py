"""The evaluation as one self-contained HTML page with inline SVG plots.

Hand-written SVG keeps matplotlib and its fonts out of the service image; the
plots are simple enough (polylines, dots, bars and a heat table) not to need it.
The page has no JavaScript and fetches nothing. Every text that comes from the
report (class and feature names, parameters, the store's manifests, the
profile) is escaped and bounded; every number is checked before it is drawn.
The page's frame and stylesheet and its data profile section are
services/runtime/pages.py's, which the workflow's Flyte decks share.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from html import escape
from typing import Any

from services.runtime.catalog import UPSTREAM_OF_EVALUATOR
from services.runtime.pages import page, profile_section
from services.runtime.vocabulary import Decision, TaskKind

# Tableau 10: distinct, colour-blind friendlier than the rainbow.
_COLOURS = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
_INK, _GRID, _MUTED = "#1f2933", "#e4e7eb", "#7b8794"
# Shown at most: classes in the confusion matrix and the per-class table, names' length.
MAX_MATRIX_CLASSES = 30
MAX_TABLE_CLASSES = 50
MAX_NAME = 60


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dict(value: Any) -> dict[str, Any]:
    """A part of the report that should be an object; anything else reads as an empty one."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    """A part of the report that should be an array; anything else reads as an empty one."""
    return value if isinstance(value, list) else []


def _text(value: Any, limit: int = MAX_NAME) -> str:
    """Untrusted text for the page: bounded, then escaped."""
    text = " ".join(str(value).split())
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else escape(str(value))
    return _text(value)


# ---- charts --------------------------------------------------------------------------------------
def _clamp(v: float) -> float:
    return 0.0 if not math.isfinite(v) else max(-1e5, min(1e5, v))


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 times a power of ten) covering [lo, hi]."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo] if math.isfinite(lo) else []
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = magnitude * 10
    for multiple in (1, 2, 2.5, 5, 10):
        if span / (multiple * magnitude) <= count:
            step = multiple * magnitude
            break
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    for i in range(first, first + count * 3):
        value = i * step
        if value > hi + step * 1e-9:
            break
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
    return ticks


def _tick_label(value: float) -> str:
    return f"{value:.3g}".replace("e+0", "e").replace("e-0", "e-")


def _range(values: list[float], pad: float = 0.05) -> tuple[float, float]:
    finite = [v for v in values if _is_number(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi == lo or not math.isfinite(hi - lo):
        width = abs(lo) * 0.1 or 1.0
        return lo - width, hi + width
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


class _Frame:
    """A plot area in an SVG of a fixed view box, with linear scales for both axes."""

    W, H, LEFT, RIGHT, TOP, BOTTOM = 440, 320, 58, 16, 14, 46

    def __init__(self, xlo: float, xhi: float, ylo: float, yhi: float):
        self.xlo, self.xhi, self.ylo, self.yhi = xlo, xhi if xhi > xlo else xlo + 1, ylo, yhi if yhi > ylo else ylo + 1

    def x(self, v: float) -> float:
        try:
            return _clamp(self.LEFT + (v - self.xlo) / (self.xhi - self.xlo) * (self.W - self.LEFT - self.RIGHT))
        except (OverflowError, ZeroDivisionError):
            return 0.0

    def y(self, v: float) -> float:
        try:
            return _clamp(
                self.H - self.BOTTOM - (v - self.ylo) / (self.yhi - self.ylo) * (self.H - self.TOP - self.BOTTOM)
            )
        except (OverflowError, ZeroDivisionError):
            return 0.0

    def open(self, css_class: str, label: str) -> str:
        return (
            f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.W} {self.H}" '
            f'role="img" aria-label="{escape(label)}" font-family="inherit">'
        )

    def axes(self, x_label: str, y_label: str) -> str:
        left, right, top, bottom = self.LEFT, self.W - self.RIGHT, self.TOP, self.H - self.BOTTOM
        parts = [
            f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="#fff" stroke="{_GRID}"/>'
        ]
        for tick in _ticks(self.xlo, self.xhi):
            x = self.x(tick)
            parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="{_GRID}"/>')
            parts.append(
                f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle" font-size="11" fill="{_MUTED}">{_tick_label(tick)}</text>'
            )
        for tick in _ticks(self.ylo, self.yhi):
            y = self.y(tick)
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="{_GRID}"/>')
            parts.append(
                f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="{_MUTED}">{_tick_label(tick)}</text>'
            )
        parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="{_MUTED}"/>')
        parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="{_MUTED}"/>')
        parts.append(
            f'<text x="{(left + right) / 2:.1f}" y="{self.H - 8}" text-anchor="middle" font-size="12" fill="{_INK}">{escape(x_label)}</text>'
        )
        middle = (top + bottom) / 2
        parts.append(
            f'<text x="14" y="{middle:.1f}" text-anchor="middle" font-size="12" fill="{_INK}" '
            f'transform="rotate(-90 14 {middle:.1f})">{escape(y_label)}</text>'
        )
        return "".join(parts)

    def line(self, x0: float, y0: float, x1: float, y1: float, colour: str = "#9aa5b1", dash: str = "5 4") -> str:
        return (
            f'<line x1="{self.x(x0):.1f}" y1="{self.y(y0):.1f}" x2="{self.x(x1):.1f}" y2="{self.y(y1):.1f}" '
            f'stroke="{colour}" stroke-dasharray="{dash}"/>'
        )

    def polyline(self, xs: list[Any], ys: list[Any], colour: str, title: str, width: float = 2.0) -> str:
        points = " ".join(
            f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in zip(xs, ys, strict=False) if _is_number(x) and _is_number(y)
        )
        return (
            f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" stroke-linejoin="round" '
            f'points="{points}"><title>{escape(title)}</title></polyline>'
        )

    def dots(self, xs: list[Any], ys: list[Any], colour: str, size: float = 4.5) -> str:
        """Many points as one path of zero-length round-capped segments: a few bytes per point."""
        path = "".join(
            f"M{self.x(x):.1f} {self.y(y):.1f}h0"
            for x, y in zip(xs, ys, strict=False)
            if _is_number(x) and _is_number(y)
        )
        return (
            f'<path d="{path}" stroke="{colour}" stroke-opacity="0.55" stroke-width="{size}" '
            'stroke-linecap="round" fill="none"/>'
        )


def _legend(entries: list[tuple[str, str]]) -> str:
    if not entries:
        return ""
    items = "".join(
        f'<li><span class="swatch" style="background:{colour}"></span>{text}</li>' for colour, text in entries
    )
    return f'<ul class="legend">{items}</ul>'


def _figure(title: str, svg: str, legend: str = "", caption: str = "", css_class: str = "") -> str:
    caption_html = f'<p class="caption">{caption}</p>' if caption else ""
    return f'<figure class="card chart {css_class}"><h3>{escape(title)}</h3>{svg}{legend}{caption_html}</figure>'


def _class_label(index: Any, class_names: list[str]) -> str:
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(class_names):
        return " ".join(str(class_names[index]).split())[:MAX_NAME]
    return f"class {index}"[:MAX_NAME]


def roc_svg(curves: list[dict[str, Any]], class_names: list[str]) -> tuple[str, str]:
    """The ROC curves and their legend (class name and AUC)."""
    frame = _Frame(0.0, 1.0, 0.0, 1.0)
    parts = [
        frame.open("roc", "ROC curve"),
        frame.axes("false positive rate", "true positive rate"),
        frame.line(0, 0, 1, 1),
    ]
    legend = []
    for i, curve in enumerate(curves):
        colour = _COLOURS[i % len(_COLOURS)]
        label = _class_label(curve.get("class"), class_names)
        parts.append(frame.polyline(curve.get("fpr", []), curve.get("tpr", []), colour, label))
        area = curve.get("auc")
        legend.append((colour, f"{escape(label)} <b>AUC {area:.3f}</b>" if _is_number(area) else escape(label)))
    parts.append("</svg>")
    return "".join(parts), _legend(legend)


def pr_svg(curves: list[dict[str, Any]], class_names: list[str]) -> tuple[str, str]:
    """Precision against recall per class, with the average precision in the legend."""
    frame = _Frame(0.0, 1.0, 0.0, 1.0)
    parts = [frame.open("precision-recall", "precision-recall curve"), frame.axes("recall", "precision")]
    legend = []
    for i, curve in enumerate(curves):
        colour = _COLOURS[i % len(_COLOURS)]
        label = _class_label(curve.get("class"), class_names)
        if len(curves) == 1 and _is_number(curve.get("prevalence")):  # a classifier that guesses
            parts.append(frame.line(0, curve["prevalence"], 1, curve["prevalence"]))
        parts.append(frame.polyline(curve.get("recall", []), curve.get("precision", []), colour, label))
        average = curve.get("average_precision")
        legend.append((colour, f"{escape(label)} <b>AP {average:.3f}</b>" if _is_number(average) else escape(label)))
    parts.append("</svg>")
    return "".join(parts), _legend(legend)


def calibration_svg(calibration: dict[str, Any], class_names: list[str]) -> tuple[str, str, str]:
    bins = [
        b
        for b in calibration.get("bins", [])
        if isinstance(b, dict)
        and _is_number(b.get("predicted"))
        and _is_number(b.get("observed"))
        and _is_number(b.get("count"))
    ]
    frame = _Frame(0.0, 1.0, 0.0, 1.0)
    top = calibration.get("kind") == "top class"
    parts = [
        frame.open("calibration", "calibration curve"),
        frame.axes(
            "mean predicted probability" if not top else "confidence in the predicted class",
            "observed frequency" if not top else "accuracy",
        ),
        frame.line(0, 0, 1, 1),
    ]
    colour = _COLOURS[0]
    parts.append(frame.polyline([b["predicted"] for b in bins], [b["observed"] for b in bins], colour, "calibration"))
    peak = max((b["count"] for b in bins), default=1) or 1
    for b in bins:
        radius = 2.5 + 4.5 * math.sqrt(b["count"] / peak)
        parts.append(
            f'<circle cx="{frame.x(b["predicted"]):.1f}" cy="{frame.y(b["observed"]):.1f}" r="{radius:.1f}" '
            f'fill="{colour}" fill-opacity="0.85" stroke="#fff"><title>{b["count"]} rows: predicted '
            f"{b['predicted']:.3f}, observed {b['observed']:.3f}</title></circle>"
        )
    parts.append("</svg>")
    if top:
        label = "top class: the predicted class's probability against how often it is right"
    else:
        label = f"positive class: {escape(_class_label(calibration.get('class'), class_names))}"
    error = calibration.get("expected_calibration_error")
    caption = f"{len(bins)} bins of width 0.1, dot area by rows" + (
        f"; expected calibration error {error:.3f}" if _is_number(error) else ""
    )
    return "".join(parts), _legend([(colour, label)]), caption


def scatter_svg(true: list[float], predicted: list[float]) -> str:
    lo, hi = _range([*true, *predicted])
    frame = _Frame(lo, hi, lo, hi)
    return "".join(
        [
            frame.open("predicted-vs-true", "predicted against true"),
            frame.axes("true value", "predicted value"),
            frame.line(lo, lo, hi, hi),
            frame.dots(true, predicted, _COLOURS[0]),
            "</svg>",
        ]
    )


def residual_svg(true: list[float], predicted: list[float]) -> str:
    residuals = [
        t - p if _is_number(t) and _is_number(p) else float("nan") for t, p in zip(true, predicted, strict=False)
    ]
    xlo, xhi = _range(predicted)
    ylo, yhi = _range([*residuals, 0.0])
    frame = _Frame(xlo, xhi, ylo, yhi)
    return "".join(
        [
            frame.open("residuals", "residuals against predicted"),
            frame.axes("predicted value", "residual (true − predicted)"),
            frame.line(xlo, 0, xhi, 0, colour=_COLOURS[2], dash="6 3"),
            frame.dots(predicted, residuals, _COLOURS[1]),
            "</svg>",
        ]
    )


def residual_histogram_svg(residuals: dict[str, Any]) -> str:
    histogram = _dict(residuals.get("histogram"))
    edges, counts = histogram.get("edges", []), histogram.get("counts", [])
    if not (isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1 and counts):
        return ""
    if not all(_is_number(v) for v in [*edges, *counts]):
        return ""
    peak = max(counts) or 1
    frame = _Frame(edges[0], edges[-1], 0, peak * 1.08)
    parts = [
        frame.open("residual-histogram", "distribution of residuals"),
        frame.axes("residual (true − predicted)", "rows"),
    ]
    bottom = frame.y(0)
    for left, right, count in zip(edges, edges[1:], counts, strict=False):
        x0, x1, top = frame.x(left), frame.x(right), frame.y(count)
        parts.append(
            f'<rect x="{x0 + 0.5:.1f}" y="{top:.1f}" width="{max(x1 - x0 - 1, 0.8):.1f}" height="{max(bottom - top, 0):.1f}" '
            f'fill="{_COLOURS[0]}"><title>{count} rows from {left:.4g} to {right:.4g}</title></rect>'
        )
    if edges[0] <= 0 <= edges[-1]:
        parts.append(frame.line(0, 0, 0, peak * 1.08, colour=_COLOURS[2], dash="6 3"))
    parts.append("</svg>")
    return "".join(parts)


def importance_svg(values: list[Any]) -> str:
    """Importances as horizontal bars, the largest on top, with the feature names on the left."""
    rows = [(str(v[0]), v[1]) for v in values if isinstance(v, (list, tuple)) and len(v) == 2 and _is_number(v[1])]
    if not rows:
        return ""
    width, label_width, row_height, top = 640, 220, 22, 8
    height = top + row_height * len(rows) + 26
    lo, hi = min(0.0, *(v for _, v in rows)), max(0.0, *(v for _, v in rows))
    span = (hi - lo) or 1.0
    plot_left, plot_right = label_width + 6, width - 58

    def sx(v: float) -> float:
        return plot_left + (v - lo) / span * (plot_right - plot_left)

    parts = [
        f'<svg class="importance-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="feature importances" font-family="inherit">'
    ]
    zero = sx(0.0)
    for i, (name, value) in enumerate(rows):
        y = top + i * row_height
        x0, x1 = sorted((zero, sx(value)))
        shown = name if len(name) <= 34 else name[:33] + "…"
        parts.append(
            f'<text x="{label_width}" y="{y + 14}" text-anchor="end" font-size="12" fill="{_INK}">'
            f"<title>{escape(name[:200])}</title>{escape(shown)}</text>"
            f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 0.8):.1f}" height="{row_height - 6}" rx="2" '
            f'fill="{_COLOURS[0] if value >= 0 else _COLOURS[2]}"/>'
            f'<text x="{max(x1, zero) + 4:.1f}" y="{y + 14}" font-size="11" fill="{_MUTED}">{value:.3g}</text>'
        )
    axis = top + row_height * len(rows) + 4
    parts.append(f'<line x1="{zero:.1f}" y1="{top}" x2="{zero:.1f}" y2="{axis}" stroke="{_MUTED}"/>')
    for tick in _ticks(lo, hi, 4):
        parts.append(
            f'<text x="{sx(tick):.1f}" y="{axis + 14}" text-anchor="middle" font-size="10" fill="{_MUTED}">{_tick_label(tick)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def confusion_table(matrix: list[list[int]], class_names: list[str]) -> str:
    size = len(matrix)
    shown = list(range(min(size, MAX_MATRIX_CLASSES)))
    peak = max((max(row) for row in matrix if row), default=1) or 1
    head = "".join(f"<th>{escape(_class_label(j, class_names))}</th>" for j in shown)
    rows = []
    for i in shown:
        cells = []
        for j in shown:
            count = matrix[i][j] if j < len(matrix[i]) else 0
            share = count / peak if _is_number(count) else 0
            ink = "#fff" if share > 0.55 else _INK
            tone = "89,161,79" if i == j else "225,87,89"
            cells.append(f'<td style="background:rgba({tone},{share:.2f});color:{ink}">{count}</td>')
        rows.append(f"<tr><th>{escape(_class_label(i, class_names))}</th>{''.join(cells)}</tr>")
    note = f"; the first {len(shown)} of {size} classes" if len(shown) < size else ""
    return (
        '<div class="scroll"><table class="confusion-matrix"><caption>rows: true class, columns: predicted class; '
        f"green: right, red: wrong{note}</caption><tr><th></th>{head}</tr>{''.join(rows)}</table></div>"
    )


def per_class_table(per_class: list[dict[str, Any]], class_names: list[str]) -> str:
    entries = [e for e in per_class if isinstance(e, dict)]
    if not entries:
        return ""
    shown = sorted(entries, key=lambda e: -e.get("support", 0) if _is_number(e.get("support")) else 0)[
        :MAX_TABLE_CLASSES
    ]
    shown.sort(key=lambda e: e.get("class", 0) if _is_number(e.get("class")) else 0)
    rows = []
    for entry in shown:
        cells = "".join(
            f'<td style="background:rgba(78,121,167,{entry[k] * 0.22:.2f})">{entry[k]:.3f}</td>'
            if _is_number(entry.get(k))
            else "<td></td>"
            for k in ("precision", "recall", "f1")
        )
        rows.append(
            f"<tr><th>{escape(_class_label(entry.get('class'), class_names))}</th>{cells}"
            f"<td>{_fmt(entry.get('support'))}</td></tr>"
        )
    note = (
        f'<p class="caption">The {len(shown)} most frequent of {len(entries)} classes.</p>'
        if len(shown) < len(entries)
        else ""
    )
    return (
        '<section class="card"><h2>Per class</h2><div class="scroll"><table class="per-class">'
        "<tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr>"
        f"{''.join(rows)}</table></div>{note}</section>"
    )


def _split_section(split: dict[str, Any]) -> str:
    dropped = _dict(split.get("rows_dropped"))
    reasons = ", ".join(f"{escape(str(k).replace('_', ' '))}: {escape(str(v))}" for k, v in dropped.items()) or "none"
    parts = [
        "<h2>Rows</h2>",
        f"<p>{escape(str(split.get('rows_in', '')))} rows in; dropped by reason: {reasons}; "
        f"{escape(str(split.get('train_rows', '')))} train, {escape(str(split.get('test_rows', '')))} test "
        f"(test fraction {escape(str(split.get('test_fraction', '')))}, seed {escape(str(split.get('seed', '')))}). "
        f"Exact repeats found: {escape(str(split.get('duplicate_rows_found', 0)))}.</p>",
    ]
    balance = split.get("class_balance")
    if isinstance(balance, dict) and isinstance(balance.get("train"), dict):
        test = _dict(balance.get("test"))
        rows = "".join(
            f"<tr><th>{escape(str(name))}</th><td>{escape(str(count))}</td><td>{escape(str(test.get(name, '')))}</td></tr>"
            for name, count in balance["train"].items()
        )
        parts.append(f'<table class="class-balance"><tr><th>class</th><th>train</th><th>test</th></tr>{rows}</table>')
    return "".join(parts)


def _encoding_section(schema: dict[str, Any]) -> str:
    columns = (
        [c for c in schema.get("columns", []) if isinstance(c, dict)] if isinstance(schema.get("columns"), list) else []
    )
    rows = "".join(
        f"<tr><th>{escape(str(c.get('name', '')))}</th><td>{escape(str(c.get('role', '')))}</td>"
        f"<td>{escape(str(c.get('encoder', '')))}</td><td>{escape(str(c.get('levels_in_train', '')))}</td>"
        f"<td>{escape(str(c.get('missing_in_train', '')))}</td></tr>"
        for c in columns
    )
    names = _list(schema.get("feature_names"))
    return (
        f"<h2>Features</h2><p>{len(columns)} source columns became {len(names)} model inputs, fitted on the train split.</p>"
        '<table class="encoding"><tr><th>column</th><th>role</th><th>encoder</th><th>levels in train</th>'
        f"<th>missing in train</th></tr>{rows}</table>"
    )


def _importance_section(importances: dict[str, Any]) -> str:
    values = importances.get("values") if isinstance(importances, dict) else None
    if not isinstance(values, list) or not values:
        return ""
    rows = "".join(
        f"<tr><th>{_text(v[0], 200)}</th><td>{_fmt(v[1])}</td></tr>"
        for v in values
        if isinstance(v, (list, tuple)) and len(v) == 2
    )
    return (
        f"<h2>Most important inputs</h2><p>{_text(importances.get('kind', ''), 200)}</p>{importance_svg(values)}"
        f'<details><summary>values</summary><table class="importances"><tr><th>input</th><th>value</th></tr>{rows}</table></details>'
    )


def _when(text: Any) -> str:
    """An ISO time from a manifest, shown in UTC; anything else shown as it is, escaped."""
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return _text(text, 40)
    if moment.tzinfo is not None:
        return escape(moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))
    return escape(moment.strftime("%Y-%m-%d %H:%M:%S"))


def _duration(seconds: Any) -> str:
    if not _is_number(seconds) or seconds < 0:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"


def _literal(value: Any, limit: int = 60) -> str:
    """A parameter as JSON would spell it (strings bare unless empty), bounded and escaped."""
    if isinstance(value, str):
        return _text(value, limit) if value else '""'
    try:
        return _text(json.dumps(value, sort_keys=True, default=str), limit)
    except (TypeError, ValueError, RecursionError):
        return _text(value, limit)


def _params_inline(params: Any, limit: int = 12) -> str:
    if not isinstance(params, dict) or not params:
        return ""
    items = [f"{_text(k, 40)}=<code>{_literal(v)}</code>" for k, v in list(params.items())[:limit]]
    more = f" (+{len(params) - limit} more)" if len(params) > limit else ""
    return ", ".join(items) + more


def _what_ran(report: dict[str, Any]) -> str:
    provenance = _dict(report.get("provenance"))
    stages = _dict(provenance.get("stages"))
    model = _dict(report.get("model"))
    facts = []

    # The report names no run of its own: it is a pure function of its inputs and their manifests,
    # so any run that asks the same (or recomputes it) gets these very bytes. When the manifests
    # name the run that computed a stage, the stage table shows it.
    times = sorted(
        str(stage.get("created_at")) for stage in stages.values() if isinstance(stage, dict) and stage.get("created_at")
    )
    latest = f" The newest input was computed at {_when(times[-1])} UTC." if times else ""
    facts.append(
        "<tr><th>produced</th><td>from the inputs below and their manifests, nothing else: any run that sends the "
        "same request gets this same report (the evaluator memoizes by its inputs' digests), so it names no run. "
        f"The runs that computed or reused it: <code>mlmesh lineage</code> on this report.{latest}</td></tr>"
    )

    loader = _dict(stages.get("loader"))
    loader_params = _dict(loader.get("params"))
    dataset = []
    if "source" in loader_params:
        dataset.append(f"<code>{_text(loader_params['source'], 200)}</code>")
    if loader_params.get("target_column"):
        dataset.append(f"target <code>{_text(loader_params['target_column'])}</code>")
    profile = _dict(report.get("profile"))
    split = _dict(report.get("split_report"))
    rows = profile.get("rows", split.get("rows_in"))
    if _is_number(rows):
        columns = profile.get("columns")
        shape = ""
        if isinstance(columns, list):
            target = 1 if isinstance(profile.get("target"), dict) else 0
            shape = f" × {len(columns) + target} columns" + (
                f" ({len(columns)} features and the target)" if target else ""
            )
        dataset.append(f"{_fmt(rows)} rows{shape}")
    test_rows = report.get("test_rows")
    if _is_number(test_rows):
        dataset.append(
            f"{_fmt(test_rows)} test rows"
            + (f" × {_fmt(model['features'])} model inputs" if _is_number(model.get("features")) else "")
        )
    if dataset:
        facts.append(f"<tr><th>dataset</th><td>{'; '.join(dataset)}</td></tr>")

    if model.get("class"):
        trainer = _dict(stages.get("trainer"))
        trainer_params = _dict(trainer.get("params"))
        asked = trainer_params.get("model")
        named = (
            f" (asked for as <code>{_text(asked)}</code>)"
            if asked
            else (" (the task's default model)" if trainer else "")
        )
        hyper = _dict(model.get("hyperparameters"))
        requested = _dict(trainer_params.get("hyperparameters"))
        cells = "".join(
            f'<span class="param{" set" if k in requested else ""}">{_text(k, 40)}=<code>{_literal(v)}</code></span>'
            for k, v in hyper.items()
        )
        legend = ' <span class="caption">(bold: set in the request)</span>' if requested else ""
        facts.append(
            f"<tr><th>model</th><td><b>{_text(model['class'])}</b>{named}{legend}"
            f'<div class="params">{cells}</div></td></tr>'
        )

    stage_rows = []
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            continue
        stage_rows.append(
            f"<tr><th>{_text(name, 20)}</th><td>{_text(stage.get('stage_version', ''), 40)}</td>"
            f"<td>{_when(stage.get('created_at', ''))}"
            + (f"<br><code>{_text(stage['run_id'], 128)}</code>" if stage.get("run_id") else "")
            + f"</td><td>{_duration(stage.get('duration_seconds'))}</td>"
            f'<td class="text">{_params_inline(stage.get("params"))}</td></tr>'
        )
    if provenance.get("evaluator_version"):
        stage_rows.append(
            f"<tr><th>evaluator</th><td>{_text(provenance['evaluator_version'], 40)}</td>"
            '<td colspan="2">this report (its time and duration are in its manifest)</td>'
            f'<td class="text">{_params_inline({k: v for k, v in (report.get("thresholds") or {}).items() if v})}</td></tr>'
        )
    missing = [s for s in UPSTREAM_OF_EVALUATOR if s not in stages] if provenance else []
    notes = [_text(n, 200) for n in provenance.get("notes", []) if isinstance(n, str)] if provenance else []
    if missing:
        notes.append(
            f"no manifest found for {', '.join(missing)}: those inputs were not produced by a stage of this store"
        )
    table = (
        '<div class="scroll"><table class="stages"><tr><th>stage</th><th>version</th><th>computed at (UTC)</th>'
        f'<th>took</th><th class="text">parameters</th></tr>{"".join(stage_rows)}</table></div>'
        if stage_rows
        else ""
    )
    note_html = "".join(f'<p class="caption">{n}</p>' for n in notes)
    return (
        f'<section class="card what-ran"><h2>What ran</h2><table class="facts">{"".join(facts)}</table>'
        f"{table}{note_html}</section>"
    )


_LOWER_IS_BETTER = {"log_loss", "mae", "rmse"}


def _metric_cards(report: dict[str, Any]) -> str:
    thresholds = _dict(report.get("thresholds"))
    minimums = _dict(thresholds.get("minimums"))
    maximums = _dict(thresholds.get("maximums"))
    cards = []
    for name, value in sorted(report["metrics"].items()):
        bound = ""
        if name in minimums and _is_number(minimums[name]):
            ok = _is_number(value) and value >= minimums[name]
            bound = f'<span class="bound {"ok" if ok else "fail"}">{"✓" if ok else "✗"} min {minimums[name]:g}</span>'
        elif name in maximums and _is_number(maximums[name]):
            ok = _is_number(value) and value <= maximums[name]
            bound = f'<span class="bound {"ok" if ok else "fail"}">{"✓" if ok else "✗"} max {maximums[name]:g}</span>'
        direction = "lower is better" if name in _LOWER_IS_BETTER else "higher is better"
        cards.append(
            f'<div class="metric" title="{direction}"><div class="name">{escape(name.replace("_", " "))}</div>'
            f'<div class="value">{_fmt(value)}</div>{bound}</div>'
        )
    return f'<section class="metrics-row">{"".join(cards)}</section>'


def render_html(report: dict[str, Any]) -> str:
    thresholds = _dict(report.get("thresholds"))
    minimums = _dict(thresholds.get("minimums"))
    maximums = _dict(thresholds.get("maximums"))

    def bound(name: str) -> str:
        if _is_number(minimums.get(name)):
            return f"≥ {minimums[name]:g}"
        if _is_number(maximums.get(name)):
            return f"≤ {maximums[name]:g}"
        return ""

    metrics = "".join(
        f"<tr><td>{escape(name)}</td><td>{value:.4f}</td><td>{bound(name)}</td></tr>"
        for name, value in sorted(report["metrics"].items())
    )
    reasons = "".join(f"<li>{_text(r, 300)}</li>" for r in [*report["reasons"], *report.get("notes", [])])
    classes = [str(c) for c in (report.get("class_names") or [])]
    decision = str(report["decision"])
    tone = "promote" if decision == Decision.PROMOTE else "retrain"
    shown_classes = ", ".join(" ".join(c.split())[:MAX_NAME] for c in classes[:50]) + (
        ", …" if len(classes) > 50 else ""
    )
    sections = [
        f'<header class="card head {tone}"><span class="badge">{escape(decision)}</span>'
        f"<h1>Evaluation: {escape(decision)}</h1>"
        f'<p class="sub">{escape(report["task_kind"])} model, {report["test_rows"]} held-out rows'
        + (f"; classes: {escape(shown_classes)}" if classes else "")
        + f'.</p><ul class="reasons">{reasons}</ul></header>',
        _metric_cards(report),
        _what_ran(report),
    ]
    charts = []
    if report["task_kind"] == TaskKind.CLASSIFICATION:
        if report.get("roc_curves"):
            svg, legend = roc_svg(report["roc_curves"], classes)
            charts.append(
                _figure(
                    "ROC curve", svg, legend, "one against the rest per class" if len(report["roc_curves"]) > 1 else ""
                )
            )
        if report.get("pr_curves"):
            svg, legend = pr_svg(report["pr_curves"], classes)
            charts.append(
                _figure(
                    "Precision-recall curve",
                    svg,
                    legend,
                    "dashed: the positive class's share, what guessing achieves"
                    if len(report["pr_curves"]) == 1
                    else "",
                )
            )
        if isinstance(report.get("calibration"), dict) and report["calibration"].get("bins"):
            svg, legend, caption = calibration_svg(report["calibration"], classes)
            charts.append(_figure("Calibration", svg, legend, caption))
        charts.append(
            f'<figure class="card chart"><h3>Confusion matrix</h3>{confusion_table(report["confusion_matrix"], classes)}</figure>'
        )
    else:
        preds = report.get("predictions") or {}
        if preds.get("true"):
            charts.append(
                _figure(
                    "Predicted vs true",
                    scatter_svg(preds["true"], preds["predicted"]),
                    caption="dashed: a perfect prediction",
                )
            )
            charts.append(
                _figure(
                    "Residuals vs predicted",
                    residual_svg(preds["true"], preds["predicted"]),
                    caption="a residual is true − predicted; look for a trend or a funnel",
                )
            )
        residuals = _dict(report.get("residuals"))
        histogram = residual_histogram_svg(residuals)
        if histogram:
            summary = ", ".join(
                f"{k} {_fmt(residuals[k])}"
                for k in ("mean", "std", "p05", "p50", "p95")
                if _is_number(residuals.get(k))
            )
            charts.append(
                _figure("Error distribution", histogram, caption=f"all {report['test_rows']} test rows; {summary}")
            )
    if report["task_kind"] == TaskKind.CLASSIFICATION:
        charts.append(per_class_table(report.get("per_class") or [], classes))
    importances = _importance_section(report.get("importances", {}))
    if importances:
        charts.append(f'<section class="card chart wide2">{importances}</section>')
    charts.append(
        f'<section class="card"><h2>Metrics</h2><table class="metrics"><tr><th>metric</th><th>value</th><th>threshold</th></tr>{metrics}</table></section>'
    )
    sections.append(f'<div class="grid">{"".join(charts)}</div>')
    if isinstance(report.get("split_report"), dict):
        sections.append(f'<section class="card">{_split_section(report["split_report"])}</section>')
    if isinstance(report.get("feature_schema"), dict):
        sections.append(f'<section class="card wide">{_encoding_section(report["feature_schema"])}</section>')
    if isinstance(report.get("profile"), dict):
        sections.append(f'<section class="card wide">{profile_section(report["profile"])}</section>')
    return page("mlmesh evaluation", "".join(sections))
