"""Drift monitoring: features, the drift rule, the retrain trigger (cooldown, decision log).

Fast tests on hand-made scores and small tables; the loop end to end on a simulated
``tiny`` world is in ``test_monitoring_e2e.py``.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from transact.features.config import FeatureConfig
from transact.monitoring.drift import DriftRule, WindowResult, decide, split_windows
from transact.monitoring.trigger import DecisionLog, RetrainTrigger

HOUR = 3_600_000
DAY = 24 * HOUR


# --------------------------------------------------------------------------- features


def _rows(n: int = 6, seed: int = 0) -> tuple[pa.Table, FeatureConfig, object, torch.Tensor]:
    from transact.data.schema import LABEL_COLUMNS
    from transact.features.nn_features import SAll, s_all_to_arrow

    cfg = FeatureConfig(k_ll=4, k_rt=3, r=2, k_imp=3)
    S = cfg.seq_len
    g = torch.Generator().manual_seed(seed)
    seg_len = torch.tensor([[4, 3, 2, 3], [0, 0, 0, 0], [2, 1, 2, 0], [4, 3, 2, 3], [1, 0, 1, 1], [3, 2, 2, 2]],
                           dtype=torch.int16)[:n]
    from transact.features.nn_features import valid_mask

    valid = valid_mask(seg_len, cfg)
    emb = torch.randint(-60, 60, (n, S, 32), generator=g, dtype=torch.int64).to(torch.int8)
    emb = emb.masked_fill(~valid[..., None], 0)
    action = torch.randint(1, 16, (n, S), generator=g).to(torch.uint8).masked_fill(~valid, 0)
    action[:, -3:] = torch.where(valid[:, -3:], torch.tensor(16, dtype=torch.uint8), action[:, -3:])  # impressions
    surface = torch.randint(0, 4, (n, S), generator=g).to(torch.int8).masked_fill(~valid, 0)
    age = torch.randint(1, 10**6, (n, S), generator=g).to(torch.int32).masked_fill(~valid, -1)
    s_all = SAll(emb, action, surface, age, seg_len)
    cand = torch.randint(-60, 60, (n, 32), generator=g, dtype=torch.int64).to(torch.int8)
    meta = pa.table({
        "request_id": pa.array(np.arange(n) // 2, pa.int64()), "user_id": pa.array(np.arange(n) // 2, pa.int64()),
        "item_id": pa.array(np.arange(n), pa.int64()), "ts": pa.array(1_700_000_000_000 + np.arange(n), pa.int64()),
        "surface": pa.array(np.arange(n) % 4, pa.int8()), "position": pa.array(np.arange(n) % 2, pa.int16()),
        **{c: pa.array(np.zeros(n), pa.uint8()) for c in LABEL_COLUMNS},
    })
    return s_all_to_arrow(s_all, cand, meta, cfg), cfg, s_all, cand


def test_features_expand_rows_into_scalar_and_embedding_columns():
    from transact.data.quantization import STEP
    from transact.data.schema import ACTION_BIT, SURFACES
    from transact.features.nn_features import valid_mask
    from transact.monitoring.features import EMBEDDINGS, SCALAR_COLUMNS, features_frame

    table, cfg, s_all, cand = _rows()
    f = features_frame(table)
    assert len(f) == table.num_rows
    for c in list(SCALAR_COLUMNS) + [c for v in EMBEDDINGS.values() for c in v] + ["ts", "request_id"]:
        assert c in f.columns, c
    valid = valid_mask(s_all.seg_len, cfg).numpy()
    np.testing.assert_array_equal(f["len_ll_nn"], s_all.seg_len[:, 0].numpy())
    # row 1 has no token at all: shares and ages are missing, the sequence embedding is zero
    assert f.loc[1, ["act_click", "tok_homefeed", "age_newest", "sim_max"]].isna().all()
    assert (f.loc[1, EMBEDDINGS["seq"]] == 0).all()
    # mean sequence embedding and candidate embedding, dequantised
    i = 0
    m = s_all.emb_q[i].numpy().astype(np.float64)[valid[i]].mean(0) * STEP
    np.testing.assert_allclose(f.loc[i, EMBEDDINGS["seq"]].to_numpy(float), m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f.loc[i, EMBEDDINGS["cand"]].to_numpy(float), cand[i].numpy() * STEP, rtol=1e-6)
    # action mix over the action segments (not impressions)
    act = s_all.action[i].numpy()
    explicit = valid[i].copy()
    explicit[-cfg.k_imp:] = False
    assert f.loc[i, "act_click"] == pytest.approx(((act & ACTION_BIT["click"]) != 0)[explicit].mean())
    assert f.loc[i, "surface"] == SURFACES[0]
    # recency: newest token's age, log10(1 + s)
    assert f.loc[i, "age_newest"] == pytest.approx(np.log10(1 + s_all.age_s[i].numpy()[valid[i]].min()))
    # cosine similarities lie in [-1, 1]
    sims = f[["sim_ll_nn", "sim_rt_nn", "sim_rt_recent", "sim_imp_nn", "sim_max"]].to_numpy(float)
    assert np.nanmin(sims) >= -1 - 1e-6 and np.nanmax(sims) <= 1 + 1e-6
    for c in ("sim_ll_nn", "sim_rt_nn", "sim_rt_recent", "sim_imp_nn"):
        ok = f[c].notna()
        assert (f.loc[ok, "sim_max"] >= f.loc[ok, c] - 1e-9).all()


# --------------------------------------------------------------------------- the rule


def _scores(share=0.1, match=0.05, cand=0.52, seq=0.55, pred=0.05) -> dict:
    rule = DriftRule()
    cols = {c: 0.01 for c in ("len_ll_nn", "act_click", "age_rt", "surface")}
    cols.update({c: match for c in rule.match_columns})
    return {"drift_share": share, "columns": cols, "embeddings": {"cand": cand, "seq": seq},
            "predictions": {"click": pred, "repin": pred, "hide": pred}}


def test_rule_each_criterion_alone_decides_drift():
    rule = DriftRule()
    assert decide(_scores(), rule, 1000) == (False, [])
    for kw, word in ((dict(share=0.6), "scalar"), (dict(match=0.5), "history match"),
                     (dict(cand=0.7), "embedding"), (dict(seq=0.8), "embedding"), (dict(pred=0.4), "prediction")):
        drift, reasons = decide(_scores(**kw), rule, 1000)
        assert drift and reasons[0].startswith(word), (kw, reasons)


def test_rule_history_match_needs_half_of_the_group_and_min_rows():
    rule = DriftRule()
    s = _scores()
    s["columns"]["sim_ll_nn"] = 0.9  # one of four: not enough
    assert decide(s, rule, 1000)[0] is False
    s["columns"]["sim_rt_nn"] = 0.3  # two of four
    assert decide(s, rule, 1000)[0] is True
    drift, reasons = decide(s, rule, rule.min_rows - 1)
    assert not drift and reasons[0].startswith("insufficient data")


def test_rule_round_trips_through_json():
    rule = DriftRule(drift_share=0.4, match_columns=("sim_rt_nn",))
    assert DriftRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_windows_are_epoch_aligned():
    t0 = 1_724_544_000_000  # a UTC midnight
    frame = pd.DataFrame({"ts": [t0 + 5, t0 + DAY - 1, t0 + DAY, t0 + 3 * DAY + 7]})
    w = split_windows(frame, 24)
    assert [x[0] for x in w] == ["2024-08-25T00:00Z", "2024-08-26T00:00Z", "2024-08-28T00:00Z"]
    assert [len(x[3]) for x in w] == [2, 1, 1]
    assert w[0][1] == t0 and w[0][2] == t0 + DAY


# --------------------------------------------------------------------------- trigger


def _result(day: int, drift: bool, rows: int = 500) -> WindowResult:
    t0 = 1_724_544_000_000
    return WindowResult(f"d{day}", t0 + day * DAY, t0 + (day + 1) * DAY, rows, drift,
                        ["embedding: cand"] if drift else [], {"drift_share": 0.1})


def test_cooldown_blocks_a_second_retrain_and_every_decision_is_logged(tmp_path):
    calls = []
    log = DecisionLog(tmp_path / "decisions.jsonl")
    trig = RetrainTrigger(log, mode="local", cooldown_hours=48,
                          retrain=lambda ctx: calls.append(ctx["window"]) or {"run": ctx["window"]})
    actions = [trig.handle(_result(d, drift))["action"] for d, drift in
               [(0, False), (1, True), (2, True), (3, False), (4, True), (5, True)]]
    # day 1 retrains; day 2 is 24 h later (< 48 h): cooldown; day 4 is 72 h later: retrain again
    assert actions == ["none", "retrain", "cooldown", "none", "retrain", "cooldown"]
    assert calls == ["d1", "d4"]
    recs = log.read()
    assert [r["window"] for r in recs] == ["d0", "d1", "d2", "d3", "d4", "d5"]
    for r in recs:
        assert {"window", "start_ts", "end_ts", "rows", "drift", "scores", "action", "reason",
                "decided_at"} <= set(r)
    assert recs[1]["retrain"]["run"] == "d1" and "cooldown" in recs[2]["reason"]
    # the cooldown survives a restart: it is read back from the log
    trig2 = RetrainTrigger(DecisionLog(log.path), mode="local", cooldown_hours=48, retrain=lambda ctx: {})
    assert trig2.handle(_result(5, True))["action"] == "cooldown"


def test_a_decision_reaches_the_storage_root_before_the_next_window_is_judged(s3, tmp_path):
    """A monitor on a cluster killed after it submitted a retrain: the decision (the cooldown's
    memory) is on the storage root already, so the next run does not retrain again."""
    from transact.data import storage

    mirror = f"{s3.bucket()}/monitoring/decisions.jsonl"
    seen = []

    def retrain(ctx):
        seen.append(storage.read_bytes(mirror).decode().count("\n"))  # what the store held at that moment
        raise KeyboardInterrupt  # killed right after the submission

    trig = RetrainTrigger(DecisionLog(tmp_path / "d.jsonl", mirror), mode="local",
                          cooldown_hours=48, retrain=retrain)
    trig.handle(_result(0, False))
    with pytest.raises(KeyboardInterrupt):
        trig.handle(_result(1, True))
    assert seen == [1]  # day 0's decision was already there
    fresh = tmp_path / "next-run.jsonl"
    fresh.write_bytes(storage.read_bytes(mirror))
    assert [r["window"] for r in DecisionLog(fresh).read()] == ["d0"]


def test_cooldown_in_windows_and_off_mode(tmp_path):
    trig = RetrainTrigger(DecisionLog(tmp_path / "a.jsonl"), mode="local", cooldown_hours=0, cooldown_windows=2,
                          retrain=lambda ctx: {})
    assert [trig.handle(_result(d, True))["action"] for d in range(4)] == \
        ["retrain", "cooldown", "cooldown", "retrain"]
    off = RetrainTrigger(DecisionLog(tmp_path / "b.jsonl"), mode="off")
    assert off.handle(_result(0, True))["action"] == "dry_run"
    assert off.handle(_result(1, False))["action"] == "none"


def test_failed_retrain_is_logged_and_does_not_start_the_cooldown(tmp_path):
    attempts = []

    def flaky(ctx):
        attempts.append(ctx["window"])
        if len(attempts) == 1:
            raise RuntimeError("cluster down")
        return {"outcome": "packaged"}

    log = DecisionLog(tmp_path / "d.jsonl")
    trig = RetrainTrigger(log, mode="local", cooldown_hours=72, retrain=flaky)
    assert trig.handle(_result(0, True))["action"] == "retrain_failed"
    assert trig.handle(_result(1, True))["action"] == "retrain"
    assert "cluster down" in log.read()[0]["retrain"]["error"]


def test_insufficient_data_and_torn_log_lines(tmp_path):
    log = DecisionLog(tmp_path / "d.jsonl")
    trig = RetrainTrigger(log, mode="off")
    res = WindowResult("w", 0, DAY, 3, False, ["insufficient data: 3 rows < min_rows 200"], {})
    assert trig.handle(res)["action"] == "insufficient_data"
    with open(log.path, "a") as f:
        f.write('{"window": "torn"')  # a crash mid-write
    assert len(log.read()) == 1


def test_cluster_mode_submits_the_retrain_pipeline(tmp_path, monkeypatch):
    submitted = {}

    def fake_submit(host, name, params, **kw):
        submitted.update(host=host, name=name, params=params, **kw)

        class Run:
            run_id = "run-123"
        return Run()

    import transact.pipelines.runner as runner

    monkeypatch.setattr(runner, "submit", fake_submit)
    from transact.pipelines.training import Cluster

    cluster = Cluster(storage_secret="s3-creds")
    trig = RetrainTrigger(DecisionLog(tmp_path / "d.jsonl"), mode="cluster", kfp_host="http://kfp.example",
                          pipeline_params={"source": "gs://logs/latest", "storage_root": "gs://store"},
                          image="registry.example.com/transact:0.1.0", cluster=cluster)
    rec = trig.handle(_result(2, True))
    assert rec["action"] == "retrain" and rec["retrain"]["run_id"] == "run-123"
    assert submitted["host"] == "http://kfp.example" and submitted["name"] == "retrain"
    assert submitted["params"]["source"] == "gs://logs/latest"
    # the retrain runs where the first run ran: the image and the pods' Secret it was submitted with
    assert submitted["image"] == "registry.example.com/transact:0.1.0" and submitted["cluster"] is cluster
    with pytest.raises(ValueError, match="needs a Kubeflow Pipelines host"):
        RetrainTrigger(DecisionLog(tmp_path / "e.jsonl"), mode="cluster")


def test_local_mode_runs_the_retrain_pipeline_here(tmp_path, monkeypatch):
    import transact.pipelines.runner as runner

    calls = {}

    def fake_run_local(name, run_dir, **params):
        calls.update(name=name, run_dir=str(run_dir), params=params)
        return {"outcome": "packaged: the new model is the champion", "package": {"tag": "transact-ranker:abc"}}

    monkeypatch.setattr(runner, "run_local", fake_run_local)
    trig = RetrainTrigger(DecisionLog(tmp_path / "d.jsonl"), mode="local", run_root=tmp_path / "runs",
                          pipeline_params={"source": "/logs", "storage_root": "/store"})
    rec = trig.handle(_result(3, True))
    assert rec["action"] == "retrain" and rec["retrain"]["package"]["tag"] == "transact-ranker:abc"
    assert calls["name"] == "retrain" and calls["params"] == {"source": "/logs", "storage_root": "/store"}
    assert calls["run_dir"].startswith(str(tmp_path / "runs" / "retrain-d3"))
    # a pipeline that failed is a failed retrain; one without a source cannot start
    monkeypatch.setattr(runner, "run_local", lambda *a, **k: {"outcome": "failed at train-op"})
    assert trig.handle(_result(7, True))["action"] == "retrain_failed"
    nosrc = RetrainTrigger(DecisionLog(tmp_path / "e.jsonl"), mode="local", pipeline_params={})
    rec = nosrc.handle(_result(0, True))
    assert rec["action"] == "retrain_failed" and "source" in rec["reason"]
