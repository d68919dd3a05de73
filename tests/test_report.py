"""The evaluator's HTML report: what it shows, through real RPCs on a real mesh, and how it renders.

The page is parsed (html.parser) and its sections, charts, legends and tables are checked
against scikit-learn's own computation on the same stored arrays. Hostile inputs (one class,
200 classes, constant predictions, zero residuals, one test row, hand-written manifests) must
give a report, never INTERNAL. Headless Chromium renders the pages, and the screenshots must
not be blank. With MLMESH_REPORT_SCREENSHOTS=docs/images the screenshots are kept there:

    MLMESH_REPORT_SCREENSHOTS=docs/images .venv/bin/pytest tests/test_report.py -k screenshot
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics
from sklearn.linear_model import LogisticRegression

from mlmesh.evaluator.v1 import evaluator_pb2
from services.client.mesh import MeshClient, PipelineConfig, PipelineRun
from services.evaluator import logic
from services.evaluator.report import render_html
from services.runtime.catalog import PIPELINE_STAGES
from services.runtime.formats import NPY, array_to_npy, json_bytes_to_doc, npy_to_array, skops_to_model
from services.runtime.pages import deck_html
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from services.runtime.vocabulary import Decision, TaskKind
from tests.chromium_bin import chromium
from tests.helpers import evaluate_request

PROMOTE, RETRAIN = evaluator_pb2.DECISION_PROMOTE, evaluator_pb2.DECISION_RETRAIN
BINARY_SOURCE = "synthetic:classification?rows=400&features=8&classes=2&seed=3"
STAGE_ROWS = PIPELINE_STAGES


# ---- reading the page ------------------------------------------------------------------------------
class Page(HTMLParser):
    """The parts of the report a reader sees: headings, chart classes, legends, tables, all text."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.headings: list[str] = []
        self.svgs: list[str] = []
        self.legends: list[list[str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self.tags: list[str] = []
        self.iframes: list[dict[str, str | None]] = []
        self._heading: list[str] | None = None
        self._lists: list[bool] = []  # open <ul>s: is each a legend?
        self._legend_item: list[str] | None = None
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = dict(attrs)
        css = attributes.get("class") or ""
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        elif tag == "svg":
            self.svgs.append(css)
        elif tag == "ul":
            self._lists.append("legend" in css.split())
            if self._lists[-1]:
                self.legends.append([])
        elif tag == "li" and self._lists and self._lists[-1]:
            self._legend_item = []
        elif tag == "table":
            self._table = css or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "iframe":
            self.iframes.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()))
            self._heading = None
        elif tag == "li" and self._legend_item is not None:
            self.legends[-1].append(" ".join("".join(self._legend_item).split()))
            self._legend_item = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "ul" and self._lists:
            self._lists.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for part in (self._heading, self._legend_item, self._cell):
            if part is not None:
                part.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def stored(settings: Settings, run: PipelineRun, reply: evaluator_pb2.EvaluateResponse | None = None):
    store = ArtifactStore(settings.artifact_root)
    reply = reply or run.evaluate
    model = skops_to_model(store.get(run.train.model), "model")
    x = pd.DataFrame(npy_to_array(store.get(run.features.x_test), "x_test"), columns=model.feature_names_in_)
    y = npy_to_array(store.get(run.features.y_test), "y_test")
    report = json_bytes_to_doc(store.get(reply.metrics_report), "metrics_report")
    html = store.get(reply.html_report).decode()
    return model, x, y, report, html


def check_what_ran(page: Page, client: MeshClient, source: str) -> None:
    assert page.headings[0] in ("Evaluation: PROMOTE", "Evaluation: RETRAIN")
    assert page.headings[1] == "What ran"  # right after the decision and its metrics
    stages = page.tables["stages"]
    assert [row[0] for row in stages[1:]] == list(STAGE_ROWS)
    for row in stages[1:-1]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", row[1]), row
        # computed at, and by which run: the first producer's run id, from the artifact's manifest
        assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d{re.escape(client.run_id)}", row[2]), row
        assert re.fullmatch(r"\d+ ms|\d+\.\d s|\d+ min \d+ s", row[3]), row  # took
    facts = {row[0]: row[1] for row in page.tables["facts"]}
    assert "names no run" in facts["produced"]
    assert re.search(r"The newest input was computed at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", facts["produced"])
    assert source in facts["dataset"] and "rows" in facts["dataset"]


# ---- classification -----------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_binary_report_shows_what_ran_curves_and_per_class_metrics(
    client: MeshClient, settings: Settings
) -> None:
    run = await client.run_pipeline(
        PipelineConfig(
            source=BINARY_SOURCE, minimums={"accuracy": 0.5}, model="logistic_regression", hyperparameters={"C": "0.5"}
        )
    )
    model, x, y, report, html = stored(settings, run)
    page = Page(html)
    check_what_ran(page, client, BINARY_SOURCE)
    facts = {row[0]: row[1] for row in page.tables["facts"]}
    assert "LogisticRegression" in facts["model"] and "C=0.5" in facts["model"] and "max_iter=1000" in facts["model"]
    assert "400 rows × 9 columns" in facts["dataset"] and "80 test rows × 8 model inputs" in facts["dataset"]
    # The report names no run of its own: only the runs that produced its inputs, from their manifests
    # (first producer wins), so a recomputation in another run is byte-identical.
    assert "produced_by" not in report["provenance"]
    assert report["provenance"]["stages"]["trainer"]["run_id"] == client.run_id
    assert report["provenance"]["stages"]["loader"]["params"]["source"] == BINARY_SOURCE
    assert report["model"]["hyperparameters"]["C"] == 0.5

    assert {"roc", "precision-recall", "calibration", "importance-chart"} <= set(page.svgs)
    for heading in (
        "ROC curve",
        "Precision-recall curve",
        "Calibration",
        "Confusion matrix",
        "Per class",
        "Most important inputs",
    ):
        assert heading in page.headings, heading
    proba = model.predict_proba(x)[:, 1]
    positive = model.classes_[1]
    auc = metrics.roc_auc_score(y == positive, proba)
    ap = metrics.average_precision_score(y == positive, proba)
    [roc_legend, pr_legend, calibration_legend] = page.legends
    names = list(run.preprocess.class_names)
    assert roc_legend == [f"{names[1]} AUC {auc:.3f}"]
    assert pr_legend == [f"{names[1]} AP {ap:.3f}"]
    assert calibration_legend == [f"positive class: {names[1]}"]
    assert report["roc_curves"][0]["auc"] == pytest.approx(auc)
    assert report["pr_curves"][0]["average_precision"] == pytest.approx(ap)
    assert report["calibration"]["kind"] == "positive class"
    assert sum(b["count"] for b in report["calibration"]["bins"]) == len(y)
    check_per_class_table(page, model, x, y, names)
    # Feature names label the importance bars.
    assert any(name in page.all_text for name in run.features.feature_names)


def check_per_class_table(page: Page, model, x, y, names: list[str]) -> None:
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y, model.predict(x), labels=model.classes_, zero_division=0
    )
    rows = page.tables["per-class"]
    assert rows[0] == ["class", "precision", "recall", "f1", "support"]
    expected = [
        [names[int(label)], f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", f"{s:,}"]
        for label, p, r, f, s in zip(model.classes_, precision, recall, f1, support, strict=True)
    ]
    assert rows[1:] == expected


@pytest.mark.asyncio
async def test_multiclass_report_names_every_class(client: MeshClient, settings: Settings) -> None:
    run = await client.run_pipeline(PipelineConfig(source="sklearn:iris"))
    model, x, y, report, html = stored(settings, run)
    page = Page(html)
    check_what_ran(page, client, "sklearn:iris")
    names = ["setosa", "versicolor", "virginica"]
    assert list(run.preprocess.class_names) == names
    proba = model.predict_proba(x)
    roc_legend, pr_legend, calibration_legend = page.legends
    for index, name in enumerate(names):
        positives = y == model.classes_[index]
        fpr, tpr, _ = metrics.roc_curve(positives, proba[:, index])
        assert roc_legend[index] == f"{name} AUC {metrics.auc(fpr, tpr):.3f}"
        assert pr_legend[index] == f"{name} AP {metrics.average_precision_score(positives, proba[:, index]):.3f}"
    assert calibration_legend[0].startswith("top class")
    assert report["calibration"]["kind"] == "top class"
    check_per_class_table(page, model, x, y, names)
    assert page.tables["confusion-matrix"][0] == ["", *names]
    assert [row["class"] for row in report["per_class"]] == [0, 1, 2]


# ---- regression -----------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_regression_report_shows_residuals_and_permutation_importance(
    client: MeshClient, settings: Settings
) -> None:
    # Gradient boosting has neither feature_importances_ nor coef_: permutation importance it is.
    run = await client.run_pipeline(PipelineConfig(source="sklearn:diabetes", model="hist_gradient_boosting"))
    model, x, y, report, html = stored(settings, run)
    page = Page(html)
    check_what_ran(page, client, "sklearn:diabetes")
    assert {"predicted-vs-true", "residuals", "residual-histogram", "importance-chart"} <= set(page.svgs)
    for heading in ("Predicted vs true", "Residuals vs predicted", "Error distribution"):
        assert heading in page.headings
    assert "HistGradientBoostingRegressor" in {row[0]: row[1] for row in page.tables["facts"]}["model"]
    assert report["importances"]["kind"].startswith("permutation importance: mean drop in r2 over 3 shuffles")
    names = [name for name, _ in report["importances"]["values"]]
    assert set(names) <= set(run.features.feature_names) and len(names) == len(run.features.feature_names)
    assert all(name in page.all_text for name in names)
    residuals = y - model.predict(x)
    histogram = report["residuals"]["histogram"]
    assert sum(histogram["counts"]) == len(y)
    assert histogram["edges"][0] == pytest.approx(residuals.min()) and histogram["edges"][-1] == pytest.approx(
        residuals.max()
    )
    assert report["residuals"]["mean"] == pytest.approx(residuals.mean())
    # The same request again: the memo answers, with the same report naming the same run.
    again = await client.evaluate(
        evaluate_request(
            run,
            profile=run.load.profile,
            split_report=run.preprocess.split_report,
            feature_schema=run.features.feature_schema,
        )
    )
    assert again.stage.cache_hit and again.html_report.sha256 == run.evaluate.html_report.sha256


def chart(html: str, css_class: str) -> str:
    """The page's <svg class="css_class"> chart, whole."""
    found = re.findall(rf'<svg class="{css_class}"[^>]*>.*?</svg>', html, re.S)
    assert len(found) == 1, f"{len(found)} {css_class} charts on the page"
    return found[0]


def dots(svg: str) -> np.ndarray:
    """The (x, y) pixel position of every point a scatter chart draws (one `M x yh0` each)."""
    return np.array([(float(x), float(y)) for x, y in re.findall(r"M(-?[\d.]+) (-?[\d.]+)h0", svg)])


def assert_plots(pixels: np.ndarray, values: np.ndarray, what: str, upwards: bool = False) -> None:
    """`pixels` place `values` on a linear axis, point by point, to the 0.1 px the SVG is written in.
    Pixel y grows downwards, so a value axis drawn upwards has a negative slope."""
    slope, intercept = np.polyfit(values, pixels, 1)
    assert (slope < 0) == upwards, f"{what}: slope {slope}"
    worst = np.abs(slope * values + intercept - pixels).max()
    assert worst <= 0.1, f"{what}: a point is {worst:.2f} px off the line through the others"


@pytest.mark.asyncio
async def test_regression_page_plots_this_models_predictions_residuals_and_errors(
    client: MeshClient, settings: Settings
) -> None:
    """Each regression chart holds the numbers of the stored model on the stored test split: one dot
    per test row at (true, predicted) and (predicted, residual), the histogram's bars and the error
    summary from the same residuals, the metrics as scikit-learn computes them."""
    run = await client.run_pipeline(PipelineConfig(source="sklearn:diabetes", model="ridge"))
    model, x, y, report, html = stored(settings, run)
    predicted = model.predict(x)
    residuals = y - predicted
    page = Page(html)
    assert report["task_kind"] == "regression"
    for heading in ("Predicted vs true", "Residuals vs predicted", "Error distribution"):
        assert heading in page.headings
    assert not {"roc", "precision-recall", "calibration"} & set(page.svgs), "classification charts on a regression page"

    # Predicted vs true: a dot per test row, x from the true value, y from the prediction.
    scatter = dots(chart(html, "predicted-vs-true"))
    assert len(scatter) == len(y) == report["test_rows"] > 50
    assert_plots(scatter[:, 0], y, "predicted-vs-true x")
    assert_plots(scatter[:, 1], predicted, "predicted-vs-true y", upwards=True)

    # Residuals vs predicted: the same rows, x from the prediction, y from true - predicted.
    spread = dots(chart(html, "residuals"))
    assert len(spread) == len(y)
    assert_plots(spread[:, 0], predicted, "residuals x")
    assert_plots(spread[:, 1], residuals, "residuals y", upwards=True)

    # Error distribution: the bars are numpy's histogram of these residuals, the caption their summary.
    bars = re.findall(r"<title>(\d+) rows from (\S+) to (\S+)</title>", chart(html, "residual-histogram"))
    counts = [int(count) for count, _, _ in bars]
    assert counts == np.histogram(residuals, bins=len(counts))[0].tolist() and sum(counts) == len(y)
    assert float(bars[0][1]) == pytest.approx(residuals.min(), rel=1e-3)
    assert float(bars[-1][2]) == pytest.approx(residuals.max(), rel=1e-3)
    caption = re.search(rf"all {len(y)} test rows; (mean .*?)</", html)
    assert caption, "the error distribution's caption"
    shown = {name: float(value) for name, value in re.findall(r"(mean|std|p05|p50|p95) (\S+?)(?:,|$)", caption[1])}
    expected = {
        "mean": residuals.mean(),
        "std": residuals.std(),
        **{f"p{q:02d}": np.percentile(residuals, q) for q in (5, 50, 95)},
    }
    assert shown.keys() == expected.keys()
    for name, value in expected.items():
        assert shown[name] == pytest.approx(value, rel=1e-3, abs=1e-3), name

    # The metrics table and cards: scikit-learn's numbers for these predictions.
    table = {row[0]: float(row[1]) for row in page.tables["metrics"][1:]}
    assert table == pytest.approx(
        {
            "r2": metrics.r2_score(y, predicted),
            "mae": metrics.mean_absolute_error(y, predicted),
            "rmse": float(np.sqrt(metrics.mean_squared_error(y, predicted))),
        },
        abs=1e-4,
    )
    assert table["rmse"] > table["mae"] > 0 and 0 < table["r2"] < 1


def test_permutation_importance_is_bounded_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50_000, 4))
    y = (x[:, 0] + 0.1 * rng.normal(size=len(x)) > 0).astype(np.int64)

    class Calls(LogisticRegression):  # counts the rows predicted
        rows = 0

        def predict(self, data):
            Calls.rows += len(data)
            return super().predict(data)

    model = Calls().fit(x, y)
    first = logic._permutation_importances(model, TaskKind.of_model(model), None, x, y)
    assert Calls.rows == logic.PERMUTATION_ROWS * (1 + 4 * logic.PERMUTATION_REPEATS)
    assert first == logic._permutation_importances(model, TaskKind.of_model(model), None, x, y)
    assert first[1][0][0] == "x0" and first[1][0][1] > 0.3


# ---- hostile inputs: a report, never INTERNAL ------------------------------------------------------
@pytest.mark.asyncio
async def test_report_edge_cases_never_fail(client: MeshClient, settings: Settings) -> None:
    store = ArtifactStore(settings.artifact_root)
    run = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE, minimums={"accuracy": 0.5}))
    _model, x, y, _, _ = stored(settings, run)

    # A test split of one class: no ROC or PR curve, a calibration curve and a per-class table still.
    single = await client.evaluate(evaluate_request(run, y_test=store.put(array_to_npy(np.zeros_like(y)), NPY)))
    _, _, _, report, html = stored(settings, run, single)
    assert report["roc_curves"] == [] and report["pr_curves"] == [] and report["calibration"]["bins"]
    page = Page(html)
    assert "roc" not in page.svgs and "calibration" in page.svgs and len(page.tables["per-class"]) == 3
    assert "the test split holds a single class, so roc_auc is undefined" in page.all_text

    # Constant predictions: every test row the same.
    same = np.repeat(x.to_numpy()[:1], len(y), axis=0)
    constant = await client.evaluate(evaluate_request(run, x_test=store.put(array_to_npy(same), NPY)))
    _, _, _, report, html = stored(settings, run, constant)
    assert len(report["calibration"]["bins"]) == 1 and report["roc_curves"][0]["auc"] == pytest.approx(0.5)
    assert {"roc", "precision-recall", "calibration"} <= set(Page(html).svgs)
    # x_test was put by hand: its lineage is unknown, the model's still shows.
    assert [row[0] for row in Page(html).tables["stages"][1:]] == list(STAGE_ROWS)


@pytest.mark.asyncio
async def test_regression_edge_cases_never_fail(client: MeshClient, settings: Settings) -> None:
    store = ArtifactStore(settings.artifact_root)
    run = await client.run_pipeline(PipelineConfig(source="sklearn:diabetes", model="ridge"))
    model, x, y, _, _ = stored(settings, run)
    # Zero-variance residuals: every test row the same, every target its prediction plus one.
    same = np.repeat(x.to_numpy()[:1], len(y), axis=0)
    shifted = np.full(len(y), float(model.predict(x.iloc[:1])[0]) + 1.0)
    reply = await client.evaluate(
        evaluate_request(run, x_test=store.put(array_to_npy(same), NPY), y_test=store.put(array_to_npy(shifted), NPY))
    )
    _, _, _, report, html = stored(settings, run, reply)
    assert reply.metrics["mae"] == pytest.approx(1.0) and report["residuals"]["std"] < 1e-9
    assert "r2" in reply.metrics  # constant targets: scikit-learn's finite r2
    assert sum(report["residuals"]["histogram"]["counts"]) == len(y)
    assert {"predicted-vs-true", "residuals", "residual-histogram"} <= set(Page(html).svgs)
    # One test row: r2 is undefined, so not reported, and the default r2 gate is not met.
    one_x, one_y = store.put(array_to_npy(x.to_numpy()[:1]), NPY), store.put(array_to_npy(y[:1]), NPY)
    reply = await client.evaluate(evaluate_request(run, x_test=one_x, y_test=one_y))
    assert reply.decision == RETRAIN and "r2" not in reply.metrics and "mae" in reply.metrics
    _, _, _, report, html = stored(settings, run, reply)
    assert "r2 is undefined for a test split with fewer than two rows" in Page(html).all_text
    assert sum(report["residuals"]["histogram"]["counts"]) == 1


@pytest.mark.asyncio
async def test_two_hundred_classes_keep_the_report_small(client: MeshClient, settings: Settings) -> None:
    source = "synthetic:classification?rows=6000&features=12&classes=200&seed=1"
    run = await client.run_pipeline(
        PipelineConfig(
            source=source,
            model="random_forest",
            hyperparameters={"n_estimators": "10", "max_depth": "6"},
            minimums={"accuracy": 0.0},
        )
    )
    model, _x, _y, report, html = stored(settings, run)
    assert len(model.classes_) == 200
    page = Page(html)
    assert len(page.legends[0]) == logic.MAX_CURVE_CLASSES == len(report["roc_curves"]) == len(report["pr_curves"])
    assert len(report["per_class"]) == 200 and len(page.tables["per-class"]) == 1 + 50
    assert len(page.tables["confusion-matrix"]) == 1 + 30
    assert "the most frequent 10 of 200 classes" in page.all_text or "10 most frequent of 200 classes" in page.all_text
    assert len(html) < 400_000, len(html)


@pytest.mark.asyncio
async def test_hostile_manifests_are_escaped_or_left_out(client: MeshClient, settings: Settings) -> None:
    store = ArtifactStore(settings.artifact_root)
    run = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE, minimums={"accuracy": 0.5}))
    evil = "<script>alert(1)</script>"
    # The trainer's manifest rewritten with markup, odd types and huge text; the loader's removed.
    store.write_doc(
        ("manifests", f"{run.train.model.sha256}.json"),
        {
            "stage": "trainer",
            "stage_version": evil,
            "created_at": evil,
            "duration_seconds": "NaN",
            "params": {"model": evil * 1000, evil: [evil], "n": float("inf")},
            "inputs": {"x_train": {"sha256": run.features.x_train.sha256}},
        },
    )
    for ref in (run.load.dataset, run.load.profile, run.load.schema):
        store.remove(("manifests", f"{ref.sha256}.json"))
    reply = await client.evaluate(evaluate_request(run, force_recompute=True, minimums={"accuracy": 0.5}))
    _, _, _, report, html = stored(settings, run, reply)
    assert "<script" not in html and "&lt;script&gt;" in html
    assert len(html) < 200_000
    page = Page(html)
    assert [row[0] for row in page.tables["stages"][1:]] == ["preprocess", "features", "trainer", "evaluator"]
    assert "no manifest found for loader" in page.all_text
    assert all(len(str(v)) <= 210 for v in report["provenance"]["stages"]["trainer"]["params"].values())


@pytest.mark.asyncio
async def test_a_recomputation_in_another_run_makes_the_same_bytes(client: MeshClient, settings: Settings) -> None:
    run = await client.run_pipeline(PipelineConfig(source="sklearn:iris"))
    request = evaluate_request(
        run,
        profile=run.load.profile,
        split_report=run.preprocess.split_report,
        feature_schema=run.features.feature_schema,
        force_recompute=True,
    )
    async with MeshClient(settings, addresses=client.addresses, run_id="run-20300101T000000-abcdef") as other:
        again = await other.evaluate(request)
    assert not again.stage.cache_hit
    assert again.html_report.sha256 == run.evaluate.html_report.sha256
    assert again.metrics_report.sha256 == run.evaluate.metrics_report.sha256


# ---- size at scale --------------------------------------------------------------------------------
def test_report_for_a_200k_row_split_stays_under_a_megabyte() -> None:
    from services.runtime.formats import to_json_bytes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200_000, 6))
    y = np.argmax(x[:, :3] + rng.normal(scale=1.5, size=(len(x), 3)), axis=1).astype(np.int64)
    model = LogisticRegression(max_iter=200).fit(x[:5000], y[:5000])
    evaluation = logic.evaluate(model, x, y)
    assert all(len(c["fpr"]) <= logic.MAX_CURVE_POINTS for c in evaluation.roc_curves)
    assert all(len(c["recall"]) <= logic.MAX_CURVE_POINTS for c in evaluation.pr_curves)
    no_thresholds: dict[str, dict[str, float]] = {"minimums": {}, "maximums": {}}
    report = logic.report_document(evaluation, Decision.RETRAIN, [], no_thresholds, ["a", "b", "c"])
    assert len(to_json_bytes(report)) < 1_000_000 and len(render_html(report).encode()) < 1_000_000

    regression_y = x @ np.arange(6.0) + rng.normal(size=len(x))
    from sklearn.linear_model import Ridge

    evaluation = logic.evaluate(Ridge().fit(x[:5000], regression_y[:5000]), x, regression_y)
    report = logic.report_document(evaluation, Decision.RETRAIN, [], no_thresholds, [])
    assert len(to_json_bytes(report)) < 1_000_000 and len(render_html(report).encode()) < 1_000_000


# ---- the Flyte deck wrapper -------------------------------------------------------------------------
def test_deck_html_wraps_the_page_in_a_sandboxed_iframe() -> None:
    page = '<!DOCTYPE html><html><body><p class="x">"quoted" & <b>bold</b> \'single\'</p></body></html>'
    deck = deck_html(page)
    assert deck.startswith("<iframe") and deck.endswith("</iframe>") and deck.count("<") == 2
    parsed = Page(deck)
    [frame] = parsed.iframes
    assert frame["srcdoc"] == page  # the attribute, once unescaped, is the page itself
    assert frame["sandbox"] == ""  # no scripts, forms, popups, same origin or top navigation
    assert "width:100%" in (frame["style"] or "") and re.search(r"height:\d+px", frame["style"] or "")


# ---- rendered in a browser ------------------------------------------------------------------------
def png_pixels(data: bytes) -> np.ndarray:
    """An 8-bit RGB(A), non-interlaced PNG (what Chromium writes) as an array of pixels, with zlib and numpy."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks, header = 8, [], None
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        offset += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), dtype=np.uint8).reshape(height, 1 + width * channels)
    stride = width * channels
    out = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.int32)
    for row in range(height):
        kind, line = raw[row, 0], raw[row, 1:].astype(np.int32)
        if kind == 0:
            current = line
        elif kind == 2:
            current = (line + previous) & 0xFF
        elif kind == 1:  # Sub: a running sum per channel
            current = (np.cumsum(line.reshape(width, channels), axis=0) & 0xFF).reshape(stride)
        else:  # Average or Paeth: each byte needs the one before it
            current = np.zeros(stride, dtype=np.int32)
            values, above = line.tolist(), previous.tolist()
            result = [0] * stride
            for i in range(stride):
                left = result[i - channels] if i >= channels else 0
                if kind == 3:
                    result[i] = (values[i] + ((left + above[i]) >> 1)) & 0xFF
                else:
                    upper_left = above[i - channels] if i >= channels else 0
                    p = left + above[i] - upper_left
                    pa, pb, pc = abs(p - left), abs(p - above[i]), abs(p - upper_left)
                    guess = left if pa <= pb and pa <= pc else above[i] if pb <= pc else upper_left
                    result[i] = (values[i] + guess) & 0xFF
            current = np.array(result, dtype=np.int32)
        out[row] = current
        previous = current
    return out.reshape(height, width, channels)[:, :, :3]


@pytest.mark.asyncio
@pytest.mark.network  # Debian's chromium packages, apt-get download when not cached
async def test_screenshot_of_the_report_is_not_blank(client: MeshClient, settings: Settings, tmp_path: Path) -> None:
    browser = chromium()  # skips with the reason, or fails under CI=true, when it cannot be had
    keep = os.environ.get("MLMESH_REPORT_SCREENSHOTS")
    runs = {
        "classification": PipelineConfig(source="sklearn:breast_cancer"),
        "regression": PipelineConfig(source="sklearn:diabetes", model="hist_gradient_boosting"),
    }
    for name, config in runs.items():
        run = await client.run_pipeline(config)
        page = tmp_path / f"report-{name}.html"
        page.write_bytes(ArtifactStore(settings.artifact_root).get(run.evaluate.html_report))
        png = tmp_path / f"report-{name}.png"
        started = time.perf_counter()
        shot = browser.screenshot(page, png, 1280, 1900)
        assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
        assert time.perf_counter() - started < 60
        pixels = png_pixels(png.read_bytes())
        assert pixels.shape == (1900, 1280, 3)
        background = np.array([0xF5, 0xF7, 0xFA])  # the page's own grey
        ink = np.abs(pixels.astype(int) - background).sum(axis=2) > 30
        white = (pixels >= 250).all(axis=2)
        colours = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
        # Cards (white), text and charts (ink): a blank or unstyled page has almost none of either.
        assert white.mean() > 0.3, white.mean()
        assert (ink & ~white).mean() > 0.03, (ink & ~white).mean()
        assert colours > 200, colours
        # The decision badge is there, in green (PROMOTE), in the top left.
        badge = pixels[30:70, 40:160].reshape(-1, 3).astype(int)
        assert ((badge[:, 1] - badge[:, 0] > 60) & (badge[:, 1] - badge[:, 2] > 60)).sum() > 200
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, Path(keep) / png.name)
