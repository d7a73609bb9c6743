"""Run a pipeline locally, compile it to KFP IR YAML, or submit it to a Kubeflow cluster.

Locally (the embedded default) every component runs as a subprocess of this Python
environment (``kfp.local.SubprocessRunner(use_venv=False)``: no network, no image),
and every artefact stays under ``<run_dir>/pipeline/``; ``<run_dir>/summary.md`` says
what happened in words.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

#: Parameters that are paths on the machine running the steps (made absolute locally).
PATH_PARAMS = ("quarantine_dir", "feature_repo", "champion_dir", "source", "reference")


def _pipeline(name: str):
    from transact.pipelines.training import PIPELINES

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    return PIPELINES[name]


def compile_pipeline(name: str, out: str | Path) -> Path:
    """Writes the pipeline's KFP IR YAML to ``out``."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(_pipeline(name), str(out))
    return out


def run_local(name: str = "training", run_dir: str | Path = "runs/pipeline", **params) -> dict:
    """Runs the pipeline here; returns the summary (also ``<run_dir>/summary.json``/``.md``)."""
    from kfp import local

    run_dir = Path(run_dir).resolve()
    root = run_dir / "pipeline"
    root.mkdir(parents=True, exist_ok=True)
    for key in PATH_PARAMS:
        if params.get(key):
            params[key] = str(Path(params[key]).resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=False)
    before = {p.name for p in root.iterdir()}
    t0 = time.perf_counter()
    _pipeline(name)(**params)
    seconds = time.perf_counter() - t0
    new = sorted(p for p in root.iterdir() if p.name not in before)
    if not new:
        raise RuntimeError(f"the local run left no output under {root}")
    summary = summarize_run(new[-1], seconds, params)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_dir / "summary.md").write_text(summary_markdown(summary))
    return summary


def _task_output(task_dir: Path, key: str = "Output"):
    f = task_dir / "executor_output.json"
    if not f.exists():
        return None
    data = json.loads(f.read_text())
    return data.get("parameterValues", {}).get(key)


STEP_ORDER = ("ingest-op", "validate-op", "features-op", "log-nn-op", "train-op", "evaluate-op",
              "gate-op", "package-op")


def summarize_run(run_root: Path, seconds: float, params: dict) -> dict:
    """Which steps ran, what they decided and where their artefacts are."""
    steps = {}
    for step in STEP_ORDER:
        d = run_root / step
        ran = (d / "executor_output.json").exists()
        steps[step] = {"ran": ran, "dir": str(d) if d.exists() else None}
    validate = _task_output(run_root / "validate-op")
    gate = _task_output(run_root / "gate-op")
    evaluation = _task_output(run_root / "evaluate-op")
    package = _task_output(run_root / "package-op")
    if validate == "fail":
        outcome = "stopped: validation failed (the batch is in quarantine; see the validation report)"
    elif not steps["ingest-op"]["ran"] or (validate is None):
        outcome = "failed before validation (see the step logs above)"
    elif gate == "fail":
        outcome = "stopped: the challenger did not pass the gate; nothing packaged"
    elif package is not None:
        outcome = "packaged: the new model is the champion"
    else:
        failed = next((s for s in STEP_ORDER if not steps[s]["ran"]), "?")
        outcome = f"failed at {failed} (see the step logs above)"
    return {
        "run": str(run_root), "seconds": round(seconds, 1), "params": params, "outcome": outcome,
        "steps": steps, "validation": validate, "gate": gate,
        "metrics": json.loads(evaluation) if evaluation else None,
        "package": json.loads(package) if package else None,
        "reports": {s: str(p) for s in ("validate-op", "evaluate-op", "gate-op")
                    if (p := run_root / s / "report").exists()},
    }


def summary_markdown(s: dict) -> str:
    lines = [f"# Pipeline run `{Path(s['run']).name}`", "", f"**Outcome:** {s['outcome']}", "",
             f"Took {s['seconds']} s.", "", "| step | ran |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v['ran'] else 'no'} |" for k, v in s["steps"].items()]
    if s.get("metrics"):
        lines += ["", "## HIT@3", "", "| action | HIT@3 | 95% CI |", "|---|---|---|"]
        for a, v in s["metrics"]["hit"].items():
            lines.append(f"| {a} | {v['value']:.4f} | [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] |")
    if s.get("reports"):
        lines += ["", "## Reports", ""] + [f"- {k}: `{v}`" for k, v in s["reports"].items()]
    if s.get("package"):
        lines += ["", "## Package", "", "```", json.dumps(s["package"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def submit(host: str, name: str = "training", params: dict | None = None, experiment: str = "transact",
           namespace: str | None = None, run_name: str | None = None, existing_token: str | None = None,
           enable_caching: bool | None = None):
    """Compiles and submits a run to the Kubeflow Pipelines API at ``host``."""
    import tempfile

    import kfp

    client = kfp.Client(host=host, namespace=namespace, existing_token=existing_token)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(name, Path(tmp) / f"{name}.yaml")
        return client.create_run_from_pipeline_package(
            str(package), arguments=params or {}, run_name=run_name, experiment_name=experiment,
            namespace=namespace, enable_caching=enable_caching)
