"""The trainer: Adam, linear warm-up + cosine decay, DDP under torchrun, resumable.

    transact train --rows runs/world/nn_rows.parquet --model v2 --out runs/model
    torchrun --standalone --nproc_per_node 2 -m transact.cli train --rows ... --out ...

- Device: CUDA when available (``cuda:<LOCAL_RANK>``), else CPU.
- Distributed: launched by torchrun (``WORLD_SIZE`` > 1 in the environment) the trainer
  joins a process group (gloo on CPU, NCCL on CUDA), wraps the model in DDP and reads
  its share of every global batch (:mod:`transact.model.dataset`); ``--batch-size`` is
  per process. Only rank 0 writes files.
- Learning rate at step s (0-based) of T: ``lr * (s + 1) / W`` for s < W, then
  ``lr * 0.5 * (1 + cos(pi * (s - W) / (T - W)))``; W defaults to 5% of T.
- Determinism: parameters are initialised from ``seed``; the epoch-e data order from
  ``[seed, e]``; the time-window mask of step s on rank k from ``seed, s, k``. A run
  resumed from its last checkpoint (weights, Adam moments, RNG state, step) continues
  exactly as the uninterrupted run would have.
- Checkpoints (:mod:`transact.model.checkpoint`) at the end of each epoch, every
  ``ckpt_every`` steps, and when ``max_steps`` stops the run early. Under DDP every rank
  reads the checkpoint on resume, so ``--out`` must be visible to all ranks; in-memory
  row loading also happens once per rank. A run resumed at (or past) its end trains no
  further step.
- Speed: the model builds and encodes only the valid tokens of a batch
  (:func:`transact.kernels.dispatch.encoder_tokens`: rows packed in length groups, causal
  attention; ``transact bench train`` times it against the stock module). ``precision="bf16"``
  runs the forward and the loss under bf16 autocast (weights, Adam and gradients stay fp32;
  the encoder wholly in bf16, its attention backward as GEMMs on the CPU's matrix units):
  ~3x the old fp32 step on CPUs with AMX, *not* the fp32 loss curve to the bit -- opt-in
  (docs/ablation.md has the side-by-side ablation). The summary
  records ``data_s``, the time spent waiting for batches (rows in memory: ~0.3 ms a
  batch of 256 -- decoding does not need to overlap compute).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from transact.features.config import FeatureConfig
from transact.model import calibration as CAL, checkpoint as ckpt
from transact.model.dataset import RowDataset, Split, split_point
from transact.model.defaults import TRAIN
from transact.model.losses import label_weight_matrix, total_loss
from transact.model.transact import ModelConfig, TransActModel, count_parameters, model_config

#: numeric precisions of the forward pass (``precision`` of :func:`train`)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward's precision context: nothing for fp32, bf16 autocast for "bf16"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    frac = min((step - warmup) / span, 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * frac))


class DistEnv:
    """rank / world size / device of this process; sets up torch.distributed under torchrun."""

    def __init__(self, device: str | None = None) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # one GPU per process
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.distributed = self.world_size > 1
        self._owns_group = False
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self._owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def params_in_sync(model: torch.nn.Module, env: DistEnv) -> bool:
    """True when every rank holds bit-identical parameters (gathered fingerprints)."""
    if not env.distributed:
        return True
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])  # [P]
    w = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    fp = torch.stack([flat.sum(), (flat * w).sum(), flat.abs().max()])  # [3]
    out = [torch.zeros_like(fp) for _ in range(env.world_size)]
    dist.all_gather(out, fp)
    return all(torch.equal(out[0], o) for o in out[1:])


def train(rows: str | Path, out: str | Path, model: str | ModelConfig = TRAIN.model, *, epochs: int = TRAIN.epochs,
          batch_size: int = TRAIN.batch_size, lr: float = TRAIN.lr, seed: int = TRAIN.seed, train_end_ts: int | None = None,
          warmup_steps: int | None = None, weight_decay: float = 0.0, device: str | None = None,
          progress: bool = True, resume: bool = True, max_steps: int | None = None,
          ckpt_every: int = 0, num_threads: int | None = None, max_memory_mb: float = 1024,
          log_every: int = 10, model_overrides: dict | None = None, step_budget: int | None = None,
          precision: str = "fp32", on_log: Callable[[dict], None] | None = None,
          calibration_holdout: float = CAL.HOLDOUT, split: Split | str | None = None) -> dict:
    """Trains a model on the training rows of ``split`` (time split: ``ts < train_end_ts``;
    per-user split: each user's rows before their cut); writes it to ``out``.

    The most recent ``calibration_holdout`` share of those rows (by time, over all users:
    :func:`holdout_start`) is held out of the training and fits the heads' calibration once
    training ends (:mod:`transact.model.calibration`); 0 trains on every row and leaves the
    heads uncalibrated. config.json's "training" section records the split, so evaluation
    and the gate score the rows this model never trained on.

    Args:
        rows: logged NN-feature rows (file or folder of parquet parts).
        out: model folder (config.json, model.safetensors, train_state/, train_summary.json).
        model: registry name (see :data:`transact.model.transact.BASELINES`) or a ModelConfig.
        epochs, batch_size (per process), lr (peak), seed: the usual.
        train_end_ts: split point in ms of the time split; default from world.json next to
            the rows. The per-user split takes none.
        split: :class:`transact.model.dataset.Split` or its spec ("time", "user", "user:N");
            default the time split.
        warmup_steps: linear warm-up length (default 5% of all steps).
        resume: continue from ``out``'s checkpoint when there is one.
        step_budget: a time budget in optimiser steps: the warm-up + cosine schedule is
            laid over ``min(epochs x steps per epoch, step_budget)`` steps and training
            ends there, learning rate decayed (unlike ``max_steps``, which interrupts).
        max_steps: stop (with a checkpoint) after this many steps in all (for tests and
            interrupted runs); the schedule still spans ``epochs``.
        ckpt_every: also checkpoint every N steps (0 = only at epoch ends).
        model_overrides: ModelConfig fields to change (e.g. {"time_window_mask": True}).
        precision: "fp32" (default) or "bf16" (autocast of the forward and the loss).
        on_log: called with every history record (every ``log_every`` steps: step, epoch,
            lr, loss, ce, nal, examples_per_s) plus ``total_steps`` -- a progress hook.
    Returns:
        The training summary (also written to ``out/train_summary.json``).
    """
    out = Path(out)
    env = DistEnv(device)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(env, rows, out, model, epochs, batch_size, lr, seed, train_end_ts, warmup_steps,
                      weight_decay, progress, resume, max_steps, ckpt_every, num_threads, max_memory_mb,
                      log_every, model_overrides or {}, step_budget, precision, on_log, calibration_holdout,
                      split)
    finally:
        env.close()


#: (lowest allowed, inclusive) of each numeric training argument; None values are skipped
TRAIN_ARG_MIN = {"epochs": 1, "batch_size": 1, "seed": 0, "warmup_steps": 0, "max_steps": 1,
                 "ckpt_every": 0, "num_threads": 1, "weight_decay": 0.0, "step_budget": 1,
                 "train_end_ts": 0}


def check_numeric(name: str, value, lo=None, *, positive: bool = False, hi=None) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number, >= ``lo`` (> 0
    where ``positive``) and <= ``hi``. The CLI passes option names (``--max-steps``)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")


def check_train_args(names: dict[str, str] | None = None, **args) -> None:
    """Validates :func:`train`'s numeric arguments; ``names`` maps an argument to the name
    errors should use (the CLI's option). ``max_steps`` = 0 used to run one step."""
    names = names or {}
    for arg, value in args.items():
        name = names.get(arg, arg)
        if arg == "lr":
            check_numeric(name, value, positive=True)
        elif arg == "seed":
            check_numeric(name, value, TRAIN_ARG_MIN["seed"], hi=2**63 - 1)  # torch.manual_seed's range
        else:
            check_numeric(name, value, TRAIN_ARG_MIN[arg])


def _train(env, rows, out, model, epochs, batch_size, lr, seed, train_end_ts, warmup_steps,
           weight_decay, progress, resume, max_steps, ckpt_every, num_threads, max_memory_mb,
           log_every, overrides, step_budget=None, precision="fp32", on_log=None,
           calibration_holdout=CAL.HOLDOUT, split=None) -> dict:
    split = Split.parse(split)
    check_train_args(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, warmup_steps=warmup_steps,
                     max_steps=max_steps, ckpt_every=ckpt_every, num_threads=num_threads,
                     weight_decay=weight_decay, step_budget=step_budget, train_end_ts=train_end_ts)
    if not 0.0 <= calibration_holdout < 0.5:
        raise ValueError(f"calibration_holdout must be in [0, 0.5), got {calibration_holdout!r}")
    amp = autocast(env.device, precision)  # checks the name before any work
    if num_threads:
        torch.set_num_threads(num_threads)
    train_end_ts, end_src = split_point(rows, train_end_ts, split)
    # One code path for both splits: the optimiser steps through the training rows before
    # fit_end_ts; the calibration slice is the training rows from it on (None: no slice).
    fit_end_ts = holdout_start(rows, train_end_ts, calibration_holdout, split)
    data = RowDataset(rows, "train", train_end_ts=train_end_ts, max_memory_mb=max_memory_mb, split_by=split,
                      max_ts=fit_end_ts)
    if data.num_rows < env.world_size:
        raise ValueError(f"{rows}: only {data.num_rows} training rows ({split.describe(train_end_ts)})")
    fcfg = data.feature_config
    if isinstance(model, ModelConfig):
        mcfg = ModelConfig.from_dict({**model.to_dict(), **overrides})
    else:
        mcfg = model_config(model, **overrides)

    torch.manual_seed(seed)
    net = TransActModel(mcfg, fcfg).to(env.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = data.num_batches(batch_size, env.world_size)
    total = steps_per_epoch * epochs
    if step_budget:
        total = min(total, int(step_budget))
        max_steps = total if max_steps is None else min(max_steps, total)
    warmup = warmup_steps if warmup_steps is not None else max(1, round(0.05 * total))

    step = 0
    if resume and ckpt.has_train_state(out):
        saved = ckpt.read_config(out)
        as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples -> lists)
        hint = "use another --out or --no-resume"
        fcfg.check_same(FeatureConfig.from_dict(saved["feature_config"], where=f"{out}/config.json: feature_config"),
                        f"the rows {rows}", f"the checkpoint in {out}", hint)
        was = Split.parse((saved.get("training") or {}).get("split"))  # checkpoints before the split: time
        if was != split:
            raise ValueError(f"split: {split} in this run, {was} in the checkpoint in {out} ({hint})")
        want = as_json(mcfg.to_dict())
        # the checkpoint's config with today's defaults for fields added since it was written
        had = as_json(ModelConfig.from_dict(saved["model_config"]).to_dict())
        for name in sorted(set(want) | set(had)):
            if want.get(name) != had.get(name):
                raise ValueError(f"model config: {name} = {want.get(name)!r} in this run, "
                                 f"{had.get(name)!r} in the checkpoint in {out} ({hint})")
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(out / ckpt.WEIGHTS)), strict=True)
        state = ckpt.load_train_state(out, opt)
        step = int(state["step"])
        if state.get("steps_per_epoch") not in (None, steps_per_epoch):
            raise ValueError(f"{out}: checkpoint was taken with a different data split or batch size")
    start_step = step

    ddp: torch.nn.Module = net  # what the step calls: the model, or its DDP wrapper
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    M = label_weight_matrix(mcfg).to(env.device)
    gen = torch.Generator(device=env.device)
    training_info = {
        "rows": str(rows), "model": mcfg.name, "epochs": epochs, "batch_size": batch_size,
        "global_batch_size": batch_size * env.world_size, "lr": lr, "warmup_steps": warmup,
        "weight_decay": weight_decay, "seed": seed,
        "train_end_ts": None if train_end_ts is None else int(train_end_ts),
        "train_end_ts_source": end_src, "split": {**split.to_dict(), "description": split.describe(train_end_ts)},
        "world_size": env.world_size, "device": str(env.device),
        "n_train_rows": data.num_rows, "steps_per_epoch": steps_per_epoch, "total_steps": total,
        "precision": precision, "calibration_holdout": calibration_holdout,
        "calibration_start_ts": None if fit_end_ts is None else int(fit_end_ts),
    }

    def save(epoch: int) -> None:
        if env.is_main:
            ckpt.save_model(out, net, {**training_info, "step": step}, step=step)
            ckpt.save_train_state(out, opt, step, epoch, {"steps_per_epoch": steps_per_epoch})
        env.barrier()

    bar = tqdm(total=total, initial=step, desc=f"train {mcfg.name}", unit="step",
               disable=not (progress and env.is_main), dynamic_ncols=True)
    history: list[dict] = []
    acc = {"loss": 0.0, "ce": 0.0, "nal": 0.0, "n": 0}
    t0 = time.perf_counter()
    t_log, ex_log = t0, 0
    stop = False
    n_examples, data_s = 0, 0.0
    net.train()
    first_epoch = step // steps_per_epoch if steps_per_epoch else 0
    if step >= total or (max_steps is not None and step >= max_steps):
        first_epoch = epochs  # resumed at the end: nothing left to train
    for epoch in range(first_epoch, epochs):
        first = step - epoch * steps_per_epoch
        batches = data.iter_batches(batch_size, shuffle=True, seed=seed, epoch=epoch, rank=env.rank,
                                    world_size=env.world_size, start_batch=first)
        while True:
            t_data = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            batch = batch.to(env.device, non_blocking=True)
            data_s += time.perf_counter() - t_data
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, lr)
            gen.manual_seed((seed * 1_000_003 + step) * 4099 + env.rank)
            with amp:
                out_ = ddp(batch, generator=gen)
                loss, parts = total_loss(out_, batch, mcfg, fcfg, M)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            for k in ("loss", "ce", "nal"):
                if k in parts:
                    acc[k] += float(parts[k])
            acc["n"] += 1
            ex_log += len(batch) * env.world_size
            n_examples += len(batch) * env.world_size
            bar.update(1)
            if acc["n"] >= log_every or step == total:
                now = time.perf_counter()
                rec = {"step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"],
                       **{k: acc[k] / acc["n"] for k in ("loss", "ce", "nal")},
                       "examples_per_s": ex_log / max(now - t_log, 1e-9)}
                history.append(rec)
                if on_log is not None and env.is_main:
                    on_log({**rec, "total_steps": total})
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ex_s=f"{rec['examples_per_s']:.0f}")
                acc = {"loss": 0.0, "ce": 0.0, "nal": 0.0, "n": 0}
                t_log, ex_log = now, 0
            if ckpt_every and step % ckpt_every == 0:
                save(epoch)
            if max_steps is not None and step >= max_steps:
                stop = True
                break
        if stop:
            break
        save(epoch + 1)
    if stop and (not ckpt_every or step % ckpt_every):
        save(step // steps_per_epoch)
    bar.close()
    seconds = time.perf_counter() - t0
    in_sync = params_in_sync(net, env)
    summary = {
        **training_info, "steps": step, "resumed_from_step": start_step, "finished": step >= total,
        "seconds": round(seconds, 3), "data_s": round(data_s, 3), "examples": n_examples,
        "examples_per_s": round(n_examples / max(seconds, 1e-9), 1),
        "parameters": count_parameters(net), "ddp_params_in_sync": in_sync,
        "final_loss": history[-1]["loss"] if history else None, "history": history,
    }
    if env.is_main:
        held = None if fit_end_ts is None else RowDataset(rows, "train", train_end_ts=train_end_ts, split_by=split,
                                                          min_ts=fit_end_ts)
        if held is not None and held.num_rows:  # the held-out slice, seen by no optimiser step
            summary["calibration"] = calibrate(net, held, env.device).to_dict()
            ckpt.save_model(out, net, {**training_info, "step": step}, step=step)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    env.barrier()
    if not in_sync:
        raise RuntimeError("DDP ranks ended with different parameters")
    return summary


def holdout_start(rows: str | Path, train_end_ts: int | None, share: float,
                  split: Split | str | None = None) -> int | None:
    """The ts from which the most recent ``share`` of the training rows of ``split`` lie: the
    calibration slice is those training rows with ``ts >= start``, the optimiser gets the rest.

    One rule for both splits -- a global ts quantile of the training rows -- so under the
    per-user split too the slice is the latest training data, later than every row the
    optimiser sees. No slice (share 0, under 2 rows): ``train_end_ts`` for the time split
    (a bound that cuts nothing), None for the per-user split.
    """
    import numpy as np

    split = Split.parse(split)
    none = None if split.kind == "user" or train_end_ts is None else int(train_end_ts)
    if share <= 0:
        return none
    ts = np.sort(RowDataset(rows, "train", train_end_ts=train_end_ts, split_by=split, max_memory_mb=0).ts())  # [N]
    if len(ts) < 2:
        return none
    return int(ts[min(len(ts) - 1, int(len(ts) * (1 - share)))])


def calibrate(net: TransActModel, held: RowDataset, device) -> CAL.Calibration:
    """Fits the heads' calibration on the rows of ``held`` (the calibration slice) and sets it on ``net``."""
    from transact.data.schema import LABEL_COLUMNS
    from transact.model.evaluate import predict

    pred = predict(net, held, device=str(device))
    heads = net.cfg.heads
    labels = pred["labels"][:, [LABEL_COLUMNS.index(f"label_{h}") for h in heads]]  # [N, H]
    cal = CAL.fit(pred["logits"], labels, heads, {"start_ts": held.min_ts, "end_ts": held.train_end_ts,
                                                  "split": str(held.split_by)})
    net.set_calibration(cal)
    return cal


# --- benchmark ---------------------------------------------------------------------------------
