"""``transact monitor``, ``transact dashboard`` and ``transact bench drift``: Evidently drift
monitoring of served logs, the retrain trigger and its dashboards (``monitoring/``)."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error, parse_params
from transact.commands.pipeline import IMAGE_HELP, SECRET_HELP


def _seeds(spec: str) -> list[int]:
    """"10" -> 0..9; "3-7" -> 3..7; "1,4,9" -> those."""
    spec = spec.strip()
    if "," in spec:
        return [int(s) for s in spec.split(",") if s.strip()]
    if "-" in spec:
        a, b = spec.split("-", 1)
        return list(range(int(a), int(b) + 1))
    return list(range(int(spec)))


def _here(location: str, tmp: Path, option: str) -> Path:
    """A location as a local path: an object-store one copied into ``tmp`` first."""
    from transact.data import storage

    return storage.download(location, tmp) if storage.is_remote(location) else storage.local_path(location, option)


def _labels_here(location: str, tmp: Path) -> Path:
    """The labels as a local path: a world folder or a requests parquet file; of an object-store
    world only its requests table is copied (the rest of a world is not needed)."""
    from transact.data import storage

    if not storage.is_remote(location):
        return storage.local_path(location, "--labels")
    if storage.is_folder(location):
        location = storage.join(location, "requests.parquet")
    return storage.download(location, tmp / "requests.parquet")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("monitor")
    @fail_on_user_error
    def monitor(
        reference: str = typer.Option(..., help="Training reference: NN-feature rows (file or folder), "
                                                "or a served log; a path or an object-store URI."),
        current: str = typer.Option(..., help="Served log to judge (folder of served-*.parquet or a file; "
                                              "<storage_root>/served of the shipping service)."),
        model: Path | None = typer.Option(None, help="Served model folder: computes the reference "
                                                        "predictions (prediction drift)."),
        out: str = typer.Option("runs/monitor", help="Reports, decision log, summary, workspace: a folder, or an "
                                                     "object-store URI (its decision log, the cooldown's memory, "
                                                     "is read from there first)."),
        window_hours: float = typer.Option(24.0, help="Window length (request time, epoch-aligned)."),
        reference_start: str | None = typer.Option(None, help="Reference rows from this ts (ms or ISO)."),
        reference_end: str | None = typer.Option(None, help="Reference rows before this ts (default: "
                                                               "train_end_ts of the world.json beside the rows)."),
        current_start: str | None = typer.Option(None, help="Served rows from this ts (ms or ISO)."),
        current_end: str | None = typer.Option(None, help="Served rows before this ts (ms or ISO)."),
        labels: str | None = typer.Option(None, help="Labels of the served rows: a world folder or a requests "
                                                     "parquet (a path or an object-store URI); each window then "
                                                     "reports predicted vs observed rate, ECE and log-loss per head."),
        reference_max_rows: int = typer.Option(50_000, help="Sample the reference (whole requests) to this."),
        max_window_rows: int | None = typer.Option(None, help="Sample each window to this many rows."),
        rule: Path | None = typer.Option(None, help="JSON file of DriftRule thresholds to override."),
        retrain: str = typer.Option("off", help="On drift: local (run the retrain pipeline here), "
                                                "cluster (submit it to --kfp-host) or off (log only)."),
        retrain_source: str | None = typer.Option(None, help="Logs folder (generic schema) the retrain "
                                                                 "pipeline trains on."),
        storage_root: str = typer.Option("runs/store", help="Storage root of the retrain pipeline (its registry, "
                                                            "quarantine, reference): a folder or an object-store "
                                                            "URI; the champion it gates against lives there."),
        kfp_host: str | None = typer.Option(None, help="Kubeflow Pipelines API for --retrain cluster."),
        image: str | None = typer.Option(None, help="--retrain cluster: " + IMAGE_HELP),
        storage_secret: str = typer.Option("", help="--retrain cluster: " + SECRET_HELP),
        param: list[str] = typer.Option([], "--param", "-p", help="Extra retrain pipeline parameter key=value."),
        cooldown_hours: float = typer.Option(72.0, help="No second retrain within this many hours "
                                                        "(request time) of the last one."),
        cooldown_windows: int = typer.Option(0, help="... nor within this many windows."),
        workspace: Path | None = typer.Option(None, help="Evidently UI workspace (default <out>/workspace)."),
        project: str | None = typer.Option(None, help="Evidently UI project name."),
    ) -> None:
        """Judge served-log windows against the training reference; retrain on drift."""
        import tempfile

        from transact.data import storage
        from transact.monitoring.drift import DriftRule
        from transact.monitoring.monitor import load_current, load_reference, run_monitor
        from transact.monitoring.trigger import DecisionLog, RetrainTrigger

        if retrain == "cluster":  # its runs' champion must outlive their pods: refused now, not at the drift
            from transact.pipelines.runner import check_cluster_root

            check_cluster_root(storage_root)
        with tempfile.TemporaryDirectory(prefix="transact-monitor-") as tmp:
            # object-store locations are copied in first; a remote --out gets its decision log
            # (the cooldown's memory) first and everything written back at the end
            remote_out = storage.is_remote(out)
            local_out = Path(tmp) / "out" if remote_out else storage.local_path(out, "--out")
            if remote_out and storage.exists(storage.join(out, "decisions.jsonl")):
                storage.download(storage.join(out, "decisions.jsonl"), local_out / "decisions.jsonl")
            reference_path = _here(reference, Path(tmp) / "reference", "--reference")
            current_path = _here(current, Path(tmp) / "current", "--current")
            drift_rule = DriftRule.from_dict(json.loads(rule.read_text())) if rule else DriftRule()
            params = {"storage_root": storage_root, **parse_params(param)}
            if retrain_source:
                params["source"] = str(retrain_source)
            if retrain in ("local", "cluster") and not retrain_source:
                raise ValueError(f"--retrain {retrain} needs --retrain-source (the logs folder the retrain pipeline "
                                 "trains on; for a cluster, the path as its workers see it)")
            mirror = storage.join(out, "decisions.jsonl") if remote_out else None
            cluster = None
            if retrain == "cluster":  # the retrain's pods made as `pipeline submit --storage-secret` makes them
                from transact.pipelines.training import Cluster

                cluster = Cluster(storage_secret=storage_secret)
            trigger = RetrainTrigger(DecisionLog(local_out / "decisions.jsonl", mirror), mode=retrain, kfp_host=kfp_host,
                                     image=image, cluster=cluster,
                                     pipeline_params=params, run_root=local_out / "retrain", cooldown_hours=cooldown_hours,
                                     cooldown_windows=cooldown_windows)
            ref, ref_heads, info = load_reference(reference_path, model, start_ts=reference_start, end_ts=reference_end,
                                                  max_rows=reference_max_rows)
            labels_path = _labels_here(labels, Path(tmp) / "labels") if labels else None
            cur, cur_heads = load_current(current_path, start_ts=current_start, end_ts=current_end,
                                          labels=labels_path)
            if len(cur) == 0:
                raise ValueError(f"{current}: no served rows in the selected range")
            typer.echo(f"reference: {info['rows']} rows ({info['end_ts_source']}), predictions: "
                       f"{info['predictions'] or 'none (pass --model for prediction drift)'}")
            typer.echo(f"current: {len(cur)} rows; windows of {window_hours:g} h")
            if labels_path is not None:
                from transact.monitoring.calibration import LABELLED, STATE

                typer.echo(f"labels: {int((cur[STATE] == LABELLED).sum())} of {len(cur)} served rows labelled "
                           f"({labels})")
            summary = run_monitor(ref, ref_heads, cur, cur_heads, local_out, rule=drift_rule, window_hours=window_hours,
                                  trigger=trigger, workspace=workspace, project=project,
                                  max_window_rows=max_window_rows, progress=typer.echo)
            def where(path: str) -> str:  # a file of a remote --out is named where it is published
                inside = remote_out and Path(path).is_relative_to(local_out)
                return storage.join(out, Path(path).relative_to(local_out).as_posix()) if inside else path

            if remote_out:
                typer.echo(f"published {storage.upload_tree(local_out, out)} files to {out}")
            typer.echo(f"{summary['windows']} windows, {summary['drift_windows']} with drift, "
                       f"{summary['retrains']} retrain(s); decision log {where(summary['decision_log'])}")
            if summary.get("workspace"):
                typer.echo(f"dashboard workspace: {where(summary['workspace'])} (transact dashboard --workspace "
                           f"{where(summary['workspace'])})")
            if summary.get("last_report"):
                typer.echo(f"report: {where(summary['last_report'])}")

    @app.command("dashboard")
    @fail_on_user_error
    def dashboard_cmd(
        workspace: str = typer.Option("runs/monitor/workspace", help="Evidently UI workspace: a folder, or the "
                                                                     "one a monitor published (s3://.../workspace)."),
        port: int = typer.Option(8000, help="Port on 127.0.0.1 (0 = a free one)."),
        wait_s: float = typer.Option(60.0, help="Seconds to wait for the UI to answer."),
    ) -> None:
        """Start the Evidently UI on 127.0.0.1 for the monitoring workspace (Ctrl-C stops it)."""
        import signal
        import tempfile

        from transact.data import storage
        from transact.monitoring import dashboard

        if not storage.is_folder(workspace):
            raise FileNotFoundError(f"{workspace}: no workspace (run `transact monitor` first)")
        with tempfile.TemporaryDirectory(prefix="transact-dashboard-") as tmp:
            # a workspace in a bucket (a monitor's --out there) is shown as of now: a copy
            local = _here(workspace, Path(tmp) / "workspace", "--workspace")
            if storage.is_remote(workspace):
                typer.echo(f"{workspace}: a copy as of now in {local}")

            def _stop(signum, frame):  # SIGTERM/SIGHUP: stop the UI with us
                raise KeyboardInterrupt

            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, _stop)
            proc, address = dashboard.serve(local, "127.0.0.1", port or dashboard.free_port(), wait_s=wait_s)
            try:
                typer.echo(f"Evidently UI: {address}")
                typer.echo("Ctrl-C stops it.")
                proc.wait()
            except KeyboardInterrupt:
                pass
            finally:
                dashboard.stop(proc)

    @bench_app.command("drift")
    @fail_on_user_error
    def bench_drift_cmd(
        seeds: str = typer.Option("10", help="Seeds: N (0..N-1), A-B, or a comma list."),
        users: int = typer.Option(300, help="Users of the tiny world (tiny has 50)."),
        fraction: float = typer.Option(0.3, help="Share of requests served/logged (sampled per request)."),
        strength: float | None = typer.Option(None, help="Drift strength (default: the simulator's 0.5)."),
        train_steps: int = typer.Option(20, help="Steps of the one small model trained for the benchmark."),
        model: Path | None = typer.Option(None, help="Use this model instead of training one."),
        work: Path = typer.Option(Path("runs/bench-drift"), help="Worlds, logs and decisions."),
        out: Path = typer.Option(Path("bench/results/drift-tiny300.json"), help="JSON result path."),
    ) -> None:
        """Injected drift vs stationary windows: retrain-trigger and false-alarm rates."""
        from transact.bench.drift import bench_drift, format_table

        res = bench_drift(work, _seeds(seeds), users=users, fraction=fraction, strength=strength,
                          train_steps=train_steps, model_dir=model, progress=typer.echo)
        typer.echo(format_table(res))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text((work / "drift.json").read_text())
        typer.echo(f"written {out}")
