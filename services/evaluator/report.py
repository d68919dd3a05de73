"""The evaluation as one self-contained HTML page with inline SVG plots.

Hand-written SVG keeps matplotlib and its fonts out of the service image; the
plots are simple enough (a few polylines and a heat table) not to need it.
"""

from __future__ import annotations

from html import escape
from typing import Any

_W, _H, _PAD = 360, 300, 40
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _axes(x_label: str, y_label: str, lo: float, hi: float) -> list[str]:
    parts = [
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 10}" y2="{_H - _PAD}" stroke="#333"/>',
        f'<line x1="{_PAD}" y1="10" x2="{_PAD}" y2="{_H - _PAD}" stroke="#333"/>',
        f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle" font-size="12">{escape(x_label)}</text>',
        f'<text x="12" y="{_H / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 12 {_H / 2})">{escape(y_label)}</text>',
    ]
    for tick in (lo, (lo + hi) / 2, hi):
        x, y = _sx(tick, lo, hi), _sy(tick, lo, hi)
        parts.append(f'<text x="{x:.1f}" y="{_H - _PAD + 14}" text-anchor="middle" font-size="10">{tick:.3g}</text>')
        parts.append(f'<text x="{_PAD - 4}" y="{y + 3:.1f}" text-anchor="end" font-size="10">{tick:.3g}</text>')
    return parts


def _sx(v: float, lo: float, hi: float) -> float:
    return _PAD + (v - lo) / ((hi - lo) or 1) * (_W - 10 - _PAD)


def _sy(v: float, lo: float, hi: float) -> float:
    return _H - _PAD - (v - lo) / ((hi - lo) or 1) * (_H - _PAD - 10)


def roc_svg(curves: list[dict[str, Any]], class_names: list[str]) -> str:
    parts = [f'<svg class="roc" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}">']
    parts += _axes("false positive rate", "true positive rate", 0.0, 1.0)
    parts.append(f'<line x1="{_sx(0, 0, 1)}" y1="{_sy(0, 0, 1)}" x2="{_sx(1, 0, 1)}" y2="{_sy(1, 0, 1)}" stroke="#aaa" stroke-dasharray="4"/>')
    for i, curve in enumerate(curves):
        points = " ".join(f"{_sx(x, 0, 1):.1f},{_sy(y, 0, 1):.1f}" for x, y in zip(curve["fpr"], curve["tpr"], strict=True))
        colour = _COLOURS[i % len(_COLOURS)]
        label = _class_label(curve["class"], class_names)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"><title>{escape(label)}</title></polyline>')
        parts.append(f'<text x="{_W - 120}" y="{_H - _PAD - 10 - 14 * i}" font-size="11" fill="{colour}">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def scatter_svg(true: list[float], predicted: list[float]) -> str:
    lo = min(min(true), min(predicted))
    hi = max(max(true), max(predicted))
    parts = [f'<svg class="predicted-vs-true" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}">']
    parts += _axes("true", "predicted", lo, hi)
    parts.append(f'<line x1="{_sx(lo, lo, hi)}" y1="{_sy(lo, lo, hi)}" x2="{_sx(hi, lo, hi)}" y2="{_sy(hi, lo, hi)}" stroke="#aaa" stroke-dasharray="4"/>')
    for t, p in zip(true, predicted, strict=True):
        parts.append(f'<circle cx="{_sx(t, lo, hi):.1f}" cy="{_sy(p, lo, hi):.1f}" r="2.5" fill="#1f77b4" fill-opacity="0.6"/>')
    parts.append("</svg>")
    return "".join(parts)


def _class_label(index: int, class_names: list[str]) -> str:
    return class_names[index] if 0 <= index < len(class_names) else f"class {index}"


def confusion_table(matrix: list[list[int]], class_names: list[str]) -> str:
    peak = max((max(row) for row in matrix), default=1) or 1
    head = "".join(f"<th>{escape(_class_label(j, class_names))}</th>" for j in range(len(matrix)))
    rows = []
    for i, row in enumerate(matrix):
        cells = "".join(
            f'<td style="background: rgba(31,119,180,{count / peak:.2f})">{count}</td>' for count in row
        )
        rows.append(f"<tr><th>{escape(_class_label(i, class_names))}</th>{cells}</tr>")
    return (
        '<table class="confusion-matrix"><caption>rows: true class, columns: predicted class</caption>'
        f"<tr><th></th>{head}</tr>{''.join(rows)}</table>"
    )


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else escape(str(value))


def _bars(counts: list[Any], width: int = 120, height: int = 28) -> str:
    """A histogram as a row of bars."""
    if not isinstance(counts, list):
        return ""
    values = [c for c in counts if isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0]
    if not values or len(values) != len(counts):
        return ""
    peak = max(values) or 1
    step = width / len(values)
    bars = "".join(
        f'<rect x="{i * step:.1f}" y="{height - v / peak * height:.1f}" width="{max(step - 1, 1):.1f}" '
        f'height="{v / peak * height:.1f}" fill="#1f77b4"><title>{v}</title></rect>'
        for i, v in enumerate(values)
    )
    return f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{bars}</svg>'


def _column_summary(column: dict[str, Any]) -> str:
    if "top" in column and isinstance(column["top"], list):
        pairs = [pair for pair in column["top"][:5] if isinstance(pair, list) and len(pair) == 2]
        levels = [f"{escape(str(level))} ({count})" for level, count in pairs if isinstance(count, int)]
        return "top: " + ", ".join(levels)
    if "min" in column:
        text = f"{_number(column['min'])} to {_number(column.get('max'))}"
        if isinstance(column.get("mean"), (int, float)):
            text += f", mean {_number(column['mean'])}"
        return text
    return ""


def profile_section(profile: dict[str, Any]) -> str:
    """The loader's data profile: one row per column, with a histogram."""
    columns = profile.get("columns")
    if not isinstance(columns, list):
        return ""
    target = profile.get("target") if isinstance(profile.get("target"), dict) else None
    rows = []
    for column in ([target] if target else []) + [c for c in columns if isinstance(c, dict)]:
        histogram = column.get("histogram") if isinstance(column.get("histogram"), dict) else {}
        missing = f"{column.get('missing', 0)}" + (f" (+{column['infinite']} inf)" if column.get("infinite") else "")
        rows.append(
            f"<tr><th>{escape(str(column.get('name', '')))}</th><td>{escape(str(column.get('role', '')))}</td>"
            f"<td>{escape(str(column.get('count', '')))}</td><td>{escape(missing)}</td>"
            f"<td>{escape(str(column.get('distinct', '')))}</td><td class=\"text\">{_column_summary(column)}</td>"
            f"<td>{_bars(histogram.get('counts', []))}</td></tr>"
        )
    return (
        f"<h2>Data profile</h2><p>{escape(str(profile.get('rows', '')))} rows in the source.</p>"
        '<table class="profile"><tr><th>column</th><th>role</th><th>values</th><th>missing</th>'
        f"<th>distinct</th><th>summary</th><th>histogram</th></tr>{''.join(rows)}</table>"
    )


def profile_page(profile: dict[str, Any]) -> str:
    """The profile alone, as a page (the Flyte deck of the load task)."""
    return _page("mlmesh data profile", profile_section(profile))


def _split_section(split: dict[str, Any]) -> str:
    dropped = split.get("rows_dropped") if isinstance(split.get("rows_dropped"), dict) else {}
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
        test = balance.get("test") if isinstance(balance.get("test"), dict) else {}
        rows = "".join(
            f"<tr><th>{escape(str(name))}</th><td>{escape(str(count))}</td><td>{escape(str(test.get(name, '')))}</td></tr>"
            for name, count in balance["train"].items()
        )
        parts.append(f'<table class="class-balance"><tr><th>class</th><th>train</th><th>test</th></tr>{rows}</table>')
    return "".join(parts)


def _encoding_section(schema: dict[str, Any]) -> str:
    columns = [c for c in schema.get("columns", []) if isinstance(c, dict)] if isinstance(schema.get("columns"), list) else []
    rows = "".join(
        f"<tr><th>{escape(str(c.get('name', '')))}</th><td>{escape(str(c.get('role', '')))}</td>"
        f"<td>{escape(str(c.get('encoder', '')))}</td><td>{escape(str(c.get('levels_in_train', '')))}</td>"
        f"<td>{escape(str(c.get('missing_in_train', '')))}</td></tr>"
        for c in columns
    )
    names = schema.get("feature_names") if isinstance(schema.get("feature_names"), list) else []
    return (
        f"<h2>Features</h2><p>{len(columns)} source columns became {len(names)} model inputs, fitted on the train split.</p>"
        '<table class="encoding"><tr><th>column</th><th>role</th><th>encoder</th><th>levels in train</th>'
        f"<th>missing in train</th></tr>{rows}</table>"
    )


def _importance_section(importances: dict[str, Any]) -> str:
    values = importances.get("values") if isinstance(importances, dict) else None
    if not values:
        return ""
    rows = "".join(f"<tr><th>{escape(str(name))}</th><td>{value:.4g}</td></tr>" for name, value in values)
    return (
        f"<h2>Most important inputs</h2><p>{escape(str(importances.get('kind', '')))}</p>"
        f'<table class="importances"><tr><th>input</th><th>value</th></tr>{rows}</table>'
    )


_STYLE = (
    ".mlmesh-report{font-family:sans-serif;margin:1em}"
    ".mlmesh-report table{border-collapse:collapse;margin:1em 0}"
    ".mlmesh-report td,.mlmesh-report th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    ".mlmesh-report td.text{text-align:left}.mlmesh-report caption{font-size:small}"
)


def _page(title: str, body: str) -> str:
    # Styles are scoped to .mlmesh-report, so the page can sit inside a Flyte deck
    # without restyling Flyte's own tabs.
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<style>{_STYLE}</style></head><body><div class="mlmesh-report">{body}</div></body></html>\n'
    )


def render_html(report: dict[str, Any]) -> str:
    metrics = "".join(
        f"<tr><td>{escape(name)}</td><td>{value:.4f}</td></tr>" for name, value in sorted(report["metrics"].items())
    )
    reasons = "".join(f"<li>{escape(r)}</li>" for r in [*report["reasons"], *report.get("notes", [])])
    classes = report.get("class_names") or []
    sections = [
        f"<h1>Evaluation: {escape(report['decision'])}</h1>",
        f"<p>{escape(report['task_kind'])} model, {report['test_rows']} held-out rows"
        + (f"; classes: {escape(', '.join(classes[:50]))}" if classes else "") + ".</p>",
        f"<ul>{reasons}</ul>",
        f'<h2>Metrics</h2><table class="metrics"><tr><th>metric</th><th>value</th></tr>{metrics}</table>',
    ]
    if report["task_kind"] == "classification":
        if report["roc_curves"]:
            sections.append(f"<h2>ROC curve</h2>{roc_svg(report['roc_curves'], classes)}")
        sections.append(f"<h2>Confusion matrix</h2>{confusion_table(report['confusion_matrix'], classes)}")
    elif report["predictions"].get("true"):
        preds = report["predictions"]
        sections.append(f"<h2>Predicted vs true</h2>{scatter_svg(preds['true'], preds['predicted'])}")
    sections.append(_importance_section(report.get("importances", {})))
    if isinstance(report.get("split_report"), dict):
        sections.append(_split_section(report["split_report"]))
    if isinstance(report.get("feature_schema"), dict):
        sections.append(_encoding_section(report["feature_schema"]))
    if isinstance(report.get("profile"), dict):
        sections.append(profile_section(report["profile"]))
    return _page("mlmesh evaluation", "".join(sections))
