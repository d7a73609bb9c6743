"""Issue 16, item 8: bad numeric options and rows of another feature config are refused
with one line naming the option or the field (and both values), exit code 2 -- never a
traceback, a reshape error, or a run that does something else (``--max-steps 0`` trained
one step and exited 0)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from transact.cli import app
from transact.features.config import FeatureConfig
from transact.model.dataset import read_feature_config, write_synthetic_rows
from transact.model.train import train

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)
OTHER = FeatureConfig(k_ll=10, k_rt=6, r=6, k_imp=6)  # k_ll changed


def write_rows(path, cfg: FeatureConfig):
    rows = write_synthetic_rows(path, 24, cfg, per_request=4, n_users=6, seed=0)
    ts = pq.read_table(rows, columns=["ts"]).column("ts").to_numpy()
    (path.parent / "world.json").write_text(json.dumps({"train_end_ts": int(np.quantile(ts, 0.75))}))
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(rows, model folder) of a one-step model on FCFG rows."""
    d = tmp_path_factory.mktemp("trained")
    rows = write_rows(d / "rows.parquet", FCFG)
    train(rows, d / "m", "wdl", batch_size=16, max_steps=1, progress=False, num_threads=1)
    return rows, d / "m"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(r, *words: str) -> None:
    """Exit 2, no traceback, one error line holding every word."""
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0], (w, r.output)


TRAIN = ["train", "--rows", "rows.parquet", "--out", "out", "--no-progress"]
EVAL = ["evaluate", "--model-dir", "m", "--rows", "rows.parquet", "--no-progress"]
ABL = ["ablation", "--rows", "rows.parquet", "--out", "out", "--no-progress"]
BENCH = ["bench", "train", "--out", "b.json"]


@pytest.mark.parametrize(("base", "option", "value"), [
    (TRAIN, "--max-steps", "0"), (TRAIN, "--max-steps", "-1"), (TRAIN, "--seed", "-3"),
    (TRAIN, "--batch-size", "0"), (TRAIN, "--epochs", "0"), (TRAIN, "--lr", "0"), (TRAIN, "--lr", "nan"),
    (TRAIN, "--lr", "-0.001"), (TRAIN, "--threads", "0"), (TRAIN, "--warmup-steps", "-1"),
    (TRAIN, "--ckpt-every", "-5"), (TRAIN, "--train-end-ts", "-1"), (TRAIN, "--nal-weight", "-0.5"),
    (TRAIN, "--first-k", "0"),
    (EVAL, "--batch-size", "0"), (EVAL, "--n-boot", "0"), (EVAL, "--train-end-ts", "-1"),
    (EVAL, "--eval-end-ts", "-2"),
    (ABL, "--seeds", "0"), (ABL, "--epochs", "-1"), (ABL, "--batch-size", "0"), (ABL, "--lr", "inf"),
    (ABL, "--n-boot", "0"), (ABL, "--threads", "0"), (ABL, "--max-steps", "0"), (ABL, "--train-end-ts", "-4"),
    (BENCH, "--steps", "0"), (BENCH, "--warmup", "-1"), (BENCH, "--threads", "0"), (BENCH, "--batch-sizes", "8,0"),
])
def test_bad_numeric_option_is_refused_by_name(tmp_path, monkeypatch, base, option, value):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and no rows exist: the check comes first
    assert_refused(invoke(*base, option, value), option, value.split(",")[-1])
    assert not (tmp_path / "out").exists() and not (tmp_path / "b.json").exists()


def test_eval_window_must_end_after_it_starts(tmp_path):
    r = invoke(*EVAL, "--train-end-ts", "100", "--eval-end-ts", "100")
    assert_refused(r, "--eval-end-ts", "--train-end-ts")


def test_library_train_refuses_max_steps_zero(trained, tmp_path):
    rows, _ = trained
    with pytest.raises(ValueError, match="max_steps must be >= 1, got 0"):
        train(rows, tmp_path / "m", "wdl", batch_size=16, max_steps=0, progress=False, num_threads=1)
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_evaluate_rows_of_another_feature_config(trained, tmp_path):
    _, model_dir = trained
    rows = write_rows(tmp_path / "other.parquet", OTHER)
    r = invoke("evaluate", "--model-dir", model_dir, "--rows", rows, "--out", tmp_path / "ev", "--no-progress")
    assert_refused(r, "k_ll = 10", "8 in the model")


def test_resume_with_rows_of_another_feature_config(trained, tmp_path):
    rows, model_dir = trained
    out = tmp_path / "m"
    r = invoke("train", "--rows", rows, "--model", "wdl", "--out", out, "--batch-size", "16", "--max-steps", "1",
               "--threads", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    other = write_rows(tmp_path / "o" / "rows.parquet", OTHER)
    r = invoke("train", "--rows", other, "--model", "wdl", "--out", out, "--batch-size", "16",
               "--max-steps", "2", "--threads", "1", "--no-progress")
    assert_refused(r, "k_ll = 10", "8 in the checkpoint", "--no-resume")


def test_resume_with_another_model_config_names_the_field(trained, tmp_path):
    rows, _ = trained
    out = tmp_path / "m"
    base = ["train", "--rows", rows, "--model", "transact", "--out", out, "--batch-size", "16", "--threads", "1",
            "--no-progress"]
    assert invoke(*base, "--max-steps", "1").exit_code == 0
    assert_refused(invoke(*base, "--max-steps", "2", "--nal-weight", "0.5"), "nal_weight = 0.5", "checkpoint")


def test_resume_a_checkpoint_written_before_a_model_field_existed(trained, tmp_path):
    """A checkpoint whose config.json lacks a field added since (here the NAL settings) resumes
    with that field's default; it was refused as "nal_negatives = 0 in this run, None"."""
    rows, _ = trained
    out = tmp_path / "m"
    base = ["train", "--rows", rows, "--model", "transact_nal_imp", "--out", out, "--batch-size", "16",
            "--threads", "1", "--no-progress"]
    assert invoke(*base, "--max-steps", "1").exit_code == 0
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for field in ("nal_negatives", "nal_projection"):
        del cfg["model_config"][field]
    cfg_path.write_text(json.dumps(cfg))
    r = invoke(*base, "--max-steps", "2")
    assert r.exit_code == 0, r.output
    assert json.loads(cfg_path.read_text())["model_config"]["nal_negatives"] == 0


def _add_field(path, name: str, value) -> None:
    """Rewrites a row file with ``name`` added to its feature_config metadata."""
    t = pq.read_table(path)
    meta = dict(t.schema.metadata)
    cfg = json.loads(meta[b"feature_config"])
    cfg[name] = value
    meta[b"feature_config"] = json.dumps(cfg).encode()
    pq.write_table(t.replace_schema_metadata(meta), path)


def test_rows_with_a_field_this_code_does_not_know(tmp_path):
    rows = write_rows(tmp_path / "rows.parquet", FCFG)
    _add_field(rows, "k_user", 4)
    with pytest.raises(ValueError, match="'k_user' = 4 is not a FeatureConfig field"):
        read_feature_config(rows)
    r = invoke("train", "--rows", rows, "--model", "wdl", "--out", tmp_path / "m", "--no-progress")
    assert_refused(r, "'k_user' = 4", str(rows))


def test_model_with_a_field_this_code_does_not_know(trained, tmp_path):
    import shutil

    rows, model_dir = trained
    m = shutil.copytree(model_dir, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["feature_config"]["k_user"] = 4
    (m / "config.json").write_text(json.dumps(cfg))
    r = invoke("evaluate", "--model-dir", m, "--rows", rows, "--out", tmp_path / "ev", "--no-progress")
    assert_refused(r, "'k_user' = 4", "config.json")


def test_row_parts_of_different_feature_configs(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    write_synthetic_rows(d / "a.parquet", 8, FCFG, per_request=4, n_users=4, seed=0)
    write_synthetic_rows(d / "b.parquet", 8, OTHER, per_request=4, n_users=4, seed=1)
    with pytest.raises(ValueError, match=r"k_ll = 8 in rows .*a\.parquet, 10 in rows .*b\.parquet"):
        read_feature_config(d)


def test_ablation_variant_of_an_unknown_field_is_refused_before_any_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("ablation", "--rows", tmp_path / "none.parquet", "--out", tmp_path / "out",
               "--variant", "w=transact_nal_imp:nal_wieght=1")
    assert_refused(r, "nal_wieght")
    assert not (tmp_path / "out").exists()
