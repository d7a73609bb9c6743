"""Data commands: simulate a world, import real logs, log NN features, storage benchmark."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from transact.commands._common import fail_on_user_error


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    @fail_on_user_error
    def simulate(
        profile: str = typer.Option("demo", help="World size: tiny | demo | bench."),
        seed: int = typer.Option(0, help="Same seed, same world (byte for byte)."),
        out: Path = typer.Option(Path("runs/world"), help="Output folder for the parquet tables."),
        drift: str = typer.Option("none", help="Drift to inject: none | interest_shift | new_items."),
        drift_strength: float = typer.Option(1.0, help="Drift strength in [0, 1]."),
        drift_start_day: Optional[int] = typer.Option(None, help="Day the drift starts (default: the profile's evaluation window)."),
        max_users: Optional[int] = typer.Option(None, help="Simulate only the first N users."),
        set_: list[str] = typer.Option([], "--set", help="Override a WorldConfig field, e.g. --set interests_mean=6 "
                                                         "--set dormant_frac=0.5 (repeatable; recorded in world.json)."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Simulate a synthetic world: items, actions, impressions and labelled requests."""
        from dataclasses import replace

        from transact.data.simulator import DriftConfig, get_profile, simulate as run, with_overrides

        cfg = with_overrides(get_profile(profile), set_)
        if max_users is not None:
            cfg = replace(cfg, n_users=max_users)
        drift_cfg = None
        if drift != "none":
            kw = {"kind": drift, "strength": drift_strength}
            if drift_start_day is not None:
                kw["start_day"] = drift_start_day
            drift_cfg = DriftConfig(**kw)
        summary = run(cfg, out, seed=seed, drift=drift_cfg, progress=progress)
        typer.echo(json.dumps(summary.get("rows", summary), indent=2))
        typer.echo(f"world written to {out}")

    @app.command("import-logs")
    @fail_on_user_error
    def import_logs_cmd(
        src: Path = typer.Argument(..., help="Folder with items/actions/impressions/requests (.parquet or .csv)."),
        out: Path = typer.Option(Path("runs/world"), help="Output world folder."),
        eval_fraction: float = typer.Option(0.2, help="Share of the latest requests kept for evaluation."),
        min_ts: Optional[str] = typer.Option(None, help="No event is older than this (ISO date or epoch ms); "
                                                        "recorded in world.json, validation's lower time bound "
                                                        "[default: the source's world.json, else 2010-01-01]."),
        label_window_ms: Optional[int] = typer.Option(None, help="A label's engagement is logged at most this long "
                                                                 "after its request (ms); recorded in world.json "
                                                                 "[default: the source's world.json, else 1 h]."),
    ) -> None:
        """Check a team's own logs against the generic schema and write a world folder."""
        from transact.data.adapter import import_logs
        from transact.data.times import to_epoch_ms

        summary = import_logs(src, out, eval_fraction,
                              min_ts=None if min_ts is None else to_epoch_ms(min_ts, "--min-ts"),
                              label_window_ms=label_window_ms)
        typer.echo(json.dumps(summary, indent=2))

    @app.command("seal-world")
    @fail_on_user_error
    def seal_world_cmd(
        world: Path = typer.Argument(..., help="World folder whose tables were written by hand."),
    ) -> None:
        """Write the manifest.json of a world folder (validates nothing: run `transact validate` next)."""
        from transact.data.world import seal_world

        manifest = seal_world(world)
        rows = {n: e["rows"] for n, e in manifest["tables"].items()}
        typer.echo(json.dumps(rows, indent=2))
        typer.echo(f"sealed {world} ({len(rows)} tables{', world.json' if manifest['world_json'] else ''})")

    @app.command("log-nn")
    @fail_on_user_error
    def log_nn(
        world: Path = typer.Option(Path("runs/world"), help="World folder (simulated or imported)."),
        out: Optional[Path] = typer.Option(None, help="Row file (default: <world>/nn_rows.parquet)."),
        batch_requests: int = typer.Option(256, help="Requests per de-duplicated batch."),
        ll_cap: int = typer.Option(16_384, help="L_LL, lifelong sequence cap."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Build the NN-feature training rows (one per request x candidate)."""
        from transact.model.nn_logging import log_nn_features
        from transact.model.config import FeatureConfig

        out = out or world / "nn_rows.parquet"
        summary = log_nn_features(world, out, FeatureConfig(ll_cap=ll_cap), batch_requests, progress)
        typer.echo(f"{summary['rows']:,} rows from {summary['requests']:,} requests "
                   f"in {summary['seconds']:.1f} s -> {out}")

    @bench_app.command("storage")
    @fail_on_user_error
    def bench_storage_cmd(
        examples: int = typer.Option(64, help="Examples written each way."),
        ll_cap: int = typer.Option(16_384, help="L_LL of the full sequences."),
        world: Optional[Path] = typer.Option(None, help="Draw token embeddings from this world's items."),
        out: Path = typer.Option(Path("bench/results/storage.json"), help="JSON result path."),
    ) -> None:
        """Bytes per training example: logged NN features vs full sequences."""
        from transact.bench.storage import bench_storage, format_storage, write_json
        from transact.model.config import FeatureConfig

        result = bench_storage(examples, FeatureConfig(ll_cap=ll_cap), world)
        typer.echo(format_storage(result))
        typer.echo(f"written {write_json(result, out)}")
