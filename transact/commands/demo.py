"""``transact demo`` (``make demo``): the training pipeline, run locally on the ``demo`` world.

Everything lands under one run folder, which is also the pipeline's storage root: the
pipeline's artefacts (``pipeline/``), the Feast repo of this run (``feature_repo/``), the
validation reference and quarantine, and the model registry (``registry/``: the champion).
A re-run reuses the world (same profile and seed) and gates the new model against the
champion of the previous run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error

#: Optimiser steps of the demo's training run: a time budget for 2 CPU cores; the
#: learning-rate schedule is laid over it (see ``train(step_budget=...)``).
DEMO_STEPS = 200


def run_demo(out: Path, profile: str = "demo", seed: int = 0, steps: int = DEMO_STEPS, **overrides) -> dict:
    """The pipeline with one status line per step on the screen (each step's whole output is
    in ``<out>/logs/<step>.log``), then the results and where everything is. ``overrides``
    are further pipeline parameters (tests make the run cheaper with them)."""
    from transact.pipelines.runner import run_local

    out = Path(out).resolve()
    params = {**dict(profile=profile, seed=seed, epochs=1, max_steps=steps, storage_root=str(out)), **overrides}
    typer.secho(f"running the training pipeline locally on the '{profile}' world -> {out}", bold=True)
    summary = run_local("training", out, live=sys.stdout, **params)
    _print_results(summary, out)
    if summary.get("package"):
        summary["monitoring"] = _monitoring_pass(out, summary, profile, seed)
        (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _monitoring_pass(out: Path, s: dict, profile: str, seed: int) -> dict:
    """Serves a day of the same world with an injected interest shift through the real
    ranker (5% of its requests), then runs the drift monitor (retraining off)."""
    from transact.monitoring.demo import monitoring_pass

    typer.secho("\n== monitoring pass: serve a drifted day, compare with the training reference", bold=True)
    run = Path(s["run"])
    m = monitoring_pass(out / "monitoring", run / "ingest-op" / "world", run / "log-nn-op" / "rows" / "nn_rows.parquet",
                        s["package"]["champion"], profile=profile, seed=seed, days=1, fraction=0.05,
                        progress=typer.echo)
    typer.echo(f"  drift report (HTML)     {m.get('last_report')}")
    typer.echo(f"  dashboard workspace     {m.get('workspace')}")
    typer.echo(f"  open the dashboard:     .venv/bin/transact dashboard --workspace {m.get('workspace')}")
    return m


def _print_results(s: dict, out: Path) -> None:
    typer.secho("\n" + "=" * 78, bold=True)
    typer.secho(f"outcome: {s['outcome']}  ({s['seconds']:.0f} s)", bold=True)
    if s.get("metrics"):
        from transact.model.evaluate import format_metrics

        typer.echo("\nHIT@3 on the evaluation window (the last days of the world):\n")
        typer.echo(format_metrics(s["metrics"]))
    typer.echo("\nwhere things are:")
    rows = [("run summary", out / "summary.md"), ("pipeline artefacts", s["run"]),
            ("step logs", s.get("logs"))]
    rows += [(f"report: {k.removesuffix('-op')}", v) for k, v in s.get("reports", {}).items()]
    if s.get("package"):
        rows += [("champion model", s["package"].get("champion")),
                 ("model registry", s["package"].get("registry")),
                 ("bento model tag", s["package"].get("tag"))]
    for name, path in rows:
        typer.echo(f"  {name:<22} {path}")
    if s.get("package"):
        tag = s["package"].get("tag", "transact-ranker:latest")
        world = Path(s["run"]) / "ingest-op" / "world"
        typer.echo("\nserve it and rank:")
        typer.echo(f"  .venv/bin/transact serve --model {tag} --world {world}")
        from transact.serving.launch import sample_curl

        typer.echo(f"  {sample_curl()}")
    (out / "demo.json").write_text(json.dumps(s, indent=2, default=str))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    @fail_on_user_error
    def demo(
        out: Path = typer.Option(Path("runs/demo"), help="Run folder for every artefact."),
        profile: str = typer.Option("demo", help="World profile."),
        seed: int = typer.Option(0, help="Seed of the world and of training."),
        steps: int = typer.Option(DEMO_STEPS, help="Training steps (time budget on small machines)."),
    ) -> None:
        """Run the training pipeline locally; print HIT@3 and where everything is."""
        summary = run_demo(out, profile=profile, seed=seed, steps=steps)
        if not summary["outcome"].startswith(("packaged", "stopped: the challenger")):
            raise typer.Exit(1)
