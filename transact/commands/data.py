"""Data commands: simulate a world, import real logs, log NN features, storage benchmark."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from transact.commands._common import fail_on_user_error
from transact.data import storage


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    @fail_on_user_error
    def simulate(
        profile: str = typer.Option("demo", help="World size: tiny | demo | bench."),
        seed: int = typer.Option(0, help="Same seed, same world (byte for byte)."),
        out: Path = typer.Option(Path("runs/world"), help="Output folder for the parquet tables."),
        drift: str = typer.Option("none", help="Drift to inject: none | interest_shift | new_items."),
        drift_strength: float = typer.Option(1.0, help="Drift strength in [0, 1]."),
        drift_start_day: int | None = typer.Option(None, help="Day the drift starts "
                                                               "(default: the profile's evaluation window)."),
        max_users: int | None = typer.Option(None, help="Simulate only the first N users."),
        set_: list[str] = typer.Option([], "--set", help="Override a WorldConfig field, e.g. --set interests_mean=6 "
                                                         "--set dormant_frac=0.5 (repeatable; recorded in world.json)."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Simulate a synthetic world: items, actions, impressions and labelled requests."""
        from dataclasses import replace

        from transact.data.overrides import with_overrides
        from transact.data.simulator import DriftConfig, get_profile, simulate as run

        cfg = with_overrides(get_profile(profile), set_)
        if max_users is not None:
            cfg = replace(cfg, n_users=max_users)
        drift_cfg = None
        if drift != "none":
            kw: dict[str, Any] = {"kind": drift, "strength": drift_strength}
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
        min_ts: str | None = typer.Option(None, help="No event is older than this (ISO date or epoch ms); "
                                                        "recorded in world.json, validation's lower time bound "
                                                        "[default: the source's world.json, else 2010-01-01]."),
        label_window_ms: int | None = typer.Option(None, help="A label's engagement is logged at most this long "
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

    @app.command("import-recbole")
    @fail_on_user_error
    def import_recbole_cmd(
        src: Path = typer.Argument(..., help="RecBole atomic-file folder (<name>.inter, optional .item/.user), "
                                             "or the .inter file."),
        out: Path = typer.Option(Path("runs/world"), help="Output world folder."),
        name: str | None = typer.Option(None, help="Data set name, the files' stem (default: the folder's name)."),
        request_days: float = typer.Option(30, help="Requests for the interactions of the last N days "
                                                    "(0: every interaction)."),
        negatives: int = typer.Option(20, help="Sampled negatives per request (point in time)."),
        eval_fraction: float = typer.Option(0.2, help="Share of the latest requests kept for evaluation."),
        seed: int = typer.Option(0, help="Same seed, same requests and positions."),
        max_users: int | None = typer.Option(None, help="Keep only the first N users (by id)."),
        pos_rating: float = typer.Option(4.0, help="rating >= this: click|repin."),
        hide_rating: float = typer.Option(2.0, help="rating <= this: hide (between: click)."),
    ) -> None:
        """Import public data in RecBole's atomic-file format as a world (data/recbole.py: the mapping)."""
        from transact.data.recbole import import_recbole

        summary = import_recbole(src, out, name, request_days=request_days or None, negatives=negatives,
                                 eval_fraction=eval_fraction, seed=seed, max_users=max_users,
                                 pos_rating=pos_rating, hide_rating=hide_rating)
        typer.echo(json.dumps(summary, indent=2))
        typer.echo(f"world written to {out}")

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
        world: str = typer.Option("runs/world", help="World folder (simulated or imported); with --engine ray "
                                                     "also an object-store URI (s3://...)."),
        out: str | None = typer.Option(None, help="Row file, or folder of parts with --engine ray, there also "
                                                     "a URI (default: <world>/nn_rows.parquet, <world>/nn_rows)."),
        batch_requests: int = typer.Option(256, help="Requests per de-duplicated batch."),
        ll_cap: int = typer.Option(16_384, help="L_LL, lifelong sequence cap."),
        feature_config: str | None = typer.Option(None, help="The whole feature contract as JSON "
                                                                "(FeatureConfig fields); overrides --ll-cap."),
        engine: str = typer.Option("local", help="local: one process, one file | ray: users partitioned "
                                                 "by a stable hash, one Ray task per part (docs/scale-out.md)."),
        address: str | None = typer.Option(None, help="Ray cluster (--engine ray): auto | host:port | "
                                                         "http://head:8265 (submitted as a Ray job) "
                                                         "(default: the job's cluster, else a local Ray)."),
        partitions: int | None = typer.Option(None, help="Parts (--engine ray) (default: one per cluster CPU)."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Build the NN-feature training rows (one per request x candidate)."""
        from transact.components.ray_engine import run_log_nn
        from transact.features.config import FeatureConfig

        cfg = (FeatureConfig.from_dict(json.loads(feature_config), where="--feature-config") if feature_config
               else FeatureConfig(ll_cap=ll_cap))
        out = out or storage.join(world, "nn_rows" if engine == "ray" else "nn_rows.parquet")
        where: tuple[str | Path, str | Path] = (world, out)
        if engine != "ray":  # the local engine reads and writes local files (a URI refused, naming the option)
            where = (storage.local_path(world, "--world"), storage.local_path(out, "--out"))
        summary = run_log_nn(*where, cfg, engine, address, partitions, batch_requests, progress)
        typer.echo(f"{summary['rows']:,} rows from {summary['requests']:,} requests "
                   f"in {summary['seconds']:.1f} s -> {out}")

    @app.command("attach-labels")
    @fail_on_user_error
    def attach_labels_cmd(
        served: str = typer.Option(..., help="Served-log folder (served-*.parquet); with --engine ray also a URI."),
        world: str = typer.Option("runs/world", help="World whose requests table holds the labels (ray: or a URI)."),
        out: str = typer.Option(..., help="Training rows: a file, or a folder of parts with --engine ray "
                                          "(there also a URI)."),
        engine: str = typer.Option("local", help="local: joined in memory | ray: parts by request_id on Ray."),
        address: str | None = typer.Option(None, help="Ray cluster (--engine ray) (default: a local Ray)."),
        partitions: int | None = typer.Option(None, help="Parts (--engine ray) (default: one per cluster CPU)."),
    ) -> None:
        """Served NN-feature log + labels -> training rows (the offline rows' layout)."""
        from transact.components.ray_engine import attach_labels_local, attach_labels_ray, ray_session

        if engine == "local":
            summary = attach_labels_local(*(storage.local_path(v, o) for v, o in
                                            ((served, "--served"), (world, "--world"), (out, "--out"))))
        elif engine == "ray":
            with ray_session(address):
                summary = attach_labels_ray(served, world, out, partitions)
        else:
            raise ValueError(f"engine must be local or ray, got {engine!r}")
        typer.echo(f"{summary['rows']:,} rows in {summary['seconds']:.1f} s -> {out}")

    @bench_app.command("scale")
    @fail_on_user_error
    def bench_scale_cmd(
        users: str = typer.Option("500,1000,2000", help="World sizes (users, comma-separated) of the 'bench' profile."),
        days: int = typer.Option(240, help="Days of lifelong history per world (the profile's is 730)."),
        workers: str = typer.Option("1,2", help="Ray worker counts (comma-separated)."),
        ll_cap: int = typer.Option(16_384, help="L_LL, lifelong sequence cap."),
        work_dir: Path = typer.Option(Path("runs/bench-scale"), help="Worlds and rows (kept for re-runs)."),
        out: Path | None = typer.Option(None, help="JSON result path (default: bench/results/scale-<device>.json)."),
        profile: bool = typer.Option(False, "--profile", help="Also time each stage of every run "
                                     "(NN search, sequences, store, S_all assembly, arrow, parquet write; Ray: "
                                     "task-seconds, the map tasks included)."),
    ) -> None:
        """NN-logging throughput and peak RSS per worker: local vs Ray, worlds of growing size."""
        from transact.bench.report import default_output, write_json
        from transact.bench.scale import bench_scale, format_scale

        result = bench_scale([int(u) for u in users.split(",")], [int(w) for w in workers.split(",")
                                                                   if w.strip()],
                             work_dir, days=days, ll_cap=ll_cap, profile=profile)
        typer.echo(format_scale(result))
        typer.echo(f"written {write_json(out or default_output('scale'), result)}")

    @bench_app.command("storage")
    @fail_on_user_error
    def bench_storage_cmd(
        examples: int = typer.Option(64, help="Examples written each way."),
        ll_cap: int = typer.Option(16_384, help="L_LL of the full sequences."),
        world: Path | None = typer.Option(None, help="Draw token embeddings from this world's items."),
        out: Path = typer.Option(Path("bench/results/storage.json"), help="JSON result path."),
    ) -> None:
        """Bytes per training example: logged NN features vs full sequences."""
        from transact.bench.storage import bench_storage, format_storage, write_json
        from transact.features.config import FeatureConfig

        result = bench_storage(examples, FeatureConfig(ll_cap=ll_cap), world)
        typer.echo(format_storage(result))
        typer.echo(f"written {write_json(result, out)}")
