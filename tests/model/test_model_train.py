"""Training, checkpoints, resume, determinism, evaluation, ablation, CLI and DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from helpers import rows_with_split
from transact.features.config import FeatureConfig
from transact.model.checkpoint import load_model, read_config, save_model
from transact.model.dataset import table_to_batch, write_synthetic_rows
from transact.model.train import lr_at, train
from transact.model.transact import BASELINES, build_model

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)
FAST = dict(batch_size=32, lr=3e-3, progress=False, log_every=1, num_threads=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A row file with world.json next to it (train = first ~75% of the requests)."""
    return rows_with_split(tmp_path_factory.mktemp("world"), 48, FCFG, n_users=12, seed=0)


def params(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def same_params(a, b) -> bool:
    pa_, pb = params(a), params(b)
    return pa_.keys() == pb.keys() and all(torch.equal(pa_[k], pb[k]) for k in pa_)


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(99, 100, 10, 1.0) < 0.01


@pytest.mark.parametrize("name", list(BASELINES))
def test_each_baseline_trains_with_decreasing_loss(world, tmp_path, name):
    s = train(world, tmp_path / name, name, epochs=4, seed=0, **FAST)
    losses = [h["loss"] for h in s["history"]]
    spe = s["steps_per_epoch"]
    assert s["steps"] == 4 * spe and s["finished"] and s["world_size"] == 1
    assert np.mean(losses[-spe:]) < np.mean(losses[:spe])
    assert all(np.isfinite(losses))
    if name in ("v2", "transact_nal_imp", "transact_nal_inbatch"):
        assert all(h["nal"] > 0 for h in s["history"])
    cfg = read_config(tmp_path / name)
    assert cfg["model_config"]["name"] == name and cfg["feature_config"] == FCFG.to_dict()
    assert cfg["training"]["train_end_ts"] == json.loads((world.parent / "world.json").read_text())["train_end_ts"]


def test_checkpoint_round_trip_gives_identical_outputs(world, tmp_path):
    torch.manual_seed(3)
    m = build_model("v2", FCFG)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(tmp_path / "m", m, {"note": "x"}, step=7)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]
    m2 = load_model(tmp_path / "m")
    b = table_to_batch(pq.read_table(world).slice(0, 50), FCFG)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(b).logits, m2(b).logits)
    assert m2.cfg == m.cfg and m2.fcfg == m.fcfg


def test_resume_continues_exactly_from_the_saved_step(world, tmp_path):
    # dropout and the time-window mask make the run depend on the saved RNG state
    kw = dict(epochs=3, seed=1, model_overrides={"time_window_mask": True, "dropout": 0.1}, **FAST)
    full = train(world, tmp_path / "full", "v2", **kw)
    part = train(world, tmp_path / "resumed", "v2", max_steps=5, **kw)
    assert part["steps"] == 5 and not part["finished"]
    state = json.loads((tmp_path / "resumed" / "train_state" / "state.json").read_text())
    assert state["step"] == 5
    rest = train(world, tmp_path / "resumed", "v2", **kw)
    assert rest["resumed_from_step"] == 5 and rest["steps"] == full["steps"] and rest["finished"]
    assert same_params(tmp_path / "full", tmp_path / "resumed")
    # the optimizer state round-trips too: one more identical run from the finished state is a no-op
    again = train(world, tmp_path / "resumed", "v2", **kw)
    assert again["resumed_from_step"] == full["steps"] and same_params(tmp_path / "full", tmp_path / "resumed")
    with pytest.raises(ValueError, match="model config: nal = .none. in this run, .impression. in the checkpoint"):
        train(world, tmp_path / "resumed", "transact", **kw)


def test_training_is_deterministic_by_seed(world, tmp_path):
    for d, seed in (("a", 5), ("b", 5), ("c", 6)):
        train(world, tmp_path / d, "transact_nal_inbatch", epochs=1, seed=seed, **FAST)
    assert same_params(tmp_path / "a", tmp_path / "b")
    assert not same_params(tmp_path / "a", tmp_path / "c")


def test_evaluate_writes_metrics_and_predictions(world, tmp_path):
    from transact.model.evaluate import evaluate

    train(world, tmp_path / "m", "v2", epochs=2, seed=0, **FAST)
    m = evaluate(tmp_path / "m", world, tmp_path / "ev", n_boot=100, progress=False)
    cut = json.loads((world.parent / "world.json").read_text())["train_end_ts"]
    ts = pq.read_table(world, columns=["ts"]).column("ts").to_numpy()
    assert m["n_rows"] == int((ts >= cut).sum()) and m["eval_window"]["train_end_ts"] == cut
    assert set(m["hit"]) == {"click", "repin", "hide", "closeup"}
    for v in m["hit"].values():
        assert v["ci95"][0] <= v["value"] <= v["ci95"][1]
    assert set(m["heads"]) == {"click", "repin", "hide"}
    assert all(0 <= v["auc"] <= 1 for v in m["heads"].values())
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["hit"] == m["hit"]
    pred = pq.read_table(tmp_path / "ev" / "predictions.parquet")
    assert pred.num_rows == m["n_rows"] and "p_repin" in pred.column_names
    # the score in the file is S = click + repin - hide
    p = {c: pred.column(c).to_numpy() for c in ("p_click", "p_repin", "p_hide", "score")}
    assert np.allclose(p["score"], p["p_click"] + p["p_repin"] - p["p_hide"])


def test_sequence_models_beat_wdl_on_learnable_rows(tmp_path):
    """The synthetic labels depend on the user's taste, visible only in the sequence."""
    from transact.model.evaluate import evaluate

    rows = write_synthetic_rows(tmp_path / "rows.parquet", 400, FCFG, per_request=8, n_users=20, seed=2)
    ts = pq.read_table(rows, columns=["ts"]).column("ts").to_numpy()
    cut = int(np.quantile(ts, 0.7))
    auc = {}
    for name in ("wdl", "transact"):
        train(rows, tmp_path / name, name, epochs=3, seed=0, train_end_ts=cut, **{**FAST, "batch_size": 64})
        auc[name] = evaluate(tmp_path / name, rows, n_boot=10, progress=False)["heads"]["click"]["auc"]
    assert auc["transact"] > auc["wdl"] + 0.05


def test_ablation_writes_table_json_markdown_and_chart(world, tmp_path):
    from transact.model.ablation import ablation, format_table

    res = ablation(world, tmp_path / "abl", baseline="transact", models=["wdl", "transact", "v2"], seeds=1,
                   epochs=1, batch_size=32, lr=3e-3, n_boot=50, progress=False)
    assert res["results"]["transact"]["rel_change"]["repin"] is None
    for name in ("wdl", "v2"):
        rc = res["results"][name]["rel_change"]["hide"]
        lo, hi = rc["ci95"]
        assert rc["value"] is None or lo is None or lo <= rc["value"] <= hi
    for f in ("ablation.json", "ablation.md", "ablation.png"):
        assert (tmp_path / "abl" / f).stat().st_size > 0
    assert (tmp_path / "abl" / "v2" / "seed0" / "model.safetensors").exists()
    table = format_table(res)
    assert "HIT@3/repin" in table and "TransAct V2" in table
    json.loads((tmp_path / "abl" / "ablation.json").read_text(), parse_constant=lambda c: 1 / 0)  # strict JSON
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert md.count("|") > 10 and "WDL" in md


def test_cli_train_evaluate_and_bench(world, tmp_path):
    from typer.testing import CliRunner

    from transact.cli import app

    r = CliRunner().invoke(app, ["train", "--rows", str(world), "--model", "transact", "--out",
                                 str(tmp_path / "m"), "--batch-size", "64", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "transact:" in r.output
    r = CliRunner().invoke(app, ["evaluate", "--model-dir", str(tmp_path / "m"), "--rows", str(world),
                                 "--n-boot", "20", "--no-progress", "--score-weights", "repin=1,hide=-1"])
    assert r.exit_code == 0, r.output
    assert "HIT@3" in r.output and (tmp_path / "m" / "eval" / "metrics.json").exists()
    r = CliRunner().invoke(app, ["bench", "train", "--models", "wdl", "--batch-sizes", "8", "--steps", "2",
                                 "--warmup", "1", "--out", str(tmp_path / "bench.json")])
    assert r.exit_code == 0, r.output
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["results"][0]["examples_per_s"] > 0 and "cpu" in b["machine"]
    r = CliRunner().invoke(app, ["train", "--rows", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "error" in r.output


def test_ddp_two_processes_with_torchrun(world, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "transact.cli", "train", "--rows", str(world), "--model", "v2", "--out", str(out),
           "--epochs", "2", "--batch-size", "16", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((out / "train_summary.json").read_text())
    assert s["world_size"] == 2 and s["global_batch_size"] == 32
    assert s["ddp_params_in_sync"] is True and s["finished"]
    n_train = s["n_train_rows"]
    assert s["steps_per_epoch"] == -(-n_train // 32) or s["steps_per_epoch"] == n_train // 32
    m = load_model(out)
    assert m.cfg.name == "v2"
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == s["steps"]


def test_step_budget_lays_the_whole_schedule_over_the_budget(world, tmp_path):
    s = train(world, tmp_path / "b", "transact", epochs=50, seed=0, step_budget=5, **FAST)
    assert s["steps"] == 5 and s["finished"] and s["total_steps"] == 5
    # the last step ran at the end of the cosine decay, not mid-schedule
    assert s["history"][-1]["lr"] < 0.2 * FAST["lr"]
