"""Calibrated heads: beta calibration recovers a known miscalibration, the model applies the one
map everywhere it speaks, training fits it on held-out rows, evaluation reports it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from helpers import write_world
from transact.model import calibration as C
from transact.model.checkpoint import load_model, read_config, save_model
from transact.model.metrics import log_loss
from transact.model.transact import build_model


@settings(max_examples=20, deadline=None)
@given(a=st.floats(0.3, 2.5), b=st.floats(0.3, 2.5), c=st.floats(-3.0, 1.0), seed=st.integers(0, 2**31))
@example(a=0.5, b=0.5, c=-2.0, seed=0)  # (Platt 0.5, -2): full Newton steps overshot to 1e6; now halved
# steep map: the fit (2.68, 2.36, 0.26) is the maximum-likelihood one (log-loss below the
# truth's), its map within 0.005 of the truth's -- a, b and c trade off along a ridge
@example(a=2.46875, b=2.5, c=0.0, seed=264)
def test_beta_calibration_recovers_the_map_that_made_the_labels(a, b, c, seed):
    """Labels drawn with P(y=1) = the beta map of the logit: the fit is the maximum-likelihood
    map (no worse than the one that made the labels), recovers that map's probabilities, and
    beats the raw sigmoid and the constant predictor on the log-loss."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, 40_000)
    y = (rng.random(len(z)) < C.apply(z, a, b, c)).astype(np.float64)
    fa, fb, fc = C.fit_beta(z, y)
    grid = np.quantile(z, np.linspace(0.01, 0.99, 25))
    assert np.abs(C.apply(grid, fa, fb, fc) - C.apply(grid, a, b, c)).max() < 0.03
    ll = log_loss(y, C.apply(z, fa, fb, fc))
    assert ll <= log_loss(y, C.apply(z, a, b, c)) + 1e-9
    assert ll <= log_loss(y, C.sigmoid(z)) + 1e-9
    assert ll < log_loss(y, np.full(len(y), y.mean()))


def test_label_weights_inflate_the_odds_and_the_fit_undoes_it():
    """A head trained with positives weighted w learns odds w times too high (ln w on the logit):
    the raw sigmoid is badly calibrated; the fit is that shift (a = b = 1, c = -ln w) and the ECE
    falls to the noise of the sample."""
    rng = np.random.default_rng(0)
    z_true = rng.normal(-2.5, 1.0, 60_000)
    y = (rng.random(len(z_true)) < C.sigmoid(z_true)).astype(np.float64)
    z_weighted = z_true + np.log(20.0)  # what a label weight of 20 teaches the head
    raw = C.reliability(y, C.sigmoid(z_weighted))
    a, b, c = C.fit_beta(z_weighted, y)
    cal = C.reliability(y, C.apply(z_weighted, a, b, c))
    assert raw["ece"] > 0.2 and cal["ece"] < 0.01
    assert (a, b, c) == pytest.approx((1.0, 1.0, -np.log(20.0)), abs=0.15)
    assert [x["rows"] for x in cal["bins"]] == [4000] * 15  # equal-mass bins


def test_a_bend_platt_cannot_follow_the_beta_map_can():
    """Miscalibration that is no temperature (the tails apart: a != b), as the demo's heads show:
    Platt fitted on the very rows keeps a visible ECE, the beta map does not; isotonic, the third
    candidate, is a non-decreasing step function."""
    rng = np.random.default_rng(1)
    z = rng.normal(-1.0, 1.5, 80_000)
    y = (rng.random(len(z)) < C.apply(z, 0.4, 1.3, -1.0)).astype(np.float64)
    s, t = C.fit_platt(z, y)
    platt = C.reliability(y, C.sigmoid(s * z + t))["ece"]
    beta = C.reliability(y, C.apply(z, *C.fit_beta(z, y)))["ece"]
    assert beta < 0.006 < platt
    knots, vals = C.isotonic(z, y)
    assert np.all(np.diff(vals) >= 0) and np.all(np.diff(knots) >= 0) and len(vals) < len(z)


def test_ece_of_a_perfect_and_of_a_wrong_predictor():
    p = np.repeat([0.1, 0.5, 0.9], 1000)
    y = np.concatenate([np.arange(1000) < 100, np.arange(1000) < 500, np.arange(1000) < 900]).astype(float)
    assert C.reliability(y, p, bins=3)["ece"] == pytest.approx(0.0, abs=1e-12)
    assert C.reliability(y, np.full(3000, 0.5), bins=3)["ece"] == pytest.approx(0.8 / 3, abs=1e-9)


def test_the_model_applies_its_calibration_and_the_checkpoint_keeps_it(tmp_path):
    torch.manual_seed(0)
    model = build_model("v2")
    logits = torch.randn(7, len(model.cfg.heads)) * 4
    assert torch.equal(model.probabilities(logits), torch.sigmoid(logits))  # identity until fitted
    save_model(tmp_path / "plain", model)
    assert "calibration" not in read_config(tmp_path / "plain")
    cal = C.Calibration(model.cfg.heads, (0.5, 1.5, 1.0), (0.8, 1.2, 1.0), (-2.0, 0.3, -1.0), fitted_on={"rows": 10})
    model.set_calibration(cal)
    want = np.stack([C.apply(logits[:, j].double().numpy(), cal.a[j], cal.b[j], cal.c[j]) for j in range(3)], 1)
    np.testing.assert_allclose(model.probabilities(logits).numpy(), want, rtol=1e-5, atol=1e-7)  # the numpy twin
    assert torch.equal(model.probabilities(logits, raw=True), torch.sigmoid(logits))
    save_model(tmp_path / "cal", model)
    again = load_model(tmp_path / "cal")
    assert (again.calibration.a, again.calibration.b, again.calibration.c) == (cal.a, cal.b, cal.c)
    assert torch.equal(again.probabilities(logits), model.probabilities(logits))
    with pytest.raises(ValueError, match="calibration for heads"):
        model.set_calibration(C.Calibration(("click",), (1.0,), (1.0,), (0.0,)))
    with pytest.raises(ValueError, match="non-finite"):
        C.Calibration(("click",), (float("nan"),), (1.0,), (0.0,))
    with pytest.raises(ValueError, match="not be monotone"):
        C.Calibration(("click",), (-0.1,), (1.0,), (0.0,))
    config = read_config(tmp_path / "cal")
    del config["calibration"]["heads"]["hide"]
    (tmp_path / "cal" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no calibration for head.*hide"):
        load_model(tmp_path / "cal")


def test_training_holds_out_the_window_end_and_evaluation_reports_both(tmp_path):
    """The most recent 5% of the training window trains no step and fits the calibration; the
    evaluation reports log-loss and ECE of the calibrated and the raw heads and draws the
    reliability diagram; /rank's probabilities are the model's calibrated ones."""
    from helpers import SERVING_CFG as CFG
    from transact.features.nn_logging import log_nn_features
    from transact.model.evaluate import evaluate
    from transact.model.train import train

    write_world(tmp_path / "w", n_users=40)
    log_nn_features(tmp_path / "w", tmp_path / "rows.parquet", CFG, progress=False)
    s = train(tmp_path / "rows.parquet", tmp_path / "m", "v2", epochs=1, batch_size=64, progress=False)
    none = train(tmp_path / "rows.parquet", tmp_path / "m0", "v2", epochs=1, batch_size=64, progress=False,
                 calibration_holdout=0.0)
    assert s["calibration_start_ts"] < s["train_end_ts"] == none["calibration_start_ts"]
    assert s["n_train_rows"] < none["n_train_rows"]
    cal = read_config(tmp_path / "m")["calibration"]
    assert cal["method"] == "beta" and cal["fitted_on"]["start_ts"] == s["calibration_start_ts"]
    assert cal["fitted_on"]["rows"] > 0
    for h in ("click", "repin", "hide"):
        assert cal["logloss"]["calibrated"][h] <= cal["logloss"]["raw"][h] + 1e-9  # on its own slice
    assert "calibration" not in read_config(tmp_path / "m0")
    m = evaluate(tmp_path / "m", tmp_path / "rows.parquet", tmp_path / "eval", n_boot=10, progress=False)
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 1000
    for h, v in m["heads"].items():
        assert 0 <= v["ece"] <= 1 and 0 <= v["raw"]["ece"] <= 1 and v["constant_logloss"] > 0, h
    assert m["calibration"]["heads"]["click"] == cal["heads"]["click"]
    from transact.bench.calibration import format_table, run

    res = run(tmp_path / "m", tmp_path / "rows.parquet", tmp_path / "bench.json")  # `transact bench calibration`
    assert set(res["heads"]["click"]) >= {"raw", "platt", "beta", "isotonic", "platt_oracle", "constant"}
    assert json.loads((tmp_path / "bench.json").read_text())["machine"]["cpu_count"] >= 1
    assert "HIT@3 of S" in format_table(res) and set(res["hit3_by_score_from"]) >= {"repin", "hide"}
    with pytest.raises(ValueError, match="trained without a calibration slice"):
        run(tmp_path / "m0", tmp_path / "rows.parquet", tmp_path / "bench0.json")
    with pytest.raises(ValueError, match="calibration_holdout"):
        train(tmp_path / "rows.parquet", tmp_path / "bad", "v2", calibration_holdout=0.7, progress=False)
