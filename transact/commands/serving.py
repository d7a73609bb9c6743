"""Serving commands: ``transact package``, ``transact serve``, ``transact bench serving``."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error
from transact.serving.launch import sample_curl
from transact.serving.settings import (
    DEFAULT_CPU_FORWARD,
    DEFAULT_HOST,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_TAG,
    DEFAULT_PORT,
    ServeSettings,
)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    @fail_on_user_error
    def package(
        model_dir: Path = typer.Option(..., help="Trained model folder (config.json + model.safetensors)."),
        name: str = typer.Option(DEFAULT_MODEL_NAME, help="Model name in the BentoML model store."),
        build: bool = typer.Option(False, help="Also build the bento (serving/bentofile.yaml, offline)."),
    ) -> None:
        """Put a trained model into the BentoML model store (same weights, same tag)."""
        from transact.serving.packaging import build_bento, package_model

        info = package_model(model_dir, name=name)
        typer.echo(f"{'stored' if info['created'] else 'already stored'}: {info['tag']}  ({info['path']})")
        if build:
            typer.echo(f"bento: {build_bento(info['tag'])}")
        typer.echo(f"start the service:  transact serve --model {info['tag']} --world <world folder>")
        typer.echo(f"then:               {sample_curl()}")

    @app.command()
    @fail_on_user_error
    def serve(
        model: str = typer.Option(DEFAULT_MODEL_TAG, help="Model tag in the BentoML model store."),
        registry: str | None = typer.Option(None, help="Serve this model registry's champion (a folder or an "
                                                       "object-store URI, e.g. s3://bucket/root/registry): "
                                                       "imported into the local store first; replaces --model."),
        world: Path | None = typer.Option(None, help="World folder: sequences and items from its parquet events."),
        feast_repo: str | None = typer.Option(None, help="Feast repo: sequences and items from the online store "
                                                         "(a folder, or the pipeline's published repo: "
                                                         "s3://.../feature_repo)."),
        host: str = typer.Option(DEFAULT_HOST, help="Bind address (0.0.0.0 exposes the service to the network)."),
        port: int = typer.Option(DEFAULT_PORT, help="Port."),
        log_dir: Path | None = typer.Option(None, help="Served NN-feature log folder (off when not given)."),
        log_ship_to: str | None = typer.Option(None, help="Move sealed served-log files there (a folder or an "
                                                          "object-store URI: <storage_root>/served)."),
        log_ship_s: float = typer.Option(ServeSettings.log_ship_s, help="Seconds between shipping passes."),
        score_weights: str | None = typer.Option(None, help="Head weights, e.g. click=1,repin=1,hide=-1."),
        device: str | None = typer.Option(None, help="cpu | cuda (default: CUDA when available)."),
        threads: int | None = typer.Option(None, help="torch intra-op threads."),
        max_candidates: int = typer.Option(ServeSettings.max_candidates, help="Candidates per request."),
        max_wait_ms: float = typer.Option(ServeSettings.max_wait_ms, help="Extra wait to grow cross-request batches."),
        cpu_forward: str = typer.Option(DEFAULT_CPU_FORWARD, help="CPU model forward: onnxruntime | compile | eager "
                                                                  "(built at start-up, seconds)."),
        api_key_env: str | None = typer.Option(None, help="Name of an environment variable holding the API "
                                                             "key that /rank requires (X-API-Key header)."),
        max_clock_skew: str = typer.Option("300", help="Seconds a client request_ts may lie from the server "
                                                       "clock (further: 400), or off to trust client times "
                                                       "(a replay of a past world)."),
    ) -> None:
        """Start the ranking service (foreground; Ctrl+C stops it and flushes the served log)."""
        import os

        from transact.model.metrics import parse_score_weights
        from transact.serving.launch import check_config, serve_forever
        from transact.serving.settings import parse_clock_skew

        if feast_repo:
            from transact.features.feast.published import local_repo

            feast_repo = str(local_repo(feast_repo))  # a published repo: its current version, fetched
        if registry:
            from transact.serving.packaging import import_champion

            model = import_champion(registry)
            typer.echo(f"the champion of {registry}: {model}")
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"--api-key-env {api_key_env}: that environment variable is empty")
        # the settings are read once, here, and reach the server process as its environment
        settings = ServeSettings(  # a bad value fails here, one line, not in the worker
            model_tag=model, world=str(world) if world else None, feast_repo=feast_repo,
            device=device, threads=threads, score_weights=parse_score_weights(score_weights),
            max_candidates=max_candidates, max_wait_ms=max_wait_ms, api_key=api_key,
            log_dir=str(log_dir) if log_dir else None, log_ship_to=log_ship_to, log_ship_s=log_ship_s,
            cpu_forward=cpu_forward,
            max_clock_skew_s=parse_clock_skew(max_clock_skew, "--max-clock-skew"))
        check_config(settings)  # the model, the source: one line and exit 2, not a worker loop
        typer.echo(f"serving {model} on http://{host}:{port}  (try: {sample_curl(f'http://{host}:{port}', bool(api_key))})")
        raise typer.Exit(serve_forever(settings, host=host, port=port))

    @app.command("ship-served")
    @fail_on_user_error
    def ship_served_cmd(
        log_dir: Path = typer.Option(..., help="The service's served-log folder (--log-dir of transact serve)."),
        to: str = typer.Option(..., help="Where sealed files go: <storage_root>/served (a folder or a URI)."),
        source: str | None = typer.Option(None, help="This server's name under --to (default: the host name)."),
    ) -> None:
        """Moves the sealed served-log files to the storage root (report, copy, verify, delete);
        what `transact serve --log-ship-to` does every minute, for a sidecar or a cron job."""
        from transact.serving.shipping import ship_served

        done = ship_served(log_dir, to, source)
        typer.echo(f"shipped {done['files']} files, {done['rows']:,} rows, {done['bytes']:,} bytes to {done['to']}")

    @bench_app.command("serving")
    @fail_on_user_error
    def bench_serving(
        out: Path | None = typer.Option(None, help="JSON output (default bench/results/serving-<device>.json)."),
        seconds: float = typer.Option(30.0, help="Load duration per path (dedup, naive)."),
        candidates: int = typer.Option(256, help="Candidates per request (N)."),
        ll: int = typer.Option(16_384, help="Lifelong sequence length L_LL."),
        rt: int = typer.Option(100, help="Realtime sequence length."),
        imp: int = typer.Option(100, help="Impression sequence length."),
        concurrency: int = typer.Option(1, help="Concurrent clients of the load generator."),
        rounds: int = typer.Option(6, min=1, help="Alternating load slices per path (dedup, naive, dedup, ...)."),
        threads: int = typer.Option(0, help="torch threads of the server and of the forward timing "
                                            "(0: torch default, all cores)."),
        min_requests: int = typer.Option(3, help="Requests per path even when the time is up."),
        log_rows: bool = typer.Option(True, help="Served-row logging on (as in production)."),
        cpu_forward: str = typer.Option(DEFAULT_CPU_FORWARD, help="CPU model forward of the server and the forward floor: "
                                                        "onnxruntime | compile | eager."),
        compare: bool = typer.Option(True, help="Also time the CPU forward variants (eager, torch.compile, "
                                                "ONNX Runtime) against each other."),
    ) -> None:
        """Loopback load test: de-duplicated vs naive (broadcast) requests, vs the model's forward."""
        from transact.bench.report import default_output
        from transact.bench.serving import run_serving_bench

        out = out or default_output("serving")
        r = run_serving_bench(out, seconds=seconds, candidates=candidates, ll=ll, rt=rt, imp=imp,
                              concurrency=concurrency, rounds=rounds, threads=threads or None, min_requests=min_requests,
                              log_rows=log_rows, cpu_forward=cpu_forward, compare=compare,
                              progress=typer.echo)
        d, n, f, q = r["dedup"], r["naive"], r["model_forward"], r["ratios"]
        typer.echo(f"\n{'path':<8} {'p50 ms':>9} {'p99 ms':>9} {'cand/s':>9} {'H2D bytes/req':>15}")
        for name, p in (("dedup", d), ("naive", n)):
            typer.echo(f"{name:<8} {p['latency_ms_p50']:>9.0f} {p['latency_ms_p99']:>9.0f} "
                       f"{p['candidates_per_s']:>9.0f} {p['h2d_bytes_per_request']:>15,}")
        typer.echo(f"model forward p50 {f['model_forward_ms_p50']:.0f} ms; throughput x{q['throughput_dedup_over_naive']:.1f}, "
                   f"bytes /{q['h2d_bytes_naive_over_dedup']:.0f}, p99/forward {q['dedup_p99_over_model_forward']:.2f} "
                   f"(p50/forward p50 {q['dedup_p50_over_model_forward']:.2f}, "
                   f"p99/forward p99 {q['dedup_p99_over_model_forward_p99']:.2f})")
        if (rr := q.get("throughput_dedup_over_naive_rounds")) is not None:
            typer.echo(f"throughput ratio per round (paired slices): median x{rr['median']:.1f}, "
                       f"range x{rr['min']:.1f}-x{rr['max']:.1f} over {len(r['rounds'])} rounds")
        typer.echo(json.dumps(r["targets"]))
        typer.echo(f"-> {out}")
