"""The monitoring loop end to end on a simulated ``tiny`` world.

serve (offline Ranker replay, the /rank code path) a world with an injected interest
shift -> monitor (Evidently report per window, drift rule) -> retrain (a light local
retrain: the served log + labels -> a tiny model -> promoted and packaged into the
BentoML store) -> a second drifted window inside the cooldown does not retrain; the
same days without drift do not trigger; the decision log records every window; the
dashboard workspace holds the project and its panels, and ``transact dashboard`` serves
it on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from transact.model.registry import Registry

DAY = 86_400_000


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    from helpers import bentoml_home
    from transact.components import steps
    from transact.data import schema as S
    from transact.data.io import read_table, table_path
    from transact.data.simulator import DriftConfig, get_profile, simulate
    from transact.model.train import train
    from transact.monitoring.monitor import load_current, load_reference, run_monitor
    from transact.monitoring.replay import log_rows, serve_world
    from transact.monitoring.trigger import DecisionLog, RetrainTrigger
    from transact.serving.served_log import attach_labels, read_served_log

    root = tmp_path_factory.mktemp("monitoring-e2e")
    t0 = time.perf_counter()
    with bentoml_home(root / "bentoml"):
        cfg = get_profile("tiny")
        simulate(cfg, root / "w-none", 0, progress=False)
        shifted = simulate(cfg, root / "w-shift", 0, drift=DriftConfig(kind="interest_shift"), progress=False)
        drift_ts = int(shifted["drift"]["start_ts"])
        req0 = int(shifted["request_start_ts"])

        # the champion: a tiny model trained on the pre-drift rows, promoted and packaged
        ref_rows = root / "reference" / "rows.parquet"
        log_rows(root / "w-none", ref_rows, start_ts=req0 + 2 * DAY, end_ts=drift_ts)
        train(ref_rows, root / "m0", "v2", epochs=1, batch_size=32, max_steps=2, train_end_ts=drift_ts,
              progress=False, num_threads=1)
        registry = Registry(root / "registry")
        registry.promote(root / "m0", {"model": "m0"}, expected=0)
        champion = registry.fetch_model(registry.champion().model_id, root / "champion")
        first = steps.package(str(champion))

        # serving: two drifted days, and the same first day without drift
        serve_world(root / "w-shift", champion, root / "served-shift", start_ts=drift_ts,
                    end_ts=drift_ts + 2 * DAY)
        serve_world(root / "w-none", champion, root / "served-none", start_ts=drift_ts,
                    end_ts=drift_ts + DAY)

        requests = read_table(table_path(root / "w-shift", "requests"), S.REQUESTS)
        retrains = []

        def retrain(ctx):
            """Light retrain: this window's served rows + their labels -> a tiny model -> champion + package."""
            served = read_served_log(root / "served-shift")
            ts = served.column("ts")
            served = served.filter(pc.and_(pc.greater_equal(ts, ctx["start_ts"]), pc.less(ts, ctx["end_ts"])))
            rows = attach_labels(served, requests)
            run = root / "retrain" / ctx["window"].replace(":", "")
            run.mkdir(parents=True)
            pq.write_table(rows, run / "rows.parquet")
            train(run / "rows.parquet", run / "model", "v2", epochs=1, batch_size=32, max_steps=2,
                  train_end_ts=2**62, progress=False, num_threads=1, seed=1)
            registry.promote(run / "model", {"model": "retrained", "window": ctx["window"]}, expected=1)
            pkg = steps.package(str(run / "model"))
            retrains.append(pkg)
            return {"outcome": "packaged", "tag": pkg["tag"], "rows": rows.num_rows}

        reference, ref_heads, ref_info = load_reference(ref_rows, root / "m0")
        current, heads = load_current(root / "served-shift")
        out = root / "monitor"
        trigger = RetrainTrigger(DecisionLog(out / "decisions.jsonl"), mode="local", retrain=retrain,
                                 cooldown_hours=72)
        summary = run_monitor(reference, ref_heads, current, heads, out, trigger=trigger, plot_points=40)
        import bentoml

        tags = sorted(str(m.tag) for m in bentoml.models.list("transact-ranker"))
    return {"root": root, "summary": summary, "first": first, "retrains": retrains, "tags": tags,
            "reference": reference, "ref_heads": ref_heads, "current": current, "heads": heads,
            "drift_ts": drift_ts, "seconds": time.perf_counter() - t0}


def test_drift_triggers_one_retrain_and_the_cooldown_holds_the_second(loop):
    s = loop["summary"]
    actions = [a["action"] for a in s["actions"]]
    assert s["windows"] == 2 and all(a["drift"] for a in s["actions"]), s["actions"]
    assert actions == ["retrain", "cooldown"], s["actions"]
    assert len(loop["retrains"]) == 1
    # the new model is packaged next to the first one, and it is the champion now
    new = loop["retrains"][0]
    assert new["created"] and new["tag"] != loop["first"]["tag"]
    assert set(loop["tags"]) == {loop["first"]["tag"], new["tag"]}
    champ = Registry(loop["root"] / "registry").champion()
    assert champ.generation == 2 and champ.metrics["model"] == "retrained"


def test_decision_log_records_every_window(loop):
    from transact.monitoring.trigger import DecisionLog

    recs = DecisionLog(Path(loop["summary"]["decision_log"])).read()
    assert [r["window"] for r in recs] == [a["window"] for a in loop["summary"]["actions"]]
    first, second = recs
    assert first["action"] == "retrain" and first["retrain"]["tag"] == loop["retrains"][0]["tag"]
    assert second["action"] == "cooldown" and "cooldown" in second["reason"]
    for r in recs:
        sc = r["scores"]
        assert {"drift_share", "columns", "embeddings", "predictions", "prediction_means"} <= set(sc)
        assert set(sc["embeddings"]) == {"cand", "seq"} and set(sc["predictions"]) == set(loop["heads"])
        assert r["reasons"] and Path(r["report"]).exists()
        html = Path(r["report"]).read_text()
        assert "Dataset Drift" in html and "Drift in embeddings" in html and len(html) > 10_000


def test_fast_scores_match_the_report(loop):
    """The benchmark's path (same Evidently tests, no widgets) gives the report's numbers."""
    from transact.monitoring.drift import DriftRule, compute_scores, split_windows
    from transact.monitoring.trigger import DecisionLog

    recs = {r["window"]: r for r in DecisionLog(Path(loop["summary"]["decision_log"])).read()}
    for name, _, _, rows in split_windows(loop["current"], 24):
        fast = compute_scores(loop["reference"], rows, loop["heads"], DriftRule())
        logged = recs[name]["scores"]
        assert fast["drift_share"] == pytest.approx(logged["drift_share"])
        for group in ("columns", "embeddings", "predictions", "prediction_means"):
            assert fast[group].keys() == logged[group].keys()
            for k in fast[group]:
                assert fast[group][k] == pytest.approx(logged[group][k], rel=1e-9, abs=1e-12), (group, k)


def test_stationary_window_does_not_trigger_via_the_cli(loop, tmp_path):
    from typer.testing import CliRunner

    from transact.cli import app

    root = loop["root"]
    out = tmp_path / "monitor-none"
    res = CliRunner().invoke(app, [
        "monitor", "--reference", str(root / "reference" / "rows.parquet"), "--current", str(root / "served-none"),
        "--model", str(root / "m0"), "--out", str(out), "--retrain", "off"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["drift"] is False and recs[0]["action"] == "none", recs
    assert "report:" in res.output and Path(recs[0]["report"]).exists()
    # a bad input is one line and exit code 2
    bad = CliRunner().invoke(app, ["monitor", "--reference", str(tmp_path / "nope"), "--current", str(out)])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_workspace_has_the_project_and_panels(loop):
    from transact.monitoring import dashboard

    d = dashboard.describe(loop["summary"]["workspace"])
    assert d["project"] == dashboard.DEFAULT_PROJECT and d["runs"] == 2
    titles = " | ".join(d["panels"]).lower()
    for word in ("drifted scalar features", "embedding drift", "prediction means"):
        assert word in titles


@pytest.mark.parametrize("where", ["local", "s3"])
def test_transact_dashboard_serves_the_workspace_on_localhost(loop, where, request):
    """The workspace a monitor wrote, from its folder or from the bucket a monitor's ``--out`` published it to."""
    from transact.data import storage
    from transact.monitoring import dashboard

    ws = loop["summary"]["workspace"]
    given = ws
    if where == "s3":
        given = f"{request.getfixturevalue('s3').bucket()}/monitoring/workspace"
        storage.upload_tree(ws, given)
    port = dashboard.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "transact.cli", "dashboard", "--workspace", given,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, ITERATIVE_DO_NOT_TRACK="1"))
    try:
        address, lines = None, []
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and address is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Evidently UI: "):
                address = line.split(": ", 1)[1].strip()
        assert address == f"http://127.0.0.1:{port}", "".join(lines)
        projects = json.loads(urllib.request.urlopen(f"{address}/api/projects", timeout=10).read())
        assert [p["name"] for p in projects] == [dashboard.DEFAULT_PROJECT]
        series = dashboard.panel_series(address, projects[0]["id"], ws)
        for title, values in series.items():  # every panel has a series with one point per window
            assert values and all(len(v) == 2 for v in values), (title, values)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # the UI went down with the command
    with pytest.raises(OSError):  # noqa: PT011 - refused or timed out: any socket error means the UI is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=3)


@pytest.mark.slow
def test_monitor_cli_runs_the_real_retrain_pipeline_locally(loop, tmp_path, monkeypatch):
    """The default local retrain: the KFP `retrain` pipeline (kfp.local) on the drifted world's
    logs, gate, package -- then the cooldown holds the second drifted window (~4-5 min)."""
    import shutil

    from typer.testing import CliRunner

    from helpers import bentoml_home
    from transact.cli import app

    root = loop["root"]
    repo = tmp_path / "feature_repo"
    src = Path(__file__).resolve().parents[2] / "feature_repo"
    shutil.copytree(src, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    out = tmp_path / "monitor"
    monkeypatch.chdir(tmp_path)  # nothing of the retrain may land in the checkout
    with bentoml_home(tmp_path / "bentoml"):
        res = CliRunner().invoke(app, [
            "monitor", "--reference", str(root / "reference" / "rows.parquet"),
            "--current", str(root / "served-shift"), "--model", str(root / "m0"), "--out", str(out),
            "--retrain", "local", "--retrain-source", str(root / "w-shift"),
            "--storage-root", str(tmp_path / "store"), "-p", f"feature_repo={repo}", "-p", "epochs=1"])
        assert res.exit_code == 0, res.output
        import bentoml

        tags = [str(m.tag) for m in bentoml.models.list("transact-ranker")]
    recs = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    assert [r["action"] for r in recs] == ["retrain", "cooldown"], recs
    run = recs[0]["retrain"]
    assert run["mode"] == "local" and run["outcome"].startswith("packaged"), run
    assert run["package"]["tag"] in tags

    champion = Registry(tmp_path / "store" / "registry").champion()
    assert champion is not None and champion.model_id.endswith(run["package"]["tag"].split(":")[1])


def test_the_monitor_reads_the_shipped_log_and_keeps_its_state_on_the_storage_root(loop, s3, tmp_path):
    """On a cluster the monitor is a job in a fresh pod: it reads the served log the service
    shipped to the storage root, and its decision log (the cooldown's memory) and reports live
    there too, so the next run knows what the last one decided."""
    from typer.testing import CliRunner

    from transact.cli import app
    from transact.data import storage
    from transact.serving.shipping import ship_served

    root = loop["root"]
    bucket = s3.bucket()
    shutil.copytree(root / "served-none", tmp_path / "log")
    shipped = ship_served(tmp_path / "log", f"{bucket}/served", source="ranker-0")
    assert shipped["files"] > 0
    storage.put_file(root / "reference" / "rows.parquet", f"{bucket}/reference/rows.parquet")
    args = ["monitor", "--reference", f"{bucket}/reference/rows.parquet", "--current", f"{bucket}/served",
            "--model", str(root / "m0"), "--out", f"{bucket}/monitoring", "--retrain", "off"]
    for run in (1, 2):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert f"to {bucket}/monitoring" in res.output
        # what it names lies in the bucket, never in the run's temporary folder
        assert f"dashboard workspace: {bucket}/monitoring/workspace" in res.output, res.output
        assert f"report: {bucket}/monitoring/" in res.output and "transact-monitor-" not in res.output, res.output
        recs = [json.loads(x) for x in storage.read_bytes(f"{bucket}/monitoring/decisions.jsonl").splitlines()]
        assert len(recs) == run and all(r["action"] == "none" for r in recs), recs  # run 2 appended to run 1's log
    published = storage.download_tree(f"{bucket}/monitoring", tmp_path / "published")
    assert list(published.rglob("*.html")), sorted(p.name for p in published.rglob("*"))  # the drift reports


def test_the_demo_monitoring_pass_reports_calibration_per_window(loop):
    """`make demo`'s monitoring pass joins the drifted world's labels: every window's decision
    carries its calibration per head (it carried none before)."""
    from transact.monitoring.demo import monitoring_pass
    from transact.monitoring.trigger import DecisionLog

    root = loop["root"]
    out = root / "demo-pass"
    summary = monitoring_pass(out, root / "w-none", root / "reference" / "rows.parquet", root / "m0",
                              profile="tiny", days=1, fraction=0.5, warmup_days=0, progress=None)
    recs = DecisionLog(Path(summary["decision_log"])).read()
    assert recs
    for r in recs:
        cal = r["scores"]["calibration"]
        assert cal and cal["labelled_rows"] > 0 and set(cal["heads"]) == set(loop["heads"]), r["scores"]
        assert all(v["rows"] == cal["labelled_rows"] for v in cal["heads"].values()), cal
