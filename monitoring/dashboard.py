"""The Evidently UI workspace: one project, one run (snapshot) per monitoring window.

:func:`ensure_project` creates (or finds, and brings up to date) the project and its
panels, the monitor's decision first (:mod:`~transact.monitoring.verdict` puts it into
every run):

- text: the monitor's decision rule, with the thresholds in force;
- bar: the monitor's decision per window (1 = drift), and a line of how many criteria fired;
- line: history-match drift over time (``ValueDrift`` of the candidate-history similarities);
- line: embedding drift over time (``EmbeddingsDrift``: classifier ROC AUC, cand and seq);
- line: prediction drift over time (``ValueDrift`` of each head's prediction);
- line: Evidently's share rule -- the share of drifted scalar features (``DriftedColumnsCount``),
  one criterion of the monitor's, labelled as such;
- line: prediction means over time (``MeanValue`` of each head's prediction);
- line (when labels are joined, ``transact monitor --labels``): calibration -- predicted vs
  observed rate per head on each window's labelled rows (``MeanValue`` of the
  ``calibration_predicted_<head>``/``calibration_observed_<head>`` metrics
  :mod:`~transact.monitoring.verdict` adds); a later run without labels keeps the panel after
  ours, as it keeps any panel it does not lay out;
- bar: rows per window (``RowCount``).

:func:`serve` starts ``evidently ui --workspace PATH`` on 127.0.0.1 as a child process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")

DEFAULT_PROJECT = "TransAct drift monitoring"
#: the calibration panel's title (labelled as calibration, not drift)
CALIBRATION_PANEL = "Calibration: predicted vs observed rate per head (labelled rows; not drift)"
MATCH_COLUMNS = ("sim_ll_nn", "sim_rt_nn", "sim_rt_recent", "sim_max")
HEADS = ("click", "repin", "hide")


def open_workspace(path: str | Path):
    """The local workspace at ``path`` (created when missing)."""
    from evidently.ui.workspace import Workspace

    Path(path).mkdir(parents=True, exist_ok=True)
    return Workspace.create(str(path))


#: Titles earlier versions of :func:`panels` used: replaced, not kept beside the new ones.
_OLD_TITLES = frozenset({"Drifted scalar features (last window)", "Share of drifted scalar features",
                         "History match drift (normed Wasserstein)", "Embedding drift (classifier ROC AUC)",
                         "Prediction drift (normed Wasserstein)"})


def panels(heads=HEADS, rule=None, calibration: bool = False) -> list:
    """The project's dashboard panels (module docstring); ``rule``: the DriftRule in force;
    ``calibration``: labels are joined (the calibration panel; without labels it would be
    an empty panel)."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, line_plot_panel, text_panel

    from transact.monitoring.drift import DriftRule
    from transact.monitoring.verdict import rule_text

    rule = rule or DriftRule()

    def mean(column: str, legend: str):
        return PanelMetric(legend=legend, metric="MeanValue", metric_labels={"column": column})

    share = PanelMetric(legend="share", metric="DriftedColumnsCount", metric_labels={"value_type": "share"})
    calibration_panel = [line_plot_panel(title=CALIBRATION_PANEL, values=[
        mean(f"calibration_{side}_{h}", f"{side} {h}") for h in heads for side in ("predicted", "observed")],
        description="mean predicted probability and observed rate of each head on the window's labelled "
                    "rows (`transact monitor --labels`); calibration, not drift"
                    + (f" -- a criterion when the gap / observed > {rule.calibration_gap:.0%}"
                       if rule.calibration_gap is not None else ""))] if calibration else []
    return [
        text_panel(title="Monitor's decision rule (what `transact monitor` decides per window)",
                   description=rule_text(rule)),
        bar_plot_panel(title="Monitor's decision per window (1 = drift, 0 = no drift)", size="half",
                       values=[mean("monitor_drift", "drift")]),
        line_plot_panel(title="Monitor's criteria fired per window", size="half",
                        values=[mean("monitor_criteria_fired", "criteria fired")],
                        description="scalar share, history match, embedding (cand, seq), prediction (per head)"),
        line_plot_panel(title="History match drift (normed Wasserstein): a criterion of the monitor", values=[
            PanelMetric(legend=c, metric="ValueDrift", metric_labels={"column": c}) for c in MATCH_COLUMNS],
            description=f"drift when at least {rule.match_share:.0%} of them are >= {rule.match_threshold}"),
        line_plot_panel(title="Embedding drift (classifier ROC AUC): a criterion of the monitor", values=[
            PanelMetric(legend=f"{name} embedding", metric="EmbeddingsDrift",
                        metric_labels={"embeddings_name": name}) for name in ("cand", "seq")],
            description=f"drift when cand > {rule.embedding_threshold} or seq > {rule.seq_embedding_threshold}; "
                        "0.5 = reference and window indistinguishable"),
        line_plot_panel(title="Prediction drift (normed Wasserstein): a criterion of the monitor", values=[
            PanelMetric(legend=h, metric="ValueDrift", metric_labels={"column": f"pred_{h}"}) for h in heads],
            description=f"drift when a head is >= {rule.pred_threshold}"),
        line_plot_panel(title="Evidently's share rule, not the monitor's decision: share of drifted scalar "
                              "features", values=[share],
                        description=f"the monitor's scalar-share criterion (drift when >= {rule.drift_share:.0%}); "
                                    "Evidently's 'Dataset Drift' verdict is this alone"),
        line_plot_panel(title="Prediction means", size="half", values=[
            mean(f"pred_{h}", f"p({h})") for h in heads]),
        *calibration_panel,
        bar_plot_panel(title="Rows per window", size="half",
                       values=[PanelMetric(legend="rows", metric="RowCount", metric_labels={})]),
    ]


def ensure_project(workspace, name: str = DEFAULT_PROJECT, heads=HEADS, rule=None, calibration: bool = False):
    """The project called ``name``, created when missing; an existing project's dashboard is
    laid out again when it differs from :func:`panels` (the monitor's decision first, the
    rule in force), keeping any panel someone added by hand after ours."""
    from evidently.sdk.models import DashboardModel, DashboardTabModel

    wanted = panels(heads, rule, calibration)
    found = workspace.search_project(name)
    if not found:
        project = workspace.create_project(name)
        project.description = ("Served logs vs the training reference, one run per monitoring window: the "
                               "monitor's decision and the numbers it used, embedding drift, predictions.")
        project.save()
    else:
        project = found[0]
    have = workspace.get_dashboard(project.id)
    ours = {p.title for p in wanted} | _OLD_TITLES
    kept = [p for p in have.panels if p.title not in ours]
    if [(p.title, p.subtitle) for p in have.panels] != [(p.title, p.subtitle) for p in wanted + kept]:
        keep = {p.id for p in kept}
        tabs = list(have.tabs) or [DashboardTabModel(title="General", panels=[])]
        first = DashboardTabModel(id=tabs[0].id, title=tabs[0].title,
                                  panels=[p.id for p in wanted] + [i for i in tabs[0].panels if i in keep])
        others = [DashboardTabModel(id=t.id, title=t.title, panels=[i for i in t.panels if i in keep])
                  for t in tabs[1:]]
        workspace.save_dashboard(project.id, DashboardModel(tabs=[first, *others], panels=wanted + kept))
    return project


def add_window(workspace, project, snapshot, name: str) -> str:
    """Adds one window's snapshot as a run of the project; returns the run id."""
    ref = workspace.add_run(project.id, snapshot, include_data=False, name=name)
    return str(ref.id)


def describe(path: str | Path, name: str = DEFAULT_PROJECT) -> dict:
    """{"project", "project_id", "panels": [titles], "runs": n} of a workspace's project."""
    ws = open_workspace(path)
    found = ws.search_project(name)
    if not found:
        return {"project": None, "panels": [], "runs": 0}
    project = found[0]
    model = ws.get_dashboard(project.id)
    titles = [p.title for p in model.panels]
    return {"project": project.name, "project_id": str(project.id), "panels": titles,
            "runs": len(ws.list_runs(project.id))}


def panel_series(address: str, project_id: str, workspace: str | Path) -> dict[str, list]:
    """{panel title: [series values...]} as the running UI serves them to its dashboard
    (``/api/v2/snapshots/<project>/data_series_batch``): what each plotting panel would
    draw (text panels draw no series and are left out)."""
    import json
    import urllib.request

    dash = open_workspace(workspace).get_dashboard(project_id)
    out: dict[str, list] = {}
    for panel in dash.panels:  # one request per panel, as the UI does
        filters = [{"tags": v.tags, "metadata": v.metadata, "metric": v.metric, "metric_labels": v.metric_labels}
                   for v in panel.values]
        if not filters:  # a text panel
            continue
        req = urllib.request.Request(f"{address}/api/v2/snapshots/{project_id}/data_series_batch",
                                     data=json.dumps({"series_filter": filters}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            data = json.loads(r.read())
        out[panel.title] = [s["values"] for s in data.get("series", [])]
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ui_command(workspace: str | Path, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """``evidently ui`` for this Python (the console script of the same environment)."""
    exe = Path(sys.executable).with_name("evidently")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "evidently"]
    return base + ["ui", "--workspace", str(workspace), "--host", host, "--port", str(port)]


def serve(workspace: str | Path, host: str = "127.0.0.1", port: int = 8000, wait_s: float = 60.0,
          log_path: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """Starts the Evidently UI on ``workspace``; returns (process, address) once it answers.

    The caller stops it (``proc.terminate()``). Raises RuntimeError when it does not answer
    within ``wait_s`` seconds (the process is stopped then)."""
    import urllib.request

    Path(workspace).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ITERATIVE_DO_NOT_TRACK="1")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(ui_command(workspace, host, port), stdout=out, stderr=subprocess.STDOUT, env=env)
    address = f"http://{host}:{port}"
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"evidently ui exited with code {proc.returncode}"
                                   + (f"; see {log_path}" if log_path else ""))
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return proc, address
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"evidently ui did not answer on {address} within {wait_s:g} s")
    except BaseException:  # not answering, or interrupted while waiting: do not leave it behind
        stop(proc)
        raise


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminates the UI process (kills it when it does not stop in ``timeout`` s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
