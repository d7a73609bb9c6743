"""Calibration per monitoring window once labels are attached (issue 26, item 1).

The heads are calibrated probabilities; with labels (``transact monitor --labels``) each
window reports, per head, the rows labelled, mean predicted probability, observed rate,
their difference, ECE (equal-mass bins) and log-loss -- in its decision record, its report
(a calibration table after the monitor's rule) and the dashboard. The gap is a drift
criterion only when ``DriftRule.calibration_gap`` is set. Hand-made frames: a window whose
labels are drawn from its predictions (calibrated) and one whose predictions are twice the
probability its labels are drawn from (the inputs and the predictions themselves do not move,
so only the calibration criterion can see it); a hand-made served log for the join and the
command (labels from the session's S3 server).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import monitoring_columns
from transact.monitoring.calibration import LABELLED, REPEATED, STATE, UNLABELLED, label_frame, window_calibration
from transact.monitoring.drift import DriftRule, analyze_window

HEADS = ["click", "repin", "hide"]
T0 = 1_724_544_000_000
DAY = 86_400_000


def frame(n: int, seed: int, t0: int = T0, scale: float | None = None) -> pd.DataFrame:
    """A monitoring frame drawn like the reference; with ``scale``, labels joined (the
    :data:`STATE` and ``label_*`` columns): each head's label ~ Bernoulli(pred / scale) --
    1 = calibrated, 2 = predictions twice the true probability."""
    cols, rng = monitoring_columns(n, seed, t0, (3, 9), HEADS)  # predictions' mean 0.25: enough positives a window
    if scale is not None:
        cols[STATE] = np.full(n, LABELLED, np.int8)
        for h in HEADS:
            cols[f"label_{h}"] = (rng.random(n) < cols[f"pred_{h}"] / scale).astype(np.float64)
    return pd.DataFrame(cols)


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return frame(800, seed=0)


def test_calibrated_window_shows_a_small_gap_doubled_predictions_a_large_one():
    from transact.model.metrics import log_loss

    calibrated = window_calibration(frame(2000, seed=1, scale=1.0), HEADS)
    rows = frame(2000, seed=2, scale=2.0)
    doubled = window_calibration(rows, HEADS)
    for h in HEADS:
        c, d = calibrated["heads"][h], doubled["heads"][h]
        assert c["rows"] == d["rows"] == 2000
        assert c["relative_gap"] < 0.1 and c["ece"] < 0.03, c
        assert d["relative_gap"] == pytest.approx(1.0, abs=0.2), d  # predicted twice what happens
        assert d["difference"] == pytest.approx(d["mean_predicted"] - d["observed_rate"])
        assert d["ece"] > 0.08, d
        # the doubled predictions lose to the probabilities the labels were drawn from
        assert d["log_loss"] > log_loss(rows[f"label_{h}"], rows[f"pred_{h}"] / 2) + 0.02, d
    assert calibrated["unlabelled_rows"] == 0 and "note" not in calibrated
    assert window_calibration(frame(50, seed=3), HEADS) is None  # labels not joined: nothing reported


def test_calibration_gap_is_a_drift_criterion_only_when_the_rule_sets_it(reference, tmp_path):
    doubled = frame(800, seed=2, scale=2.0)
    _, off = analyze_window(reference, doubled, HEADS, DriftRule(), report=False)
    assert off.drift is False, off.reasons  # inputs and predictions as the reference's
    assert off.scores["calibration"]["heads"]["click"]["relative_gap"] > 0.5
    rule = DriftRule(calibration_gap=0.5)
    _, calm = analyze_window(reference, frame(800, seed=1, scale=1.0), HEADS, rule, report=False)
    assert calm.drift is False, calm.reasons
    _, on = analyze_window(reference, doubled, HEADS, rule, report=False)
    assert on.drift is True and {r.split(":")[0] for r in on.reasons} == {"calibration"}, on.reasons
    assert any(r.startswith("calibration: click") for r in on.reasons)
    assert DriftRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_the_gap_is_in_the_decision_record_the_report_and_the_dashboard(reference, tmp_path):
    """Two windows (calibrated, then doubled) with the rule's calibration criterion on."""
    from helpers import report_widgets
    from transact.monitoring import dashboard
    from transact.monitoring.monitor import run_monitor
    from transact.monitoring.verdict import CALIBRATION_TITLE

    current = pd.concat([frame(600, seed=1, scale=1.0, t0=T0), frame(600, seed=2, scale=2.0, t0=T0 + DAY)],
                        ignore_index=True)
    rule = DriftRule(calibration_gap=0.5)
    summary = run_monitor(reference, HEADS, current, HEADS, tmp_path / "monitor", rule=rule, plot_points=40)
    assert [a["drift"] for a in summary["actions"]] == [False, True], summary["actions"]
    records = [json.loads(x) for x in (tmp_path / "monitor" / "decisions.jsonl").read_text().splitlines()]
    calm, off = (r["scores"]["calibration"]["heads"]["click"] for r in records)
    assert calm["relative_gap"] < 0.2 < 0.8 < off["relative_gap"], (calm, off)
    assert {"rows", "mean_predicted", "observed_rate", "difference", "ece", "log_loss"} <= set(off)
    assert records[1]["reasons"] and all(r.startswith("calibration") for r in records[1]["reasons"])
    # the report: the calibration table right after the rule's, and the rule's table names the criterion
    widgets = report_widgets(open(records[1]["report"]).read())
    tables = [w for w in widgets if w["type"] == "table"]
    rule_table, calib_table = tables[0], tables[1]
    assert calib_table["title"].startswith(CALIBRATION_TITLE) and "drift" not in calib_table["title"].split("--")[0]
    rows = {r[0]: r for r in calib_table["params"]["data"]}
    assert set(rows) == set(HEADS) and rows["click"][1] == "600"
    assert f"{off['observed_rate']:.4f}" == rows["click"][3]
    fired = {r[0]: r[3] for r in rule_table["params"]["data"]}
    assert fired["calibration click"] == "yes"
    # the dashboard: a calibration panel serving predicted vs observed per window
    d = dashboard.describe(summary["workspace"])
    assert dashboard.CALIBRATION_PANEL in d["panels"]
    proc, address = dashboard.serve(summary["workspace"], port=dashboard.free_port())
    try:
        series = dashboard.panel_series(address, d["project_id"], summary["workspace"])
    finally:
        dashboard.stop(proc)
    predicted, observed = series[dashboard.CALIBRATION_PANEL][:2]  # click: predicted, observed
    assert predicted == pytest.approx([r["scores"]["calibration"]["heads"]["click"]["mean_predicted"]
                                       for r in records])
    assert observed == pytest.approx([r["scores"]["calibration"]["heads"]["click"]["observed_rate"]
                                      for r in records])


def _keys(table: pa.Table) -> list[tuple[int, int]]:
    return list(zip(table.column("request_id").to_pylist(), table.column("position").to_pylist()))


def test_unlabelled_rows_are_counted_not_joined_wrongly():
    """Served: request 1 (positions 0-2), request 2 served twice (a retry), request 3 not
    labelled yet. Labels: requests 1 and 2, with positions in another order, and a request
    never served."""
    served = pa.table({
        "request_id": pa.array([1, 1, 1, 2, 2, 3, 3], pa.int64()),
        "position": pa.array([0, 1, 2, 0, 0, 0, 1], pa.int16()),
        "user_id": pa.array([10, 10, 10, 20, 20, 30, 30], pa.int64()),
        "item_id": pa.array([100, 101, 102, 200, 200, 300, 301], pa.int64()),
        "served_ts": pa.array([5, 5, 5, 9, 7, 5, 5], pa.int64()),  # the retry's first copy is row 4
        "model_version": pa.array(["v"] * 7), "score": pa.array([0.1] * 7, pa.float64()),
        "pred_click": pa.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.5, 0.5], pa.float32()),
    })
    labels = {"label_click": [0, 1, 0, 1, 1], "label_repin": [0] * 5, "label_hide": [0] * 5, "label_closeup": [0] * 5}
    requests = pa.table({
        "request_id": pa.array([1, 1, 1, 2, 4], pa.int64()), "position": pa.array([2, 0, 1, 0, 0], pa.int16()),
        "user_id": pa.array([10, 10, 10, 20, 40], pa.int64()), "item_id": pa.array([102, 100, 101, 200, 400], pa.int64()),
        **{c: pa.array(v, pa.uint8()) for c, v in labels.items()},
    })
    joined = label_frame(served, requests)
    assert joined[STATE].tolist() == [LABELLED] * 3 + [REPEATED, LABELLED] + [UNLABELLED] * 2
    # each label on its own (request_id, position): (1,0) -> 1, (1,1) -> 0, (1,2) -> 0, (2,0) -> 1
    assert joined["label_click"].iloc[[0, 1, 2, 4]].tolist() == [1, 0, 0, 1]
    assert joined["label_click"].iloc[[3, 5, 6]].isna().all()  # the retry's second copy and request 3: no label
    rows = pd.concat([served.to_pandas(), joined], axis=1)
    calib = window_calibration(rows, ["click"])
    assert (calib["labelled_rows"], calib["unlabelled_rows"], calib["repeated_rows"]) == (4, 2, 1)
    c = calib["heads"]["click"]
    assert c["rows"] == 4 and c["observed_rate"] == pytest.approx(0.5)
    assert c["mean_predicted"] == pytest.approx(np.mean([0.9, 0.1, 0.2, 0.8]), abs=1e-6)
    # the same rows attach_labels keeps for training (one join rule)
    from transact.serving.served_log import label_index

    assert (label_index(served, requests) >= 0).tolist() == (joined[STATE] == LABELLED).tolist()
    # a window none of whose rows has a label says so
    none = window_calibration(rows[joined[STATE] != LABELLED], ["click"])
    assert none["labelled_rows"] == 0 and none["unlabelled_rows"] == 2 and none["note"] == "no labels for this window"
    assert none["heads"] == {}
    # a label row for the right key but another item is a wrong join, refused
    bad = requests.set_column(3, "item_id", pa.array([102, 100, 999, 200, 400], pa.int64()))
    with pytest.raises(Exception, match="disagree on item_id"):
        label_frame(served, bad)


def served_log(n: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(a served log of ``n`` rows, the requests table labelling its first 3/4 of requests)."""
    import torch

    from transact.data.schema import LABEL_COLUMNS
    from transact.features.config import FeatureConfig
    from transact.features.nn_features import SAll, s_all_to_arrow, valid_mask

    cfg = FeatureConfig(k_ll=4, k_rt=3, r=2, k_imp=3)
    g = torch.Generator().manual_seed(seed)
    seg_len = torch.stack([torch.randint(0, m + 1, (n,), generator=g) for m in (4, 3, 2, 3)], 1).to(torch.int16)
    valid = valid_mask(seg_len, cfg)
    S = cfg.seq_len
    emb = torch.randint(-60, 60, (n, S, 32), generator=g).to(torch.int8).masked_fill(~valid[..., None], 0)
    action = torch.randint(1, 16, (n, S), generator=g).to(torch.uint8).masked_fill(~valid, 0)
    surface = torch.zeros((n, S), dtype=torch.int8)
    age = torch.randint(1, 10**6, (n, S), generator=g).to(torch.int32).masked_fill(~valid, -1)
    cand = torch.randint(-60, 60, (n, 32), generator=g).to(torch.int8)
    rid, pos = np.arange(n) // 4, np.arange(n) % 4
    meta = pa.table({
        "request_id": pa.array(rid, pa.int64()), "user_id": pa.array(rid % 7, pa.int64()),
        "item_id": pa.array(np.arange(n), pa.int64()), "ts": pa.array(T0 + np.arange(n) * 1000, pa.int64()),
        "surface": pa.array(np.zeros(n), pa.int8()), "position": pa.array(pos, pa.int16()),
        **{c: pa.array(np.zeros(n), pa.uint8()) for c in LABEL_COLUMNS},
    })
    rows = s_all_to_arrow(SAll(emb, action, surface, age, seg_len), cand, meta, cfg)
    served = rows.drop_columns(list(LABEL_COLUMNS))
    rng = np.random.default_rng(seed)
    for h in HEADS:
        served = served.append_column(f"pred_{h}", pa.array(rng.uniform(0.1, 0.3, n), pa.float32()))
    served = served.append_column("score", pa.array(np.zeros(n))).append_column(
        "model_version", pa.array(["v1"] * n)).append_column("served_ts", pa.array(T0 + np.arange(n) * 1000))
    keep = rid < (n // 4) * 3 // 4
    requests = meta.filter(pa.array(keep))
    for c in LABEL_COLUMNS:
        requests = requests.set_column(requests.schema.get_field_index(c), c,
                                       pa.array(rng.random(int(keep.sum())) < 0.2, pa.bool_()).cast(pa.uint8()))
    return served, requests


@pytest.mark.parametrize("where", ["requests file", "world folder"])
def test_monitor_cli_reads_labels_from_an_object_store_uri(s3, tmp_path, where):
    from typer.testing import CliRunner

    from transact.cli import app
    from transact.data import storage

    served, requests = served_log(160)
    (tmp_path / "served").mkdir()
    pq.write_table(served, tmp_path / "served" / "served-0.parquet")
    pq.write_table(requests, tmp_path / "requests.parquet")
    bucket = s3.bucket()
    given = f"{bucket}/world/requests.parquet" if where == "requests file" else f"{bucket}/world"
    storage.put_file(tmp_path / "requests.parquet", f"{bucket}/world/requests.parquet")
    out = tmp_path / "monitor"
    res = CliRunner().invoke(app, ["monitor", "--reference", str(tmp_path / "served"), "--current",
                                   str(tmp_path / "served"), "--labels", given, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "labels: 120 of 160 served rows labelled" in res.output
    (record,) = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    calib = record["scores"]["calibration"]
    assert (calib["labelled_rows"], calib["unlabelled_rows"], calib["repeated_rows"]) == (120, 40, 0)
    labelled = requests.to_pandas()
    for h in HEADS:
        assert calib["heads"][h]["rows"] == 120
        assert calib["heads"][h]["observed_rate"] == pytest.approx(labelled[f"label_{h}"].mean())
