"""The training pipeline run locally (kfp.local, one subprocess per step) on the tiny world.

Three runs share one folder: a first run (``transact demo``'s code path, ``run_demo``)
packages a champion and must show a compact screen, one status line per step, with every
step's output in ``logs/<step>.log``; a second run whose challenger is an untrained model
(1 step at a vanishing learning rate) must be stopped by the gate; a corrupted batch must
stop before training.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from transact.data import storage
from transact.model.registry import Registry
from transact.pipelines.runner import STEP_ORDER, run_local

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


@contextlib.contextmanager
def a_fresh_pod_for_each_step(pods: Path):
    """Each step as a cluster runs it: started in an empty working folder, with an empty HOME and
    a BentoML home of its own (nothing one step leaves on its disk reaches the next); yields the
    list of the pods' folders. kfp.local runs one task at a time, so the environment it hands the
    task's subprocess can be set just before."""
    from transact.pipelines.kfp_task_hook import around_each_task

    made: list[Path] = []

    def wrap(name, run):
        pod = pods / f"{len(made):02d}-{name}"
        made.append(pod)
        for sub in ("cwd", "home", "bentoml"):
            (pod / sub).mkdir(parents=True)
        saved, cwd = {k: os.environ.get(k) for k in ("HOME", "BENTOML_HOME")}, os.getcwd()
        os.environ.update(HOME=str(pod / "home"), BENTOML_HOME=str(pod / "bentoml"))
        os.chdir(pod / "cwd")
        try:
            return run()
        finally:
            os.chdir(cwd)
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    with around_each_task(wrap):
        yield made


def _params(root: Path, **kw) -> dict:
    return {**FAST, "storage_root": str(root), **kw}


def test_full_run_packages_then_worse_challenger_is_not_packaged(env, capfd):
    from transact.commands.demo import run_demo

    first = run_demo(env, profile="tiny", seed=0, steps=FAST["max_steps"], batch_size=FAST["batch_size"])
    assert first["outcome"].startswith("packaged"), first["outcome"]
    assert all(s["ran"] for s in first["steps"].values())
    assert first["metrics"]["hit"]["repin"]["value"] > 0
    registry = Registry(env / "registry")
    champion = registry.champion()
    assert champion is not None and champion.generation == 1 and champion.action == "promote"
    assert first["package"]["tag"].startswith("transact-ranker:")
    assert first["package"]["tag"].split(":")[1] == champion.model_id.rsplit("-", 1)[1]
    assert champion.lineage["run_id"] and champion.lineage["rows_count"] > 0 and champion.lineage["version"]
    assert champion.metrics["hit"] == first["metrics"]["hit"]
    summary_md = (env / "summary.md").read_text()
    assert "packaged" in summary_md and "| repin |" in summary_md and str(env / "logs") in summary_md
    docs = first["reports"]["validate-op data docs"]  # the GX Data Docs site, linked from the summary
    assert Path(docs).name == "index.html" and Path(docs).exists() and docs in summary_md
    _assert_compact_screen(capfd.readouterr(), env / "logs")

    screen = io.StringIO()
    second = run_local("training", env / "run2", live=screen,
                       **_params(env, max_steps=1, lr=1e-9, gate_tolerance=0.0))
    assert second["gate"] == "fail", second["outcome"]
    assert not second["steps"]["package-op"]["ran"]
    assert second["outcome"].startswith("stopped: the challenger")
    assert registry.history() == [champion]  # the champion is untouched
    gate_report = Path(second["reports"]["gate-op"]).read_text()
    assert "FAIL" in gate_report and "regressed" in gate_report
    assert re.search(r"^  gate-op +ok +[\d.]+ s  FAIL: .*regressed", screen.getvalue(), re.M), screen.getvalue()
    assert re.search(r"^  package-op +skipped$", screen.getvalue(), re.M), screen.getvalue()


def _assert_compact_screen(screen, logs: Path) -> None:
    """One status line per step with its time and result, the demo's summary, and none of
    kfp.local's executor output or warnings (they are in the step logs)."""
    text = screen.out + screen.err
    lines = text.splitlines()
    for step in STEP_ORDER:
        status = [ln for ln in lines if re.match(rf"^  {step} +ok +\d+\.\d s  \S", ln)]
        assert len(status) == 1, (step, text)
        log = (logs / f"{step}.log").read_text()
        assert "KFP Executor" in log and "executor_input" in log, step
    assert re.search(r"evaluate-op .*HIT@3 click \d", text), text
    for noise in ("KFP Executor", "executor_input", "RuntimeWarning", "UserWarning", "have no effect",
                  "Streamed logs", '"inputs"'):
        assert noise not in text, (noise, text)
    assert len(lines) < 60, text
    assert "RuntimeWarning" in (logs / "ingest-op.log").read_text()  # the base-image warning is kept there
    assert f"step logs              {logs}" in text


def test_corrupted_batch_stops_before_training(env, tmp_path):
    from transact.data.simulator import get_profile, simulate
    from transact.validation.corruption import corrupt

    src = tmp_path / "logs"
    simulate(get_profile("tiny"), src, seed=1, progress=False)
    corrupt(src, "future_timestamps", seed=0)
    screen = io.StringIO()
    run = run_local("training", env / "run3", live=screen, **_params(env, source=str(src)))
    assert run["validation"] == "fail"
    assert run["outcome"].startswith("stopped: validation failed")
    for step in ("features-op", "log-nn-op", "train-op", "package-op"):
        assert not run["steps"][step]["ran"], step
    quarantined = list((env / "quarantine").iterdir())  # under the storage root
    assert quarantined, "the bad batch must be in quarantine"
    report = Path(run["reports"]["validate-op"]).read_text()
    assert "ts in range" in report
    assert re.search(r"^  validate-op +ok +[\d.]+ s  FAIL: .*quarantine", screen.getvalue(), re.M), screen.getvalue()
    for step in ("features-op", "log-nn-op", "train-op", "package-op"):
        assert re.search(rf"^  {step} +skipped$", screen.getvalue(), re.M), screen.getvalue()


def test_runs_on_an_object_store_root_share_one_champion_and_leave_nothing_on_the_pod(s3, tmp_path, monkeypatch):
    """The cluster path on one machine: every step a subprocess started in an empty folder of its
    own with an empty HOME and its own BentoML home (:func:`a_fresh_pod_for_each_step`), the
    storage root a bucket on a real S3-protocol server.
    Run 1 promotes; run 2 (an untrained challenger) is gated against run 1's champion, read from
    the bucket; a fresh BentoML home imports the champion from there. Nothing lands in the
    working folder (no local ``s3:`` folder, no ``runs/``)."""
    from transact.serving.packaging import import_champion, local_stores

    bucket = s3.bucket()
    root = f"{bucket}/transact"
    pod = tmp_path / "pod"
    pod.mkdir()
    monkeypatch.chdir(pod)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml-pod"))
    with a_fresh_pod_for_each_step(tmp_path / "pods") as pods:
        first = run_local("training", tmp_path / "run1", **{**FAST, "storage_root": root})
    assert {p.name.split("-", 1)[1] for p in pods} >= {"train-op", "package-op", "gate-op"}, pods
    assert first["outcome"].startswith("packaged"), first["outcome"]
    registry = Registry(f"{root}/registry")
    champion = registry.champion()
    assert champion is not None and champion.generation == 1
    assert first["package"]["registry"] == f"{root}/registry" and first["package"]["exported"].startswith(root)
    assert storage.exists(f"{root}/validation/reference.json")
    assert storage.exists(f"{root}/feature_repo/CURRENT.json")  # the Feast repo, published whole

    with a_fresh_pod_for_each_step(tmp_path / "pods-2") as pods_2:
        second = run_local("training", tmp_path / "run2",
                           **{**FAST, "storage_root": root, "max_steps": 1, "lr": 1e-9, "gate_tolerance": 0.0})
    assert second["gate"] == "fail", second["outcome"]
    gate_report = Path(second["reports"]["gate-op"]).read_text()
    assert f"vs champion {first['metrics']['hit']['repin']['value']:.4f}" in gate_report, gate_report
    assert registry.history() == [champion]

    with local_stores(tmp_path / "fresh-machine"):
        assert import_champion(registry.root) == first["package"]["tag"]
    assert list(pod.iterdir()) == []
    for p in pods + pods_2:  # nothing a step needs later was left on its own disk: each left nothing there
        assert list((p / "cwd").iterdir()) == [], p
