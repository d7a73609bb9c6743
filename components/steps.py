"""The pipeline's steps as plain functions over paths and plain values.

The KFP components in :mod:`transact.components.kfp_components` are thin typed
wrappers over these; tests and the CLI call them directly. Each step is idempotent:
run twice on the same inputs, it leaves the same outputs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transact.data.storage import local_path
from transact.model.defaults import TRAIN

#: A champion folder holds the model currently in service: ``model/`` and ``metrics.json``.
CHAMPION_MODEL = "model"


def ingest(world_dir: str, profile: str = "demo", seed: int = 0, source: str = "",
           drift: str = "none", progress: bool = True) -> dict:
    """Simulates a world (``source`` empty) or imports a team's logs from ``source``."""
    out = Path(world_dir)
    if source:
        from transact.data.adapter import import_logs

        return import_logs(local_path(source, "source"), out)
    from dataclasses import asdict

    from transact.data.simulator import DriftConfig, get_profile, simulate

    config = get_profile(profile)
    drift_cfg = None if drift == "none" else DriftConfig(kind=drift)
    meta = out / "world.json"
    if meta.exists():  # the same world is already complete there: keep it (idempotent re-run)
        m = json.loads(meta.read_text())
        same = (m.get("seed") == seed and m.get("config") == json.loads(json.dumps(asdict(config)))
                and (m.get("drift") or {}).get("kind", "none") == drift)
        if same:
            return m
    return simulate(config, out, seed=seed, drift=drift_cfg, progress=progress)


def validate(world_dir: str, quarantine_dir: str, reference: str = "") -> dict:
    """Great Expectations on every table; a failed batch is moved to quarantine.

    Returns ``{"passed": bool, "summary": markdown, ...}``.
    """
    from transact.validation import validate_world

    quarantine = local_path(quarantine_dir, "quarantine_dir")
    ref = local_path(reference, "reference") if reference else None
    result = validate_world(world_dir, quarantine, reference=ref)
    return result.to_dict()


def materialize_features(world_dir: str, repo_dir: str, progress: bool = True) -> dict:
    """Feast: the world's sequences into the offline sources, ``feast apply``, then
    materialisation into the online store. Re-running rewrites the same rows (idempotent).

    ``repo_dir`` is created from the project's ``feature_repo`` definitions when it has no
    ``feature_store.yaml`` yet.
    """
    from transact.features.feast.materialize import materialize
    from transact.features.feast.offline import write_offline
    from transact.features.feast.store import apply, init_repo

    repo = local_path(repo_dir, "feature_repo")
    if not (repo / "feature_store.yaml").exists():
        init_repo(repo)
    written = write_offline(world_dir, repo, progress=progress)
    applied = apply(repo)
    loaded = materialize(repo, progress=progress)
    return {"repo": str(repo), "offline": written, "apply": applied, "materialize": loaded}


ROWS_FILE = "nn_rows.parquet"
#: the rows of ``engine="ray"``: a folder of parts (training reads either)
ROWS_PARTS = "nn_rows"


def log_nn(world_dir: str, rows_dir: str, batch_requests: int = 256, progress: bool = True,
           engine: str = "local", ray_address: str = "", partitions: int = 0) -> dict:
    """Logs the NN-feature rows into ``rows_dir`` (with the world's ``world.json``, which
    carries the train/eval split point): one file (``local``), or a folder of parts built
    on Ray (``ray``: a local Ray, or the cluster at ``ray_address``; see docs/scale-out.md)."""
    from transact.components.ray_engine import run_log_nn

    rows = Path(rows_dir) / (ROWS_PARTS if engine == "ray" else ROWS_FILE)
    rows.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(world_dir) / "world.json", Path(rows_dir) / "world.json")
    summary_path = rows.with_suffix(".json")
    if rows.exists() and summary_path.exists():
        return json.loads(summary_path.read_text())
    other = Path(rows_dir) / (ROWS_FILE if engine == "ray" else ROWS_PARTS)
    if other.exists():  # the other engine's rows: training must read one set, never both
        shutil.rmtree(other) if other.is_dir() else other.unlink()
    return run_log_nn(world_dir, rows, engine=engine, address=ray_address or None, partitions=partitions or None,
                      batch_requests=batch_requests, progress=progress)


def train(rows_path: str, model_dir: str, model: str = TRAIN.model, epochs: int = TRAIN.epochs,
          batch_size: int = TRAIN.batch_size, lr: float = TRAIN.lr, seed: int = TRAIN.seed, max_steps: int = 0,
          progress: bool = True) -> dict:
    """Trains ``model`` on the training window; ``max_steps`` > 0 caps the optimiser steps
    (a time budget on small machines)."""
    from transact.model.train import train as run_train

    # The split point comes from the world.json beside the rows.
    return run_train(rows_path, model_dir, model, epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed, step_budget=max_steps or None, progress=progress)


def train_trainjob(rows_path: str, model_dir: str, shared_dir: str, model: str = TRAIN.model,
                   epochs: int = TRAIN.epochs, batch_size: int = TRAIN.batch_size, lr: float = TRAIN.lr,
                   seed: int = TRAIN.seed, max_steps: int = 0, nodes: int = 1,
                   gpus_per_node: int = 1, image: str = "", shared_pvc: str = "", backend: str = "kubernetes",
                   namespace: str = "", kubeconfig: str = "", env: dict | None = None, poll_s: int = 10) -> dict:
    """:func:`train` as a Kubeflow Trainer TrainJob of ``nodes`` x ``gpus_per_node`` DDP
    processes (one pod cannot hold more than one node's GPUs); ``shared_dir`` is seen by
    this step and every node. The model comes back into ``model_dir``."""
    from transact.components.trainjob import run_trainjob

    args = dict(model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, step_budget=max_steps or None)
    return run_trainjob(rows_path, model_dir, shared_dir, args, nodes=nodes, gpus_per_node=gpus_per_node,
                        image=image, backend=backend, namespace=namespace, kubeconfig=kubeconfig,
                        shared_pvc=shared_pvc, env=env, poll_s=poll_s)


def evaluate(model_dir: str, rows_path: str, out_dir: str, n_boot: int = 500,
             progress: bool = True, train_end_ts: int | None = None) -> dict:
    """HIT@3 (with intervals), AUC and log-loss on the evaluation window; writes
    ``metrics.json`` and a Markdown report into ``out_dir``."""
    from transact.model.evaluate import evaluate as run_eval, format_metrics

    m = run_eval(model_dir, rows_path, out_dir, n_boot=n_boot, progress=progress,
                 train_end_ts=train_end_ts)
    (Path(out_dir) / "report.md").write_text(
        f"# Evaluation of `{m['model']}`\n\n```\n{format_metrics(m)}\n```\n")
    return m


def gate(challenger_metrics: dict, model_dir: str, rows_path: str, champion_dir: str,
         tolerance: float = 0.02, progress: bool = True) -> dict:
    """Challenger vs the champion, both evaluated on the same evaluation window.

    The challenger passes when HIT@3/repin is no more than ``tolerance`` (relative) below
    the champion's and HIT@3/hide no more than ``tolerance`` above it. With no champion
    yet, it passes.
    """
    champion_model = local_path(champion_dir, "champion_dir") / CHAMPION_MODEL
    if not (champion_model / "config.json").exists():
        return {"passed": True, "reason": "no champion yet: the first model is promoted"}
    champ = evaluate(str(champion_model), rows_path, str(Path(model_dir) / "champion_eval"),
                     progress=progress, train_end_ts=challenger_metrics["eval_window"]["train_end_ts"])
    c_rep, c_hide = champ["hit"]["repin"]["value"], champ["hit"]["hide"]["value"]
    n_rep, n_hide = challenger_metrics["hit"]["repin"]["value"], challenger_metrics["hit"]["hide"]["value"]
    checks = {
        "repin": n_rep >= c_rep * (1 - tolerance),
        "hide": n_hide <= c_hide * (1 + tolerance),
    }
    passed = all(checks.values())
    reason = (f"HIT@3/repin {n_rep:.4f} vs champion {c_rep:.4f} ({'ok' if checks['repin'] else 'regressed'}); "
              f"HIT@3/hide {n_hide:.4f} vs champion {c_hide:.4f} ({'ok' if checks['hide'] else 'regressed'}); "
              f"tolerance {tolerance:.0%}")
    return {"passed": passed, "reason": reason, "champion": {"repin": c_rep, "hide": c_hide},
            "challenger": {"repin": n_rep, "hide": n_hide}}


def promote(model_dir: str, champion_dir: str, metrics: dict) -> dict:
    """Makes the model the champion (copied atomically: a new folder, then renamed)."""
    champ = local_path(champion_dir, "champion_dir")
    champ.mkdir(parents=True, exist_ok=True)
    tmp = champ / f".{CHAMPION_MODEL}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("train_state", "eval", "champion_eval"))
    old = champ / f".{CHAMPION_MODEL}.old"
    shutil.rmtree(old, ignore_errors=True)
    if (champ / CHAMPION_MODEL).exists():
        (champ / CHAMPION_MODEL).rename(old)
    tmp.rename(champ / CHAMPION_MODEL)
    shutil.rmtree(old, ignore_errors=True)
    (champ / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"champion": str(champ / CHAMPION_MODEL)}


def package(model_dir: str) -> dict:
    """Puts the model into the BentoML model store (idempotent: same weights, same tag)."""
    from transact.serving.packaging import package_model

    return package_model(model_dir)
