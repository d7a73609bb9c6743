"""The training pipeline run locally (kfp.local, one subprocess per step) on the tiny world.

Three runs share one folder: a first run packages a champion; a second run whose
challenger is an untrained model (1 step at a vanishing learning rate) must be stopped
by the gate; a corrupted batch must stop before training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from transact.pipelines.runner import run_local

pytestmark = pytest.mark.slow

FAST = dict(profile="tiny", seed=0, epochs=1, batch_size=64, max_steps=30)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A run folder; the BentoML store of these runs lives inside it."""
    root = tmp_path_factory.mktemp("pipe")
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    yield root
    if old is None:
        os.environ.pop("BENTOML_HOME", None)
    else:
        os.environ["BENTOML_HOME"] = old


def _params(root: Path, **kw) -> dict:
    return {**FAST, "quarantine_dir": str(root / "quarantine"), "reference": str(root / "reference.json"),
            "feature_repo": str(root / "feature_repo"), "champion_dir": str(root / "champion"), **kw}


def test_full_run_packages_then_worse_challenger_is_not_packaged(env):
    first = run_local("training", env / "run1", **_params(env))
    assert first["outcome"].startswith("packaged"), first["outcome"]
    assert all(s["ran"] for s in first["steps"].values())
    assert first["metrics"]["hit"]["repin"]["value"] > 0
    champion = env / "champion" / "model" / "model.safetensors"
    assert champion.exists() and first["package"]["tag"].startswith("transact-ranker:")
    summary_md = (env / "run1" / "summary.md").read_text()
    assert "packaged" in summary_md and "| repin |" in summary_md
    before = champion.read_bytes()

    second = run_local("training", env / "run2", **_params(env, max_steps=1, lr=1e-9, gate_tolerance=0.0))
    assert second["gate"] == "fail", second["outcome"]
    assert not second["steps"]["package-op"]["ran"]
    assert second["outcome"].startswith("stopped: the challenger")
    assert champion.read_bytes() == before  # the champion is untouched
    gate_report = Path(second["reports"]["gate-op"]).read_text()
    assert "FAIL" in gate_report and "regressed" in gate_report


def test_corrupted_batch_stops_before_training(env, tmp_path):
    from transact.validation.corruption import corrupt
    from transact.data.simulator import get_profile, simulate

    src = tmp_path / "logs"
    simulate(get_profile("tiny"), src, seed=1, progress=False)
    corrupt(src, "future_timestamps", seed=0)
    run = run_local("training", env / "run3", **_params(env, source=str(src)))
    assert run["validation"] == "fail"
    assert run["outcome"].startswith("stopped: validation failed")
    for step in ("features-op", "log-nn-op", "train-op", "package-op"):
        assert not run["steps"][step]["ran"], step
    quarantined = list((env / "quarantine").iterdir())
    assert quarantined, "the bad batch must be in quarantine"
    report = Path(run["reports"]["validate-op"]).read_text()
    assert "ts in range" in report
