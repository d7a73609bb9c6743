"""One monitoring window: an Evidently report against the reference, and the drift rule.

The report (Evidently 0.7 API) holds, for a window of served rows against the
training reference (both as :func:`transact.monitoring.features.features_frame`):

- ``DataDriftPreset`` over the scalar features (sequence lengths, action mix, token
  surfaces, recency, history match, request surface): one ``ValueDrift`` per column and
  ``DriftedColumnsCount`` {count, share};
- ``EmbeddingsDrift`` for the candidate embedding (``cand_0..31``) and the mean sequence
  embedding (``seq_0..31``), declared as embeddings in the ``DataDefinition`` (Evidently
  ignores array cells and its preset does not add embedding drift by itself);
- ``ValueDrift`` of each head's predicted probability (prediction drift) and
  ``MeanValue`` of each head's prediction (for the dashboard), ``RowCount``.

The drift rule (:class:`DriftRule`), decided from the snapshot's values
-----------------------------------------------------------------------
A window *drifts* when at least one of these holds:

1. **scalar share** (Evidently's dataset drift): the share of drifted scalar features
   is >= ``drift_share`` (0.5). A numerical feature drifts when its normed Wasserstein
   distance (W1 / std of the reference) is >= ``num_threshold`` (0.2); the segment
   lengths (near-constant counts, whose normed Wasserstein explodes when the reference
   std is ~0) when their Jensen-Shannon distance is >= ``count_threshold`` (0.2); the
   request surface when its Jensen-Shannon distance is >= ``cat_threshold`` (0.1).
   This is the catch-all for broad changes (a logging bug, a new surface, ...).
2. **history match**: at least ``match_share`` (half) of the candidate-history
   similarity features ``sim_ll_nn, sim_rt_nn, sim_rt_recent, sim_max`` have a normed
   Wasserstein distance >= ``match_threshold`` (0.2): the candidates no longer look
   like what the users engaged with -- what an interest shift or a new item
   distribution does to a sequence model's input. (``sim_imp_nn`` is reported but left
   out: impressions follow what was shown, and the simulator's impression sequences
   grow through the request window, so it moves in stationary windows too.)
3. **embedding**: Evidently's classifier method tells reference rows from window rows
   with ROC AUC > ``embedding_threshold`` (0.65) on the candidate embedding or >
   ``seq_embedding_threshold`` (0.75) on the mean sequence embedding (held-out half).
4. **prediction**: any head's predicted probability has a normed Wasserstein distance
   >= ``pred_threshold`` (0.35) to the reference predictions (the same model on the
   reference rows).
5. **calibration** (off unless ``calibration_gap`` is set; needs labels, ``transact monitor
   --labels``): a head's |mean predicted - observed rate| / observed rate over the window's
   labelled rows is > ``calibration_gap``, judged only for heads with at least
   ``calibration_min_positives`` (50) positive labels (:mod:`transact.monitoring.calibration`).

A window with fewer than ``min_rows`` (200) rows is not judged ("insufficient data").
Distances rather than p-values: with thousands of correlated rows per window (the
candidates of one request share their user's history) p-value tests flag every
harmless wobble. The thresholds were calibrated on simulated worlds with seeds
disjoint from the benchmark's; ``transact bench drift`` measures the detection and
false-alarm rates (figures in docs/monitoring.md).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transact.monitoring.features import (
    CATEGORICAL_COLUMNS,
    EMBEDDINGS,
    NUMERICAL_COLUMNS,
    SCALAR_COLUMNS,
    SEGMENT_COLUMNS,
)

os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")  # Evidently telemetry off

#: Drift methods whose score is a distance (drift when score >= threshold); the others
#: Evidently offers are p-values (drift when score < threshold).
DISTANCE_METHODS = {"wasserstein", "jensenshannon", "psi", "hellinger", "kl_div", "ed"}


@dataclass(frozen=True)
class DriftRule:
    """Thresholds of the drift rule (module docstring)."""

    drift_share: float = 0.5
    num_method: str = "wasserstein"
    num_threshold: float = 0.2
    count_method: str = "jensenshannon"
    count_threshold: float = 0.2
    cat_method: str = "jensenshannon"
    cat_threshold: float = 0.1
    match_columns: tuple = ("sim_ll_nn", "sim_rt_nn", "sim_rt_recent", "sim_max")
    match_threshold: float = 0.2
    match_share: float = 0.5
    embedding_threshold: float = 0.65
    seq_embedding_threshold: float = 0.75
    pred_method: str = "wasserstein"
    pred_threshold: float = 0.35
    min_rows: int = 200
    #: Criterion 5, the calibration gap: None (the default) = reported, never a drift reason.
    #: A gap between what the calibrated heads predict and what users then did, with the
    #: inputs unchanged, means the outcome rates moved (label shift) or the calibration went
    #: stale; a retrain refits both on the newest rows, so it is a reason to retrain -- but it
    #: is off by default because (1) labels arrive late, so the four input criteria have
    #: usually judged the window before its labels exist, (2) ``transact bench drift``, which
    #: sets the other thresholds' false-alarm rates, has no labelled windows to set this one
    #: on, and (3) a team that ranks by one head only may not want a retrain for another
    #: head's bias. When on, 0.5 is a sensible bound: the relative gap's sampling error is
    #: about 1/sqrt(positives) (0.14 at the 50-positive floor), so 0.5 is > 3 standard errors,
    #: while doubled predictions give a gap of about 1.
    calibration_gap: float | None = None
    #: heads with fewer positive labels in the window are not judged by criterion 5 (noise)
    calibration_min_positives: int = 50

    def to_dict(self) -> dict:
        d = asdict(self)
        d["match_columns"] = list(self.match_columns)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DriftRule:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "match_columns" in kw:
            kw["match_columns"] = tuple(kw["match_columns"])
        return cls(**kw)

    def embedding_limit(self, name: str) -> float:
        return self.seq_embedding_threshold if name == "seq" else self.embedding_threshold

    def column_test(self, column: str) -> tuple[str, float]:
        """(method, threshold) of a scalar feature."""
        if column in CATEGORICAL_COLUMNS:
            return self.cat_method, self.cat_threshold
        if column in SEGMENT_COLUMNS:
            return self.count_method, self.count_threshold
        return self.num_method, self.num_threshold


def _drifted(method: str, score: float, threshold: float) -> bool:
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return False
    return score >= threshold if method in DISTANCE_METHODS else score < threshold


@dataclass
class WindowResult:
    """What one window's report says and what the rule decides."""

    window: str
    start_ts: int
    end_ts: int
    rows: int
    drift: bool
    reasons: list[str]
    scores: dict = field(default_factory=dict)
    report_html: str | None = None
    report_json: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _embedding_plot_points(n: int):
    """Evidently draws the embedding-drift widget from a t-SNE of up to 2,500 rows per side
    (``SAMPLE_CONSTANT``), which costs far more than the drift test itself (tens of seconds
    on 2 cores). The test always uses every row; only the picture is subsampled here."""
    from evidently.legacy.metrics.data_drift import embeddings_drift

    before = embeddings_drift.SAMPLE_CONSTANT
    embeddings_drift.SAMPLE_CONSTANT = max(int(n), 40)  # t-SNE needs more rows than its perplexity (30)
    try:
        yield
    finally:
        embeddings_drift.SAMPLE_CONSTANT = before


def data_definition(heads, scalar=SCALAR_COLUMNS):
    from evidently import DataDefinition

    preds = [f"pred_{h}" for h in heads]
    emb_cols = [c for cols in EMBEDDINGS.values() for c in cols]
    return DataDefinition(numerical_columns=[c for c in scalar if c in NUMERICAL_COLUMNS] + preds + emb_cols,
                          categorical_columns=[c for c in scalar if c in CATEGORICAL_COLUMNS],
                          embeddings={k: list(v) for k, v in EMBEDDINGS.items()})


def build_report(heads, rule: DriftRule, scalar=SCALAR_COLUMNS):
    """The Evidently report of one window (module docstring)."""
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift, MeanValue, RowCount, ValueDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.presets import DataDriftPreset

    metrics = [
        RowCount(),
        DataDriftPreset(columns=list(scalar), drift_share=rule.drift_share,
                        num_method=rule.num_method, num_threshold=rule.num_threshold,
                        cat_method=rule.cat_method, cat_threshold=rule.cat_threshold,
                        per_column_method={c: rule.count_method for c in scalar if c in SEGMENT_COLUMNS},
                        per_column_threshold={c: rule.count_threshold for c in scalar if c in SEGMENT_COLUMNS}),
    ]
    for name in EMBEDDINGS:
        metrics.append(EmbeddingsDrift(embeddings_name=name, drift_method=ModelDriftMethod(
            threshold=rule.embedding_limit(name), bootstrap=False)))
    for h in heads:
        metrics.append(ValueDrift(column=f"pred_{h}", method=rule.pred_method, threshold=rule.pred_threshold))
        metrics.append(MeanValue(column=f"pred_{h}"))
    return Report(metrics)


def scores_from_snapshot(snapshot_dict: dict, heads, rule: DriftRule) -> dict:
    """The rule's inputs, read back from ``snapshot.dict()``."""
    out: dict[str, Any] = {"drift_share": None, "drifted_count": None, "columns": {}, "embeddings": {},
                           "predictions": {}, "prediction_means": {}, "rows": None}
    pred_cols = {f"pred_{h}": h for h in heads}
    for m in snapshot_dict.get("metrics", []):
        cfg, value = m.get("config", {}), m.get("value")
        kind = cfg.get("type", "").rsplit(":", 1)[-1]
        if kind == "DriftedColumnsCount":
            out["drift_share"] = float(value["share"])
            out["drifted_count"] = int(value["count"])
        elif kind == "ValueDrift":
            col = cfg["column"]
            if col in pred_cols:
                out["predictions"][pred_cols[col]] = float(value)
            else:
                out["columns"][col] = float(value)
        elif kind == "EmbeddingsDrift":
            out["embeddings"][cfg["embeddings_name"]] = float(value)
        elif kind == "MeanValue" and cfg.get("column") in pred_cols:
            out["prediction_means"][pred_cols[cfg["column"]]] = float(value)
        elif kind == "RowCount":
            out["rows"] = int(value["count"] if isinstance(value, dict) else value)
    return out


@dataclass(frozen=True)
class Criterion:
    """One clause of the drift rule applied to one window: the numbers it used, the bound
    it holds them to, and whether it fired (``reason``: the decision log's line for it)."""

    name: str  # "scalar share", "history match", "embedding <name>", "prediction <head>", "calibration <head>"
    measured: str
    limit: str
    fired: bool
    reason: str = ""
    value: float = float("nan")  # the number held to the bound (a share, an AUC, a distance)


def criteria(scores: dict, rule: DriftRule) -> list[Criterion]:
    """Every clause of the rule (module docstring) on a window's scores, in the rule's
    order; the window drifts when at least one fired. Clauses without scores (no
    predictions, no usable scalar feature) are left out."""
    out = []
    columns = scores.get("columns", {})
    share = scores.get("drift_share")
    if share is not None:
        cols = sorted(c for c, s in columns.items() if _drifted(*_swap(rule.column_test(c), s)))
        hit = share >= rule.drift_share
        out.append(Criterion(
            "scalar share", f"{share:.0%} of {len(columns)} scalar features drifted ({len(cols)})",
            f"share >= {rule.drift_share:.0%} (numerical: normed Wasserstein >= {rule.num_threshold}, "
            f"counts: Jensen-Shannon >= {rule.count_threshold}, surface: >= {rule.cat_threshold})", hit,
            f"scalar: {share:.0%} of scalar features drifted (>= {rule.drift_share:.0%}): " + ", ".join(cols),
            share))
    match = [c for c in rule.match_columns if c in columns]
    if match:
        hit_cols = [c for c in match if _drifted(rule.num_method, columns[c], rule.match_threshold)]
        fired = len(hit_cols) / len(match) >= rule.match_share
        out.append(Criterion(
            "history match", ", ".join(f"{c} {columns[c]:.3f}" for c in match) + f": {len(hit_cols)}/{len(match)} "
            "drifted", f"at least {rule.match_share:.0%} of them with normed Wasserstein >= {rule.match_threshold}",
            fired, f"history match: {len(hit_cols)}/{len(match)} candidate-history similarity features drifted "
                   f"(>= {rule.match_threshold}): " + ", ".join(f"{c} {columns[c]:.3f}" for c in hit_cols),
            len(hit_cols) / len(match)))
    for name, auc in scores.get("embeddings", {}).items():
        limit = rule.embedding_limit(name)
        out.append(Criterion(f"embedding {name}", f"classifier ROC AUC {auc:.3f}", f"ROC AUC > {limit}", auc > limit,
                             f"embedding: {name} classifier ROC AUC {auc:.3f} > {limit}", auc))
    for head, s in scores.get("predictions", {}).items():
        out.append(Criterion(f"prediction {head}", f"normed Wasserstein {s:.3f}", f"drift score >= {rule.pred_threshold}",
                             _drifted(rule.pred_method, s, rule.pred_threshold),
                             f"prediction: {head} drift score {s:.3f} (>= {rule.pred_threshold})", s))
    if rule.calibration_gap is not None and scores.get("calibration") is not None:
        out += calibration_criteria(scores["calibration"], rule)
    return out


def calibration_criteria(calibration: dict, rule: DriftRule) -> list[Criterion]:
    """Criterion 5 (module docstring) per head of a window's calibration numbers; a window
    without labels, or a head with too few positives, is a row that does not fire."""
    bound = rule.calibration_gap
    limit = f"|predicted - observed| / observed > {bound:.0%} (at least {rule.calibration_min_positives} positives)"
    if calibration.get("note"):
        return [Criterion("calibration", f"{calibration['note']} ({calibration['unlabelled_rows']:,} rows "
                          "unlabelled)", limit, False)]
    out = []
    for head, c in calibration.get("heads", {}).items():
        measured = (f"predicted {c['mean_predicted']:.4f} vs observed {c['observed_rate']:.4f} on "
                    f"{c['rows']:,} labelled rows: gap {c['relative_gap']:.0%}")
        if c["positives"] < rule.calibration_min_positives:
            out.append(Criterion(f"calibration {head}", f"{measured}; {c['positives']} positives: not judged",
                                 limit, False, value=c["relative_gap"]))
            continue
        fired = c["relative_gap"] > bound
        out.append(Criterion(f"calibration {head}", measured, limit, fired,
                             f"calibration: {head} predicted {c['mean_predicted']:.4f} vs observed "
                             f"{c['observed_rate']:.4f}, gap {c['relative_gap']:.0%} (> {bound:.0%})",
                             c["relative_gap"]))
    return out


def decide(scores: dict, rule: DriftRule, rows: int) -> tuple[bool, list[str]]:
    """Applies the drift rule to the scores; returns (drift, reasons): the reasons of the
    :func:`criteria` that fired."""
    if rows < rule.min_rows:
        return False, [f"insufficient data: {rows} rows < min_rows {rule.min_rows}"]
    reasons = [c.reason for c in criteria(scores, rule) if c.fired]
    return bool(reasons), reasons


def _swap(test: tuple[str, float], score: float) -> tuple[str, float, float]:
    return test[0], score, test[1]


def usable_columns(reference: pd.DataFrame, current: pd.DataFrame, columns) -> list[str]:
    """Columns with at least one value on both sides (Evidently refuses an empty column)."""
    return [c for c in columns if reference[c].notna().any() and current[c].notna().any()]


def _clean(col: pd.Series) -> pd.Series:
    return col.replace([-np.inf, np.inf], np.nan).dropna()


def compute_scores(reference: pd.DataFrame, current: pd.DataFrame, heads, rule: DriftRule) -> dict:
    """The rule's inputs computed with the same Evidently stattests and embedding-drift
    method the report runs, without building the report (no widgets): the benchmark's
    path. ``tests/monitoring/test_monitoring.py`` checks that it agrees with the report."""
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType
    from evidently.metrics.embeddings import ModelDriftMethod

    scalar = usable_columns(reference, current, SCALAR_COLUMNS)
    out: dict[str, Any] = {"drift_share": None, "drifted_count": None, "columns": {}, "embeddings": {},
                           "predictions": {}, "prediction_means": {}, "rows": len(current)}

    def one(col: str, method: str, threshold: float, ctype) -> tuple[float, bool]:
        ref, cur = _clean(reference[col]), _clean(current[col])
        test = get_stattest(ref, cur, ctype, method)
        r = test(ref, cur, ctype, threshold)
        return float(r.drift_score), bool(r.drifted)

    drifted = 0
    for c in scalar:
        method, threshold = rule.column_test(c)
        score, hit = one(c, method, threshold,
                         ColumnType.Categorical if c in CATEGORICAL_COLUMNS else ColumnType.Numerical)
        out["columns"][c] = score
        drifted += hit
    if scalar:
        out["drifted_count"] = drifted
        out["drift_share"] = drifted / len(scalar)
    for name, cols in EMBEDDINGS.items():
        method = ModelDriftMethod(threshold=rule.embedding_limit(name), bootstrap=False)
        out["embeddings"][name] = float(method(current[cols].copy(), reference[cols].copy())[0])
    for h in heads:
        col = f"pred_{h}"
        out["predictions"][h] = one(col, rule.pred_method, rule.pred_threshold, ColumnType.Numerical)[0]
        out["prediction_means"][h] = float(current[col].mean())
    return out


def analyze_window(reference: pd.DataFrame, current: pd.DataFrame, heads, rule: DriftRule | None = None, *,
                   window: str = "window", start_ts: int | None = None, end_ts: int | None = None,
                   report: bool = True, plot_points: int = 300, html: str | Path | None = None,
                   json_path: str | Path | None = None, threads: int | None = 1):
    """Scores one window against the reference and applies the rule.

    Args:
        reference, current: monitoring frames; ``heads`` whose ``pred_<head>`` columns both
            hold are checked for prediction drift (pass ``[]`` to leave it out).
        report: build the Evidently report (snapshot, HTML); False computes the same scores
            with the same Evidently tests without widgets (:func:`compute_scores`).
        plot_points: rows per side in the embedding-drift picture (not the test).
        html, json_path: where to save the report.
        threads: BLAS/OpenMP threads while the report runs (t-SNE oversubscribes a busy machine).
    Returns:
        (snapshot or None, :class:`WindowResult`)
    """
    from threadpoolctl import threadpool_limits

    from transact.monitoring.calibration import window_calibration

    rule = rule or DriftRule()
    # calibration needs only the window's own predictions and labels, not the reference's
    calibration = window_calibration(current, [h for h in heads if f"pred_{h}" in current.columns])
    heads = [h for h in heads if f"pred_{h}" in reference.columns and f"pred_{h}" in current.columns]
    ts = current["ts"].to_numpy()
    if start_ts is None:
        start_ts = int(ts.min()) if len(ts) else 0
    if end_ts is None:
        end_ts = int(ts.max()) + 1 if len(ts) else 0
    n = len(current)
    if n < max(rule.min_rows, 2) or len(reference) < 2:
        reasons = ([f"insufficient data: {n} rows < min_rows {rule.min_rows}"] if n < max(rule.min_rows, 2)
                   else [f"insufficient data: {len(reference)} reference rows"])
        early: dict = {"rows": n, "reference_rows": len(reference)}
        if calibration is not None:  # not judged for drift, but its labels are still worth reporting
            early["calibration"] = calibration
        return None, WindowResult(window, int(start_ts), int(end_ts), n, False, reasons, early)
    limits = threadpool_limits(threads) if threads else contextlib.nullcontext()
    snapshot = None
    with limits, np.errstate(all="ignore"):
        if report:
            snapshot = _run_report(reference, current, heads, rule, window, int(start_ts), int(end_ts), plot_points)
            scores = scores_from_snapshot(snapshot.dict(), heads, rule)
        else:
            scores = compute_scores(reference, current, heads, rule)
    scores["rows"] = n
    scores["reference_rows"] = len(reference)
    if calibration is not None:
        scores["calibration"] = calibration
    drift, reasons = decide(scores, rule, n)
    result = WindowResult(window, int(start_ts), int(end_ts), n, drift, reasons, scores)
    if snapshot is not None:  # one verdict: the monitor's, before Evidently's own (monitoring/verdict.py)
        from transact.monitoring.verdict import put_decision_first

        put_decision_first(snapshot, result, rule)
    if snapshot is not None and html:
        snapshot.save_html(str(html))
        result.report_html = str(html)
    if snapshot is not None and json_path:
        snapshot.save_json(str(json_path))
        result.report_json = str(json_path)
    return snapshot, result


def _run_report(reference, current, heads, rule, window, start_ts, end_ts, plot_points):
    from evidently import Dataset

    scalar = usable_columns(reference, current, SCALAR_COLUMNS)
    definition = data_definition(heads, scalar)
    cols = scalar + [c for v in EMBEDDINGS.values() for c in v] + [f"pred_{h}" for h in heads]
    ref_ds = Dataset.from_pandas(reference[cols].reset_index(drop=True), data_definition=definition)
    cur_ds = Dataset.from_pandas(current[cols].reset_index(drop=True), data_definition=definition)
    stamp = datetime.fromtimestamp(end_ts / 1000, tz=UTC).replace(tzinfo=None)
    with _embedding_plot_points(plot_points):
        return build_report(heads, rule, scalar).run(
            cur_ds, ref_ds, timestamp=stamp, name=window,
            metadata={"window": window, "start_ts": str(start_ts), "end_ts": str(end_ts)})


def split_windows(frame: pd.DataFrame, window_hours: float) -> list[tuple[str, int, int, pd.DataFrame]]:
    """Epoch-aligned windows of ``window_hours`` over the ``ts`` column (ms):
    [(name, start_ts, end_ts, rows)], oldest first, empty windows left out. The name is the
    window's UTC start, e.g. ``2024-08-25T00:00Z``."""
    w = int(round(window_hours * 3_600_000))
    if w <= 0:
        raise ValueError("window_hours must be > 0")
    ts = frame["ts"].to_numpy().astype(np.int64)
    idx = ts // w
    out = []
    for k in np.unique(idx):
        start = int(k) * w
        name = datetime.fromtimestamp(start / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%MZ")
        out.append((name, start, start + w, frame[idx == k]))
    return out
