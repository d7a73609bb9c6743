"""Calibration per monitoring window: predicted vs observed rates once labels are attached.

The heads are calibrated probabilities (:mod:`transact.model.calibration`) and the served
log's ``pred_<head>`` columns hold what the service returned. Labels arrive later (a world's
``requests`` table, the impression/engagement join of a real system); ``transact monitor
--labels`` joins them to the served rows with the one join rule of the project,
:func:`transact.serving.served_log.label_index` (on ``request_id, position``; a key served
twice is labelled on its first copy), and reports per window and head, over the labelled
rows only:

- ``rows``: labelled rows; ``positives``: rows whose label is 1;
- ``mean_predicted`` and ``observed_rate``, their ``difference`` (predicted - observed) and
  ``relative_gap`` = |difference| / observed (the number :class:`~transact.monitoring.drift.DriftRule`'s
  optional ``calibration_gap`` bounds);
- ``ece``: expected calibration error over equal-mass bins
  (:func:`transact.model.calibration.reliability`), ``log_loss``.

Rows without a label yet (``unlabelled_rows``) and later copies of a repeated key
(``repeated_rows``) are counted and left out: an outcome that is unknown is not a 0. A window
none of whose rows has a label says so (``note``) instead of reporting numbers.

These are calibration numbers, not drift scores: they enter the drift decision only when the
rule's ``calibration_gap`` is set (off by default, see :class:`~transact.monitoring.drift.DriftRule`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

#: the frame column saying how a served row joined its labels (:data:`LABELLED`, ...)
STATE = "label_state"
LABELLED, UNLABELLED, REPEATED = 1, 0, -1
#: a window whose rows carry no label at all
NO_LABELS = "no labels for this window"


def label_column(head: str) -> str:
    """The label column of a head (``label_click`` for ``click``)."""
    return f"label_{head}"


def read_labels(path: str | Path) -> pa.Table:
    """The labelled requests at a local ``path``: a world folder (its ``requests.parquet``)
    or a requests parquet file; only the join key and the label columns are read."""
    from transact.data import schema as S
    from transact.data.io import read_table, table_path

    path = Path(path)
    file = table_path(path, "requests") if path.is_dir() else path
    columns = ("request_id", "position", "user_id", "item_id", *S.LABEL_COLUMNS)
    return read_table(file, S.REQUESTS, columns=columns, what=f"labels {file}")


def label_frame(served: pa.Table, requests: pa.Table) -> pd.DataFrame:
    """One row per served row (same order): :data:`STATE` and every ``label_*`` column of the
    requests (float, NaN where the row has no label), by :func:`~transact.serving.served_log.label_index`."""
    from transact.data.io import SchemaError
    from transact.data.schema import LABEL_COLUMNS
    from transact.serving.served_log import REPEATED as REPEAT_ROW, label_index

    missing = [c for c in ("served_ts", "model_version", "score") if c not in served.column_names]
    if missing:  # the first-copy rule needs them: NN-feature rows are not a served log
        raise SchemaError(f"labels can only be joined to a served log (no {', '.join(missing)} column)")
    index = label_index(served, requests)
    joined = index >= 0
    out = {STATE: np.where(joined, LABELLED, np.where(index == REPEAT_ROW, REPEATED, UNLABELLED)).astype(np.int8)}
    for c in LABEL_COLUMNS:
        values = np.full(len(index), np.nan)
        values[joined] = requests.column(c).to_numpy()[index[joined]]
        out[c] = values
    return pd.DataFrame(out)


def head_calibration(y: np.ndarray, p: np.ndarray) -> dict:
    """The numbers of one head over labelled rows (module docstring)."""
    from transact.model.calibration import reliability
    from transact.model.metrics import log_loss

    mean_p, rate = float(p.mean()), float(y.mean())
    diff = mean_p - rate
    gap = abs(diff) / rate if rate > 0 else (math.inf if diff else 0.0)
    return {"rows": int(len(y)), "positives": int(y.sum()), "mean_predicted": mean_p, "observed_rate": rate,
            "difference": diff, "relative_gap": gap, "ece": reliability(y, p)["ece"], "log_loss": log_loss(y, p)}


def window_calibration(rows: pd.DataFrame, heads) -> dict | None:
    """A window's calibration numbers (module docstring); None when no labels were joined
    (the frame has no :data:`STATE` column)."""
    if STATE not in rows.columns:
        return None
    state = rows[STATE].to_numpy()
    labelled = state == LABELLED
    heads_out: dict[str, dict] = {}
    out: dict = {"labelled_rows": int(labelled.sum()), "unlabelled_rows": int((state == UNLABELLED).sum()),
                 "repeated_rows": int((state == REPEATED).sum()), "heads": heads_out}
    if not labelled.any():
        out["note"] = NO_LABELS
        return out
    for h in heads:
        if f"pred_{h}" not in rows.columns or label_column(h) not in rows.columns:
            continue  # a head without predictions or without a label of the same name
        y = rows[label_column(h)].to_numpy(np.float64)[labelled]
        p = rows[f"pred_{h}"].to_numpy(np.float64)[labelled]
        heads_out[h] = head_calibration(y, p)
    return out


def dashboard_values(calibration: dict | None, heads) -> dict[str, float]:
    """The window's predicted and observed rate per head as metric columns for the dashboard
    (``calibration_predicted_<head>``, ``calibration_observed_<head>``; NaN without labels);
    {} when labels were not joined at all."""
    if calibration is None:
        return {}
    per = calibration.get("heads", {})
    out = {}
    for h in heads:
        out[f"calibration_predicted_{h}"] = float(per[h]["mean_predicted"]) if h in per else math.nan
        out[f"calibration_observed_{h}"] = float(per[h]["observed_rate"]) if h in per else math.nan
    return out


def table_rows(calibration: dict) -> list[list[str]]:
    """The report's calibration table: one row per head."""
    return [[h, f"{c['rows']:,}", f"{c['mean_predicted']:.4f}", f"{c['observed_rate']:.4f}",
             f"{c['difference']:+.4f}", f"{c['relative_gap']:.1%}", f"{c['ece']:.4f}", f"{c['log_loss']:.4f}"]
            for h, c in calibration.get("heads", {}).items()]


TABLE_COLUMNS = ["head", "rows labelled", "mean predicted", "observed rate", "difference", "|gap| / observed",
                 "ECE (equal-mass)", "log-loss"]


def summary_line(calibration: dict | None) -> str:
    """One line for the monitor's progress output: ``calibration click 0.210/0.104 ...``."""
    if calibration is None:
        return ""
    if calibration.get("note"):
        return f"calibration: {calibration['note']} ({calibration['unlabelled_rows']} unlabelled)"
    per = " ".join(f"{h} {c['mean_predicted']:.3f}/{c['observed_rate']:.3f}"
                   for h, c in calibration["heads"].items())
    return f"calibration (pred/obs, {calibration['labelled_rows']} labelled): {per}"
