"""Model registry commands: the champion's history, a rollback, a champion fetched to a folder.

The registry is ``<storage_root>/registry`` of the training pipeline (a folder or an
object-store URI); :mod:`transact.model.registry` says how a change of champion stays safe
when runs race.
"""
from __future__ import annotations

from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error

REGISTRY_HELP = "The model registry: <storage_root>/registry of the pipeline (a folder or an s3://... URI)."


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    registry_app = typer.Typer(help="The model registry: champion history, rollback, fetch.", no_args_is_help=True)
    app.add_typer(registry_app, name="registry")

    @registry_app.command("history")
    @fail_on_user_error
    def history(registry: str = typer.Option(..., help=REGISTRY_HELP)) -> None:
        """Every change of champion, oldest first (the last line is the champion)."""
        from transact.model.registry import Registry

        records = Registry(registry).history()
        if not records:
            typer.echo(f"{registry}: no champion yet")
            return
        typer.echo(f"{'gen':>4}  {'action':<8}  {'model':<28}  {'replaced':<28}  {'HIT@3 repin':>11}  at")
        for r in records:
            repin = r.metrics.get("hit", {}).get("repin", {}).get("value")
            typer.echo(f"{r.generation:>4}  {r.action:<8}  {r.model_id:<28}  {r.previous or '-':<28}  "
                       f"{'' if repin is None else f'{repin:.4f}':>11}  {r.at}")

    @registry_app.command("rollback")
    @fail_on_user_error
    def rollback(registry: str = typer.Option(..., help=REGISTRY_HELP),
                 to: str | None = typer.Option(None, help="Model id to make the champion (default: the model "
                                                          "the current champion replaced)."),
                 ) -> None:
        """Makes an earlier model the champion again (a new generation; nothing is deleted)."""
        from transact.model.registry import Registry

        record = Registry(registry).rollback(to=to)
        typer.echo(f"champion generation {record.generation}: {record.model_id} (was {record.previous}); "
                   f"serve it: transact serve --registry {registry}")

    @registry_app.command("fetch")
    @fail_on_user_error
    def fetch(registry: str = typer.Option(..., help=REGISTRY_HELP),
              out: Path = typer.Option(..., help="Local folder for the model (config.json + model.safetensors)."),
              model: str | None = typer.Option(None, help="Model id (default: the champion)."),
              ) -> None:
        """Copies a registered model (default: the champion) into a local folder, every byte checked."""
        from transact.model.registry import Registry

        reg = Registry(registry)
        if model is None:
            champion = reg.champion()
            if champion is None:
                raise ValueError(f"{registry}: no champion yet")
            model = champion.model_id
        typer.echo(f"{model} -> {reg.fetch_model(model, out)}")
