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


def render_html(report: dict[str, Any]) -> str:
    metrics = "".join(
        f"<tr><td>{escape(name)}</td><td>{value:.4f}</td></tr>" for name, value in sorted(report["metrics"].items())
    )
    reasons = "".join(f"<li>{escape(r)}</li>" for r in [*report["reasons"], *report.get("notes", [])])
    sections = [
        f"<h1>Evaluation: {escape(report['decision'])}</h1>",
        f"<p>{escape(report['task_kind'])} model, {report['test_rows']} held-out rows.</p>",
        f"<ul>{reasons}</ul>",
        f'<h2>Metrics</h2><table class="metrics"><tr><th>metric</th><th>value</th></tr>{metrics}</table>',
    ]
    if report["task_kind"] == "classification":
        if report["roc_curves"]:
            sections.append(f"<h2>ROC curve</h2>{roc_svg(report['roc_curves'], report['class_names'])}")
        sections.append(f"<h2>Confusion matrix</h2>{confusion_table(report['confusion_matrix'], report['class_names'])}")
    elif report["predictions"].get("true"):
        preds = report["predictions"]
        sections.append(f"<h2>Predicted vs true</h2>{scatter_svg(preds['true'], preds['predicted'])}")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}caption{font-size:small}"
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>mlmesh evaluation</title>'
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    )
