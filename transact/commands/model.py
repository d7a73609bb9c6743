"""Model commands: train, evaluate, ablation, and the training benchmark."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error
from transact.model.calibration import HOLDOUT
from transact.model.defaults import TRAIN


def _overrides(time_window_mask: bool, nal_weight: float | None, first_k: int | None,
               heads: str | None, model_json: str | None) -> dict:
    ov: dict = json.loads(model_json) if model_json else {}
    if time_window_mask:
        ov["time_window_mask"] = True
    if nal_weight is not None:
        ov["nal_weight"] = nal_weight
    if first_k is not None:
        ov["first_k"] = first_k
    if heads:
        ov["heads"] = tuple(h.strip() for h in heads.split(",") if h.strip())
    return ov


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def _check_options(**options) -> None:
    """One-line ValueError (exit 2 via :func:`fail_on_user_error`) naming the first bad
    numeric option; ``options`` maps the option name without dashes to (value, rule):
    rule ``"lr"`` (> 0), ``"seed"`` (0 .. 2^63 - 1), or the lowest allowed int/float."""
    from transact.model.train import check_numeric

    for key, (value, rule) in options.items():
        name = "--" + key.replace("_", "-")
        if rule == "lr":
            check_numeric(name, value, positive=True)
        elif rule == "seed":
            check_numeric(name, value, 0, hi=2**63 - 1)
        else:
            check_numeric(name, value, rule)


SPLIT_HELP = ("time: train on ts < train_end_ts, evaluate after it (all users); user or user:N: hold out each "
              "user's last N requests (default 1), train on each user's rows before them.")


def _split(split: str, per_user: int | None):
    """The :class:`transact.model.dataset.Split` of ``--split`` (and ``--eval-requests-per-user``)."""
    from transact.model.dataset import Split

    s = Split.parse(split)
    if per_user is None:
        return s
    if s.kind != "user":
        raise ValueError("--eval-requests-per-user applies to --split user only")
    if ":" in split and s.eval_requests_per_user != per_user:
        raise ValueError(f"--split {split} and --eval-requests-per-user {per_user} disagree")
    return Split("user", per_user)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    @fail_on_user_error
    def train(
        rows: Path = typer.Option(..., help="NN-feature rows (parquet file or folder) from `transact log-nn`."),
        model: str = typer.Option(TRAIN.model, help="wdl | bst | transact | transact_nal_inbatch | transact_nal_imp | v2."),
        out: Path = typer.Option(Path("runs/model"), help="Model folder (safetensors + JSON)."),
        epochs: int = typer.Option(TRAIN.epochs, help="Passes over the training window."),
        batch_size: int = typer.Option(TRAIN.batch_size, help="Examples per step and per process."),
        lr: float = typer.Option(TRAIN.lr, help="Peak learning rate (Adam, warm-up + cosine)."),
        seed: int = typer.Option(TRAIN.seed, help="Same seed, same model."),
        train_end_ts: int | None = typer.Option(None, help="Train on ts < this (ms); default: world.json next to the rows."),
        warmup_steps: int | None = typer.Option(None, help="Warm-up steps (default 5% of all)."),
        max_steps: int | None = typer.Option(None, help="Stop after this many steps (checkpointed)."),
        ckpt_every: int = typer.Option(0, help="Also checkpoint every N steps (0: per epoch)."),
        resume: bool = typer.Option(True, help="Continue from the checkpoint in --out if there is one."),
        device: str | None = typer.Option(None, help="cpu | cuda | cuda:N (default: CUDA when available)."),
        threads: int | None = typer.Option(None, help="torch CPU threads."),
        time_window_mask: bool = typer.Option(False, help="V1 random time-window mask in training."),
        nal_weight: float | None = typer.Option(None, help="w_NAL, on the mean over pairs (default 1; see ModelConfig)."),
        first_k: int | None = typer.Option(None, help="V1 output compression: K most recent tokens."),
        heads: str | None = typer.Option(None, help="Comma-separated heads (default click,repin,hide)."),
        model_json: str | None = typer.Option(None, help="JSON of further ModelConfig fields."),
        precision: str = typer.Option("fp32", help="fp32 | bf16 (autocast: faster with AMX, not the fp32 loss curve)."),
        calibration_holdout: float = typer.Option(HOLDOUT, help="Share of the training window (its most recent rows) "
                                                             "held out to calibrate the heads; 0: uncalibrated."),
        split: str = typer.Option("time", help=SPLIT_HELP),
        eval_requests_per_user: int | None = typer.Option(None, help="--split user: requests held out per user (default 1)."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Train a ranking model on the logged rows (DDP when launched by torchrun)."""
        from transact.model.train import train as run

        _check_options(epochs=(epochs, 1), batch_size=(batch_size, 1), lr=(lr, "lr"), seed=(seed, "seed"),
                       train_end_ts=(train_end_ts, 0), warmup_steps=(warmup_steps, 0), max_steps=(max_steps, 1),
                       ckpt_every=(ckpt_every, 0), threads=(threads, 1), nal_weight=(nal_weight, 0.0),
                       first_k=(first_k, 1))

        s = run(rows, out, model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                train_end_ts=train_end_ts, warmup_steps=warmup_steps, max_steps=max_steps,
                ckpt_every=ckpt_every, resume=resume, device=device, num_threads=threads,
                progress=progress, precision=precision, calibration_holdout=calibration_holdout,
                split=_split(split, eval_requests_per_user),
                model_overrides=_overrides(time_window_mask, nal_weight, first_k, heads, model_json))
        import os

        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"{s['model']}: {s['steps']} steps ({s['examples']:,} examples, "
                       f"{s['examples_per_s']:.0f} ex/s, world {s['world_size']}), "
                       f"final loss {_fmt(s['final_loss'])}, {s['split']['description']} -> {out}")

    @app.command()
    @fail_on_user_error
    def evaluate(
        model_dir: Path = typer.Option(Path("runs/model"), help="Trained model folder."),
        rows: Path = typer.Option(..., help="NN-feature rows (the eval window is ts >= train_end_ts)."),
        out: Path | None = typer.Option(None, help="Output folder (default <model-dir>/eval)."),
        score_weights: str | None = typer.Option(None, help="Ranking score S, e.g. click=1,repin=1,hide=-1 (the default)."),
        train_end_ts: int | None = typer.Option(None, help="Eval window start (default: the model's train_end_ts)."),
        eval_end_ts: int | None = typer.Option(None, help="Eval window end (exclusive)."),
        n_boot: int = typer.Option(1000, help="User-bootstrap resamples for the CIs."),
        batch_size: int = typer.Option(1024, help="Scoring batch size."),
        split: str | None = typer.Option(None, help="Default: the split the model was trained with. " + SPLIT_HELP),
        eval_requests_per_user: int | None = typer.Option(None, help="--split user: requests held out per user."),
        device: str | None = typer.Option(None, help="cpu | cuda."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """HIT@3 (V2 §4.2.1), AUC and log-loss on the eval window; writes metrics.json."""
        from transact.model.evaluate import evaluate as run, format_metrics
        from transact.model.metrics import parse_score_weights

        _check_options(train_end_ts=(train_end_ts, 0), eval_end_ts=(eval_end_ts, 0), n_boot=(n_boot, 1),
                       batch_size=(batch_size, 1))
        if train_end_ts is not None and eval_end_ts is not None and eval_end_ts <= train_end_ts:
            raise ValueError(f"--eval-end-ts ({eval_end_ts}) must be after --train-end-ts ({train_end_ts})")

        m = run(model_dir, rows, out, batch_size=batch_size, score_weights=parse_score_weights(score_weights),
                n_boot=n_boot, train_end_ts=train_end_ts, eval_end_ts=eval_end_ts, device=device,
                progress=progress, split=None if split is None else _split(split, eval_requests_per_user))
        typer.echo(format_metrics(m))
        typer.echo(f"written {(Path(out) if out else Path(model_dir) / 'eval') / 'metrics.json'}")

    @app.command()
    @fail_on_user_error
    def ablation(
        rows: Path = typer.Option(..., help="NN-feature rows."),
        out: Path = typer.Option(Path("runs/ablation"), help="Output folder (one sub-folder per model and seed)."),
        baseline: str = typer.Option("transact", help="Model the relative changes are against."),
        models: str | None = typer.Option(None, help="Comma-separated models (default: all)."),
        seeds: int = typer.Option(1, help="Seeds per model (results averaged per user)."),
        epochs: int = typer.Option(TRAIN.epochs, help="Epochs per run."),
        batch_size: int = typer.Option(TRAIN.batch_size, help="Batch size."),
        lr: float = typer.Option(TRAIN.lr, help="Peak learning rate."),
        train_end_ts: int | None = typer.Option(None, help="Split point (default: world.json)."),
        score_weights: str | None = typer.Option(None, help="Ranking score weights."),
        n_boot: int = typer.Option(1000, help="Paired bootstrap resamples."),
        threads: int | None = typer.Option(None, help="torch CPU threads."),
        max_steps: int | None = typer.Option(None, help="Optimiser steps per run, same for all (epochs cycled to reach it)."),
        precision: str = typer.Option("fp32", help="fp32 | bf16 (autocast; see `transact train --help`)."),
        split: str = typer.Option("time", help=SPLIT_HELP),
        eval_requests_per_user: int | None = typer.Option(None, help="--split user: requests held out per user (default 1)."),
        variant: list[str] = typer.Option([], help="A further model NAME=MODEL:FIELD=VALUE[,FIELD=VALUE] "
                                                   "(repeatable), e.g. imp_w1=transact_nal_imp:nal_weight=1."),
        progress: bool = typer.Option(True, help="Progress lines and the (partial) table after every run."),
    ) -> None:
        """Train every baseline on the same rows and seeds (seed-major, resumable); print the paper's Table 2."""
        from transact.model.ablation import Variant, ablation as run, format_table
        from transact.model.metrics import parse_score_weights

        _check_options(seeds=(seeds, 1), epochs=(epochs, 1), batch_size=(batch_size, 1), lr=(lr, "lr"),
                       train_end_ts=(train_end_ts, 0), n_boot=(n_boot, 1), threads=(threads, 1),
                       max_steps=(max_steps, 1))

        res = run(rows, out, baseline=baseline,
                  models=[m.strip() for m in models.split(",")] if models else None, seeds=seeds,
                  epochs=epochs, batch_size=batch_size, lr=lr, train_end_ts=train_end_ts, n_boot=n_boot,
                  score_weights=parse_score_weights(score_weights), progress=progress, num_threads=threads,
                  max_steps=max_steps, log=typer.echo if progress else None, precision=precision,
                  split=_split(split, eval_requests_per_user), variants=[Variant.parse(v) for v in variant])
        if not progress:  # with progress the table was printed after every run
            typer.echo(format_table(res))
        typer.echo(f"written {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")

    @bench_app.command("train")
    @fail_on_user_error
    def bench_train_cmd(
        models: str = typer.Option("v2", help="Comma-separated models."),
        batch_sizes: str = typer.Option("256", help="Comma-separated batch sizes."),
        steps: int = typer.Option(5, help="Timed steps per path and round."),
        rounds: int = typer.Option(5, help="Rounds; each times every path in turn (order alternating)."),
        warmup: int = typer.Option(3, help="Untimed steps per path first."),
        bf16: bool = typer.Option(False, help="Also time the new path under bf16 autocast."),
        compile: bool = typer.Option(False, "--compile", help="Also time the new path through torch.compile."),
        device: str | None = typer.Option(None, help="cpu | cuda (default: CUDA when available)."),
        threads: int | None = typer.Option(None, help="torch CPU threads."),
        out: Path | None = typer.Option(None, help="JSON result path (default bench/results/train-<device>.json)."),
        rows: Path | None = typer.Option(None, help="Logged rows to draw the batch from (default: synthetic rows)."),
    ) -> None:
        """Training throughput: the stock encoder (old) vs the packed training path (new, fp32 and
        with --bf16), paired; FLOPs per example and the share of a GEMM peak measured in the same run."""
        from transact.bench.report import default_output, write_json
        from transact.bench.train import bench_train, format_bench

        _check_options(steps=(steps, 1), rounds=(rounds, 1), warmup=(warmup, 0), threads=(threads, 1))
        for b in _ints(batch_sizes):
            _check_options(batch_sizes=(b, 1))

        res = bench_train([m.strip() for m in models.split(",")], _ints(batch_sizes), steps, warmup,
                          device, threads, rounds=rounds, bf16=bf16, compile=compile, rows=rows)
        typer.echo(format_bench(res))
        path = write_json(out or default_output("train"), res)
        typer.echo(f"written {path}")

    @bench_app.command("calibration")
    @fail_on_user_error
    def bench_calibration_cmd(
        model_dir: Path = typer.Option(Path("runs/model"), help="A model trained with a calibration slice."),
        rows: Path = typer.Option(..., help="The rows it was trained on (the slice and the window after it)."),
        out: Path = typer.Option(Path("bench/results/calibration-demo.json"), help="JSON result path."),
    ) -> None:
        """Raw heads, Platt, beta (the model's map), isotonic and a Platt oracle: log-loss and ECE per head
        on the window after training, each map fitted on the model's held-out slice."""
        from transact.bench.calibration import format_table, run

        res = run(model_dir, rows, out)
        typer.echo(format_table(res))
        typer.echo(f"written {out}")
