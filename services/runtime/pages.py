"""HTML that the evaluator's report and the workflow's Flyte decks share: the page frame
and its stylesheet, the loader's data profile as a table, and the sandboxed iframe a
deck holds a page in.

Rendering only, no stage logic: the evaluator's report (services/evaluator/report.py)
is a page with the profile as one of its sections; the load task's deck is the profile
alone. Every text that comes from the profile is escaped, every number checked.
"""

from __future__ import annotations

from html import escape
from typing import Any


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
            f'<td>{escape(str(column.get("distinct", "")))}</td><td class="text">{_column_summary(column)}</td>'
            f"<td>{_bars(histogram.get('counts', []))}</td></tr>"
        )
    return (
        f"<h2>Data profile</h2><p>{escape(str(profile.get('rows', '')))} rows in the source.</p>"
        '<table class="profile"><tr><th>column</th><th>role</th><th>values</th><th>missing</th>'
        f"<th>distinct</th><th>summary</th><th>histogram</th></tr>{''.join(rows)}</table>"
    )


def profile_page(profile: dict[str, Any]) -> str:
    """The profile alone, as a page (the Flyte deck of the load task)."""
    return page("mlmesh data profile", profile_section(profile))


_STYLE = (
    ".mlmesh-report{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;"
    "color:#1f2933;background:#f5f7fa;padding:20px;max-width:1280px;margin:0 auto;box-sizing:border-box}"
    ".mlmesh-report *{box-sizing:border-box}"
    ".mlmesh-report h1{font-size:22px;margin:6px 0 4px}"
    ".mlmesh-report h2{font-size:16px;margin:0 0 10px;color:#323f4b}"
    ".mlmesh-report h3{font-size:14px;margin:0 0 8px;color:#323f4b}"
    ".mlmesh-report code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f4f8;"
    "padding:1px 4px;border-radius:3px;overflow-wrap:anywhere}"
    ".mlmesh-report .card{background:#fff;border:1px solid #e4e7eb;border-radius:10px;padding:14px 18px;"
    "margin:0 0 16px;box-shadow:0 1px 3px rgba(15,23,42,.05)}"
    ".mlmesh-report .head{border-left:6px solid var(--tone)}"
    ".mlmesh-report .promote{--tone:#2f9e44}.mlmesh-report .retrain{--tone:#e8890c}"
    ".mlmesh-report .badge{display:inline-block;padding:3px 12px;border-radius:999px;background:var(--tone);"
    "color:#fff;font-weight:700;font-size:12px;letter-spacing:.06em}"
    ".mlmesh-report .sub{margin:0 0 6px;color:#52606d}"
    ".mlmesh-report ul.reasons{margin:6px 0 0;padding-left:20px;color:#3e4c59}"
    ".mlmesh-report .metrics-row{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 16px}"
    ".mlmesh-report .metric{flex:1 1 140px;background:#fff;border:1px solid #e4e7eb;border-radius:10px;padding:10px 14px}"
    ".mlmesh-report .metric .name{font-size:12px;color:#7b8794;text-transform:uppercase;letter-spacing:.04em}"
    ".mlmesh-report .metric .value{font-size:24px;font-weight:600;font-variant-numeric:tabular-nums}"
    ".mlmesh-report .bound{font-size:12px}.mlmesh-report .ok{color:#2f9e44}.mlmesh-report .fail{color:#c92a2a}"
    ".mlmesh-report .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));grid-auto-flow:row dense;gap:16px;margin:0 0 16px}"
    ".mlmesh-report .grid .card{margin:0}@media (min-width:800px){.mlmesh-report .grid .wide2{grid-column:span 2}}"
    ".mlmesh-report svg.importance-chart{width:100%;max-width:680px;height:auto;display:block}"
    ".mlmesh-report table.stages td{white-space:nowrap}.mlmesh-report table.stages td.text{white-space:normal}"
    ".mlmesh-report figure.chart svg{width:100%;height:auto;display:block}"
    ".mlmesh-report .legend{list-style:none;padding:0;margin:8px 0 0;display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12px}"
    ".mlmesh-report .swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}"
    ".mlmesh-report .caption,.mlmesh-report caption{font-size:12px;color:#7b8794;margin:6px 0 0;caption-side:bottom;text-align:left}"
    ".mlmesh-report table{border-collapse:collapse;margin:4px 0;font-variant-numeric:tabular-nums}"
    ".mlmesh-report td,.mlmesh-report th{border-bottom:1px solid #e4e7eb;padding:5px 10px;text-align:right;vertical-align:top}"
    ".mlmesh-report th{font-weight:600;color:#323f4b}"
    ".mlmesh-report td.text,.mlmesh-report th.text,.mlmesh-report table.facts td,.mlmesh-report table.facts th{text-align:left}"
    ".mlmesh-report table.facts th{width:110px;color:#7b8794;font-weight:500}"
    ".mlmesh-report .params{margin-top:4px;font-size:12px;display:flex;flex-wrap:wrap;gap:2px 12px}"
    ".mlmesh-report .param.set{font-weight:700}"
    ".mlmesh-report .scroll{overflow-x:auto}"
    ".mlmesh-report table.confusion-matrix td{min-width:44px;text-align:center;border:1px solid #fff}"
    ".mlmesh-report table.per-class td,.mlmesh-report table.per-class th{white-space:nowrap;padding:5px 6px}"
    ".mlmesh-report details{margin:6px 0}.mlmesh-report summary{cursor:pointer;color:#52606d;font-size:12px}"
    ".mlmesh-report section.wide{overflow-x:auto}"
)


def page(title: str, body: str) -> str:
    """A whole page: `body` inside the mlmesh frame, with the stylesheet inline (nothing is fetched)."""
    # Styles are scoped to .mlmesh-report, so the page can sit inside a Flyte deck
    # without restyling Flyte's own tabs (deck_html adds an iframe around it as well).
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body style="margin:0;background:#f5f7fa"><div class="mlmesh-report">{body}</div></body></html>\n'
    )


def deck_html(document: str, height: int | None = None) -> str:
    """A full page for a Flyte deck, inside an iframe, so its styles never reach Flyte's page.

    The page travels in `srcdoc`, attribute-escaped. `sandbox` with no permissions: no
    scripts, no forms, no popups, no navigating the parent, and an opaque origin. An
    iframe cannot size itself to its content without script, so the height is estimated
    from what the page holds; anything beyond it scrolls inside the frame.
    """
    if height is None:
        charts = document.count('class="card chart')
        rows = document.count("<tr")
        height = 700 + 460 * ((charts + 1) // 2) + 30 * rows
    height = max(400, min(int(height), 20000))
    return (
        f'<iframe class="mlmesh-report-frame" title="mlmesh report" sandbox="" referrerpolicy="no-referrer" '
        f'style="width:100%;height:{height}px;border:0;display:block" srcdoc="{escape(document, quote=True)}"></iframe>'
    )
