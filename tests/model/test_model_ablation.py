"""`transact ablation` as a run a person can watch: seed-major order, a partial table after
every run, a step budget that cycles epochs, resume that skips finished runs."""
from __future__ import annotations

import json

import pytest

from helpers import rows_with_split
from transact.features.config import FeatureConfig
from transact.model import ablation as A
from transact.model.calibration import HOLDOUT
from transact.model.dataset import RowDataset
from transact.model.train import holdout_start

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)
KW = dict(baseline="transact", batch_size=32, lr=3e-3, n_boot=20, num_threads=1, progress_every_s=0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return rows_with_split(tmp_path_factory.mktemp("world"), 40, FCFG, n_users=10, seed=1)


def test_run_order_is_seed_major_with_the_baseline_first():
    assert A.run_order(["wdl", "transact", "v2"], "transact", 2) == [
        ("transact", 0), ("wdl", 0), ("v2", 0), ("transact", 1), ("wdl", 1), ("v2", 1)]
    assert A.epochs_for(None, 3, 7) == (3, 21)
    assert A.epochs_for(20, 1, 7) == (3, 20)  # 20 steps: epochs cycled, the third one cut


def test_progress_partial_tables_and_max_steps_cycling_epochs(world, tmp_path):
    lines, snapshots = [], []
    out = tmp_path / "abl"

    def log(s: str) -> None:
        lines.append(s)
        if "Methods" in s:  # a table: what is on disk at this moment
            snapshots.append(json.loads((out / "ablation.json").read_text()))

    train_end = json.loads((world.parent / "world.json").read_text())["train_end_ts"]
    spe = RowDataset(world, "train", train_end_ts=holdout_start(world, train_end, HOLDOUT)).num_batches(32)
    budget = 2 * spe + 3  # more than two epochs: a third one, cut
    res = A.ablation(world, out, models=["wdl", "transact"], seeds=2, max_steps=budget, log=log, **KW)
    # seed-major: the baseline and wdl of seed 0 come before any seed-1 run
    started = [ln.split(":")[0] for ln in lines if ln.startswith("[") and "trained" in ln]
    assert started == ["[1/4] transact seed 0", "[2/4] wdl seed 0", "[3/4] transact seed 1", "[4/4] wdl seed 1"]
    # progress lines name model, seed, step, loss, examples/s and ETAs
    prog = [ln for ln in lines if ": step " in ln]
    assert prog and all(k in prog[0] for k in ("transact seed 0", "loss", "ex/s", "ETA run", "all"))
    assert any(f"step {budget}/{budget}" in ln for ln in prog)
    # a table after every finished run; partial ones are marked, the first comparison after run 2
    assert len(snapshots) == 4
    first = snapshots[0]
    assert first["partial"] and first["runs_finished"] == 1 and first["pending"] == ["wdl"]
    assert list(first["results"]) == ["transact"]
    assert "PARTIAL: 1 of 4 runs" in next(ln for ln in lines if "Methods" in ln)
    second = snapshots[1]
    assert second["partial"] and second["results"]["wdl"]["rel_change"]["repin"] is not None
    assert second["results"]["wdl"]["seeds_done"] == [0] and second["results"]["wdl"]["paired_seeds"] == [0]
    assert not res["partial"] and res["runs_finished"] == 4 and res["pending"] == []
    div = res["results"]["wdl"]["diversity"]  # impression diversity, measured and compared (issue 26)
    assert div["value"] > 0 and div["rel_change"] is not None and "diversity" in A.format_table(res)
    assert "final: 4 runs" in A.format_table(res)
    # the budget is steps: every run trained exactly `budget`, cycling the rows
    for name in ("wdl", "transact"):
        for run in res["results"][name]["runs"]:
            assert run["steps"] == budget and run["epochs"] == pytest.approx(budget / spe, abs=1e-3)
            summary = json.loads((out / name / f"seed{run['seed']}" / "train_summary.json").read_text())
            assert summary["steps"] == summary["total_steps"] == budget and summary["finished"]
    assert res["budget"]["steps_per_run"] == budget and res["budget"]["cycled_epochs"] == 3
    assert any(f"trained {budget} steps" in ln for ln in lines)
    for f in ("ablation.json", "ablation.md", "ablation.png"):
        assert (out / f).stat().st_size > 0


def test_partial_table_renders_and_plots_with_pending_models(world, tmp_path):
    res = A.ablation(world, tmp_path / "one", models=["wdl", "transact"], seeds=1, max_steps=2,
                     log=lambda s: None, **KW)
    partial = {**res, "partial": True, "runs_finished": 1, "pending": ["wdl"],
               "results": {"transact": res["results"]["transact"]}}
    assert "pending: wdl" in A.format_table(partial) and "PARTIAL" in A.format_markdown(partial)
    A.plot(partial, tmp_path / "p.png")  # nothing to compare yet: an empty chart, no error
    assert (tmp_path / "p.png").stat().st_size > 0


def test_resume_skips_finished_runs_and_refuses_other_settings(world, tmp_path, monkeypatch):
    out = tmp_path / "abl"
    kw = dict(models=["wdl", "transact"], seeds=1, max_steps=4, **KW)
    first = A.ablation(world, out, log=lambda s: None, **kw)
    # an interrupted ablation: the second run trained but was not scored
    (out / "wdl" / "seed0" / A.RUN_FILE).unlink()
    trained, lines = [], []
    real_train = A.train
    monkeypatch.setattr(A, "train", lambda *a, **k: trained.append(a[2]) or real_train(*a, **k))
    again = A.ablation(world, out, log=lines.append, **kw)
    assert trained == ["wdl"]  # the finished baseline was read back, not trained again
    assert any("transact seed 0: finished before" in ln for ln in lines)
    assert again["results"]["wdl"]["runs"][0]["steps"] == 4  # resumed at its end: no extra step
    for name in ("wdl", "transact"):
        assert again["results"][name]["hit"] == first["results"][name]["hit"]
    assert again["results"]["wdl"]["rel_change"] == first["results"]["wdl"]["rel_change"]
    trained.clear()
    A.ablation(world, out, log=lambda s: None, **kw)
    assert trained == []  # everything finished: nothing trained or scored
    with pytest.raises(ValueError, match="lr"):
        A.ablation(world, out, log=lambda s: None, **{**kw, "lr": 1e-2})
    # a run finished under another default (w_NAL's changed from 0.01 to 1): same settings, other
    # model -- refused by the field's name, not read back under today's
    cfg_file = out / "transact" / "seed0" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_config"]["nal_weight"] = 0.01
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"nal_weight = 0\.01; this ablation's has nal_weight = 1\.0"):
        A.ablation(world, out, log=lambda s: None, **kw)


def test_variant_specs_parse_and_bad_ones_fail_in_one_line():
    v = A.Variant.parse("imp_w1=transact_nal_imp:nal_weight=1,nal_projection=false,nal_negatives=8")
    assert (v.name, v.base) == ("imp_w1", "transact_nal_imp")
    assert v.overrides == {"nal_weight": 1, "nal_projection": False, "nal_negatives": 8}
    assert v.label == "TransAct (RT sequence) + NAL_imp [nal_weight=1, nal_projection=False, nal_negatives=8]"
    assert A.Variant.parse("x=transact_nal_inbatch:nal=impression").overrides == {"nal": "impression"}
    for spec, msg in [("transact_nal_imp:nal_weight=1", "expected NAME=MODEL"),
                      ("x=nope:nal_weight=1", "unknown model 'nope'"),
                      ("x=transact_nal_imp:", "no FIELD=VALUE"),
                      ("x=transact_nal_imp:nal_weight", "is not FIELD=VALUE"),
                      ("x=transact_nal_imp:no_such_field=1", "no_such_field"),
                      ("x=transact_nal_imp:nal_negatives=-1", "nal_negatives must be >= 0")]:
        with pytest.raises(ValueError, match=msg) as e:
            A.Variant.parse(spec)
        assert "\n" not in str(e.value)


def test_a_variant_trains_its_base_with_its_fields_and_is_paired_and_resumable(world, tmp_path, monkeypatch):
    out = tmp_path / "abl"
    v = A.Variant.parse("imp_w1=transact_nal_imp:nal_weight=1,nal_negatives=2")
    calls = []
    real_train = A.train
    monkeypatch.setattr(A, "train", lambda *a, **k: calls.append((a[2], k["model_overrides"])) or real_train(*a, **k))
    kw = dict(models=["transact"], seeds=1, max_steps=3, **KW)
    res = A.ablation(world, out, log=lambda s: None, variants=[v], **kw)
    assert calls == [("transact", {}), ("transact_nal_imp", {"nal_weight": 1, "nal_negatives": 2})]
    cfg = json.loads((out / "imp_w1" / "seed0" / "config.json").read_text())["model_config"]
    assert cfg["nal_weight"] == 1 and cfg["nal_negatives"] == 2
    row = res["results"]["imp_w1"]
    assert row["label"] == v.label and row["rel_change"]["repin"] is not None  # paired with the baseline
    na = row["next_action"]
    assert na is not None and 0 <= na["top1"] <= 1 and na["loss"] > 0 and 0 < na["chance_top1"] <= 1
    assert res["results"]["transact"]["next_action"] is None  # no NAL head, nothing to score
    md = (out / "ablation.md").read_text()
    assert v.label in md and "top-1" in md and "| log-loss | ECE |" in md
    runs = res["results"]["imp_w1"]["runs"]
    assert row["logloss"] == {h: pytest.approx(runs[0]["logloss"][h]) for h in ("click", "repin", "hide")}
    assert f"{row['ece']['click']:.3f} / {row['ece']['repin']:.3f} / {row['ece']['hide']:.3f}" in md
    calls.clear()
    A.ablation(world, out, log=lambda s: None, variants=[v], **kw)
    assert calls == []  # read back
    other = A.Variant.parse("imp_w1=transact_nal_imp:nal_weight=0.5,nal_negatives=2")
    with pytest.raises(ValueError, match="variant"):
        A.ablation(world, out, log=lambda s: None, variants=[other], **kw)
    with pytest.raises(ValueError, match="registry models"):
        A.ablation(world, out, log=lambda s: None, variants=[A.Variant("v2", "transact", {"nal": "none"})], **kw)


def test_variant_values_must_be_of_their_fields_type():
    """A value of the wrong type is refused by name, never kept as a string that means something
    else ("False" was truthy: the projection stayed on) or fails hours later in training."""
    for spec, msg in [("x=transact_nal_imp:nal_projection=False", None),  # any case of true/false
                      ("x=transact_nal_imp:nal_projection=no", "nal_projection='no' is not a bool"),
                      ("x=transact_nal_imp:nal_weight=\"0.1\"", "is not a float"),
                      ("x=transact_nal_imp:nal_weight=NaN", "is not a float"),
                      ("x=transact_nal_imp:nal_negatives=2.5", "is not a int"),
                      ("x=transact_nal_imp:nal_negatives=true", "is not a int"),
                      ("x=transact_nal_imp:nal_negatives=abc", "is not a int"),
                      ("x=transact_nal_imp:heads=click", "not a setting a variant can change"),
                      ("x=transact_nal_imp:nal=sideways", "nal must be one of"),
                      ("x=transact:nal_weight=1", "change nothing"),
                      ("../x=transact_nal_imp:nal_weight=1", "names a folder")]:
        if msg is None:
            assert A.Variant.parse(spec).overrides == {"nal_projection": False}
            continue
        with pytest.raises(ValueError, match=msg) as e:
            A.Variant.parse(spec)
        assert "\n" not in str(e.value)
    assert A.Variant.parse("x=transact:nal=impression,nal_weight=1e-1").overrides == {"nal": "impression",
                                                                                      "nal_weight": 0.1}
    v = A.Variant.parse("x=transact_nal_imp:nal_weight=1")
    with pytest.raises(ValueError, match="given twice"):
        A.ablation("unused.parquet", "unused", variants=[v, v])


def test_a_diverged_run_leaves_dashes_not_a_crash():
    """NaN numbers of one run (stored as null in run.json) print as '-' on resume."""
    done = {("m", 0): {"logloss": {"click": None}, "ece": {"click": 0.1},
                       "next_action": {"loss": None, "top1": 0.2, "chance_top1": 0.1}, "train_nal": None}}
    assert A._head_means(done, "m", [0], "logloss") is None
    assert A._head_means(done, "m", [0], "ece") == {"click": 0.1}
    assert A._next_action(done, "m", [0]) is None
    assert A._heads({"logloss": None}, "logloss") == "-"
