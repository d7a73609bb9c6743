"""``transact demo``: the whole system on the embedded default, end to end."""
from __future__ import annotations

from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    @fail_on_user_error
    def demo(
        out: Path = typer.Option(Path("runs/demo"), help="Run folder for every artefact."),
        profile: str = typer.Option("demo", help="World profile."),
        seed: int = typer.Option(0, help="Seed of the world and of training."),
        steps: int = typer.Option(200, help="Training steps (time budget on small machines)."),
    ) -> None:
        """Run the training pipeline locally; print HIT@3 and where everything is."""
        from transact.components.demo import run_demo

        summary = run_demo(out, profile=profile, seed=seed, steps=steps)
        if not summary["outcome"].startswith(("packaged", "stopped: the challenger")):
            raise typer.Exit(1)
