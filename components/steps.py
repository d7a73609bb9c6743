"""The pipeline's steps as plain functions over paths and plain values.

The KFP components in :mod:`transact.components.kfp_components` are thin typed
wrappers over these; tests and the CLI call them directly. Each step is idempotent:
run twice on the same inputs, it leaves the same outputs.

What must outlive a step lives under one **storage root** (a local folder, or an object-store
URI on a cluster, where each step is a fresh pod with an empty disk): :class:`Layout` names
its places. A step's own inputs and outputs are KFP artifacts (local paths inside the step).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transact.data import storage
from transact.data.storage import local_path
from transact.model.defaults import TRAIN


@dataclass(frozen=True)
class Layout:
    """The places under a storage root (``root``: a local folder or an object-store URI)."""

    root: str

    def __post_init__(self):
        if not self.root:
            raise ValueError("storage_root: a local folder or an object-store URI (s3://bucket/prefix) is needed")

    @property
    def quarantine(self) -> str:
        return storage.join(self.root, "quarantine")

    @property
    def reference(self) -> str:
        return storage.join(self.root, "validation", "reference.json")

    @property
    def registry(self) -> str:
        return storage.join(self.root, "registry")

    @property
    def feature_repo(self) -> str:
        return storage.join(self.root, "feature_repo")

    @property
    def trainjobs(self) -> str:
        """Where a TrainJob's rows and model travel between the step and its nodes."""
        return storage.join(self.root, "trainjobs")


#: attempts at promotion when other runs keep moving the champion (each one gates again)
PROMOTE_ATTEMPTS = 5


def ingest(world_dir: str, profile: str = "demo", seed: int = 0, source: str = "",
           drift: str = "none", progress: bool = True) -> dict:
    """Simulates a world (``source`` empty) or imports a team's logs from ``source`` (a folder
    or an object-store URI: copied into this step first)."""
    out = Path(world_dir)
    if source:
        from transact.data.adapter import import_logs

        if not storage.is_remote(source):
            return import_logs(local_path(source, "source"), out)
        with tempfile.TemporaryDirectory(prefix="transact-source-") as tmp:
            return import_logs(storage.download_tree(source, Path(tmp) / "source"), out)
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

    ``quarantine_dir`` and ``reference`` may be object-store URIs: the reference is read from
    there and a passing batch's profile written back (one PUT); a failed batch is quarantined
    into a staging folder beside it (reports first, then the move, as locally), then published
    to ``quarantine_dir`` under a name of its own and only then deleted here
    (:func:`~transact.data.storage.move_tree`). A step killed mid-way leaves the batch in staging
    (on a cluster the pod's disk goes with it, and the batch stays what it was: the ingest step's
    output artifact); the next validation beside it publishes what staging still holds first.
    Returns ``{"passed": bool, "summary": markdown, ...}``.
    """
    import uuid

    from transact.validation import validate_world

    remote_q = storage.is_remote(quarantine_dir)
    staging = Path(world_dir).resolve().parent / ".quarantine-staging"
    quarantine = staging if remote_q else local_path(quarantine_dir, "quarantine_dir")

    def publish_staged(batch: Path, rows: dict | None = None) -> str:
        where = storage.join(quarantine_dir, f"{batch.name}-{uuid.uuid4().hex[:8]}")  # never two writers' name
        storage.move_tree(batch, where, meta={"rows": rows or {}})
        return where

    if remote_q and staging.is_dir():  # left by a step killed between the move and the publish
        for left in sorted(p for p in staging.iterdir() if p.is_dir() and not p.name.startswith(".")):
            publish_staged(left)
    with tempfile.TemporaryDirectory(prefix="transact-validate-") as tmp:
        ref: Path | None = None
        if reference and storage.is_remote(reference):
            ref = Path(tmp) / "reference.json"
            if storage.exists(reference):
                ref.write_bytes(storage.read_bytes(reference))
        elif reference:
            ref = local_path(reference, "reference")
        result = validate_world(world_dir, quarantine, reference=ref).to_dict()
        if ref is not None and storage.is_remote(reference) and result.get("reference_written"):
            storage.write_bytes(reference, ref.read_bytes())
            result["reference_written"] = reference
    if remote_q and result.get("quarantine"):
        result["quarantine"] = publish_staged(Path(result["quarantine"]), result.get("rows"))
    if remote_q and staging.is_dir() and not any(staging.iterdir()):
        with contextlib.suppress(OSError):  # another run beside this one may be using it
            staging.rmdir()
    return result


def materialize_features(world_dir: str, repo_dir: str, progress: bool = True, redis: str = "") -> dict:
    """Feast: the world's sequences into the offline sources, ``feast apply``, then
    materialisation into the online store. Re-running rewrites the same rows (idempotent).

    ``repo_dir`` is created from the project's ``feature_repo`` definitions when it has no
    ``feature_store.yaml`` yet. An object-store ``repo_dir`` is built in a folder of this step and
    published there whole (:mod:`transact.features.feast.published`). ``redis``
    (``host:port[,password=...]``): the online store is Redis at that address (given to Feast
    here, never written into the repo); empty: the repo's own (SQLite for a new one).
    """
    from transact.features.feast.materialize import materialize
    from transact.features.feast.offline import write_offline
    from transact.features.feast.published import build_and_publish
    from transact.features.feast.store import apply, init_repo, open_store

    def build(repo: Path) -> dict:
        if not (repo / "feature_store.yaml").exists():
            init_repo(repo, online="redis" if redis else "sqlite")  # the address stays a ${...} placeholder
        written = write_offline(world_dir, repo, progress=progress)
        store = open_store(repo, redis=redis or None)
        applied = apply(store)
        loaded = materialize(store, progress=progress)
        return {"repo": str(repo), "offline": written, "apply": applied, "materialize": loaded}

    if storage.is_remote(repo_dir):
        return build_and_publish(build, repo_dir)
    return build(local_path(repo_dir, "feature_repo"))


ROWS_FILE = "nn_rows.parquet"
#: the rows of ``engine="ray"``: a folder of parts (training reads either)
ROWS_PARTS = "nn_rows"


def log_nn(world_dir: str, rows_dir: str, batch_requests: int = 256, progress: bool = True,
           engine: str = "local", ray_address: str = "", partitions: int = 0, parts_at: str = "") -> dict:
    """Logs the NN-feature rows into ``rows_dir`` (with the world's ``world.json``, which
    carries the train/eval split point): one file (``local``), or a folder of parts built
    on Ray (``ray``: a local Ray, or the cluster at ``ray_address``; see docs/scale-out.md).

    ``parts_at`` (Ray): publish the parts there instead, e.g. under the step's output artifact URI
    on a cluster, where Ray workers write them without a shared volume; ``world_dir`` may then be
    the world artifact's URI too. ``rows_dir`` still gets world.json (what the step itself outputs)."""
    from transact.components.ray_engine import run_log_nn, summary_location

    if parts_at and engine != "ray":
        raise ValueError("parts_at: only the ray engine publishes parts to a location")
    rows = parts_at or str(Path(rows_dir) / (ROWS_PARTS if engine == "ray" else ROWS_FILE))
    Path(rows_dir).mkdir(parents=True, exist_ok=True)
    world_json = storage.read_bytes(storage.join(world_dir, "world.json"))
    storage.write_bytes(Path(rows_dir) / "world.json", world_json)
    done = storage.read_manifest(rows, missing_ok=True) is not None if parts_at else Path(rows).exists()
    if done and storage.exists(summary_location(rows)):  # a retried step: the rows stand
        if parts_at:  # and objects of an attempt killed before they did go: they would travel with the artifact
            storage.sweep_unpublished(rows)
        return storage.read_json(summary_location(rows))
    other = Path(rows_dir) / (ROWS_FILE if engine == "ray" else ROWS_PARTS)
    if other.exists():  # the other engine's rows: training must read one set, never both
        shutil.rmtree(other) if other.is_dir() else other.unlink()
    return run_log_nn(world_dir, rows, engine=engine, address=ray_address or None, partitions=partitions or None,
                      batch_requests=batch_requests, progress=progress)


def train(rows_path: str, model_dir: str, model: str = TRAIN.model, epochs: int = TRAIN.epochs,
          batch_size: int = TRAIN.batch_size, lr: float = TRAIN.lr, seed: int = TRAIN.seed, max_steps: int = 0,
          progress: bool = True, eval_split: str = "time") -> dict:
    """Trains ``model`` on the training rows of ``eval_split`` ("time", or "user" / "user:N": each
    user's last requests held out); ``max_steps`` > 0 caps the optimiser steps (a time budget on
    small machines). The model's config.json records the split: evaluate and gate read it there."""
    from transact.model.train import train as run_train

    # The time split's point comes from the world.json beside the rows.
    return run_train(rows_path, model_dir, model, epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed, step_budget=max_steps or None, progress=progress, split=eval_split)


def train_trainjob(rows_path: str, model_dir: str, shared_dir: str, model: str = TRAIN.model,
                   epochs: int = TRAIN.epochs, batch_size: int = TRAIN.batch_size, lr: float = TRAIN.lr,
                   seed: int = TRAIN.seed, max_steps: int = 0, nodes: int = 1,
                   gpus_per_node: int = 1, image: str = "", shared_pvc: str = "", backend: str = "kubernetes",
                   namespace: str = "", kubeconfig: str = "", env: dict | None = None, storage_secret: str = "",
                   poll_s: int = 10, eval_split: str = "time") -> dict:
    """:func:`train` as a Kubeflow Trainer TrainJob of ``nodes`` x ``gpus_per_node`` DDP
    processes (one pod cannot hold more than one node's GPUs); ``shared_dir``: an object-store
    URI the step and the nodes exchange rows and model through, or a folder all of them mount
    (:mod:`transact.components.trainjob`). The model comes back into ``model_dir``."""
    from transact.components.trainjob import run_trainjob

    args = dict(model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, step_budget=max_steps or None,
                split=eval_split)  # the spec string: it travels to the nodes as JSON
    return run_trainjob(rows_path, model_dir, shared_dir, args, nodes=nodes, gpus_per_node=gpus_per_node,
                        image=image, backend=backend, namespace=namespace, kubeconfig=kubeconfig,
                        shared_pvc=shared_pvc, env=env, storage_secret=storage_secret, poll_s=poll_s)


def evaluate(model_dir: str, rows_path: str, out_dir: str, n_boot: int = 500,
             progress: bool = True, train_end_ts: int | None = None, split: str | None = None) -> dict:
    """HIT@3 (with intervals), AUC and log-loss on the evaluation rows of ``split`` (default: the
    split the model was trained with); writes ``metrics.json`` and a Markdown report, both naming
    the split, into ``out_dir``."""
    from transact.model.evaluate import evaluate as run_eval, format_metrics

    m = run_eval(model_dir, rows_path, out_dir, n_boot=n_boot, progress=progress,
                 train_end_ts=train_end_ts, split=split)
    (Path(out_dir) / "report.md").write_text(
        f"# Evaluation of `{m['model']}`\n\n{m['split']}\n\n```\n{format_metrics(m)}\n```\n")
    return m


def gate(challenger_metrics: dict, model_dir: str, rows_path: str, registry: str,
         tolerance: float = 0.02, progress: bool = True) -> dict:
    """Challenger vs the registry's champion, both evaluated on the same evaluation rows (the
    challenger's split: its time window, or each user's last requests).

    The challenger passes when HIT@3/repin is no more than ``tolerance`` (relative) below
    the champion's, HIT@3/hide no more than ``tolerance`` above it, and the log-loss of each
    head's probabilities (calibrated: what ``/rank`` returns) no more than ``tolerance`` above
    the champion's. With no champion yet, it passes. ``champion_generation`` in the result is the champion it was judged
    against (0: none): promotion succeeds only while that is still the champion.
    """
    from transact.model.registry import Registry

    reg = Registry(registry)
    current = reg.champion()
    if current is None:
        return {"passed": True, "reason": "no champion yet: the first model is promoted", "champion_generation": 0}
    with tempfile.TemporaryDirectory(prefix="transact-gate-") as tmp:
        champion_model = reg.fetch_model(current.model_id, Path(tmp) / "champion")
        champ = evaluate(str(champion_model), rows_path, str(Path(tmp) / "champion_eval"),
                         progress=progress, train_end_ts=challenger_metrics["eval_window"]["train_end_ts"],
                         split=challenger_metrics["eval_window"].get("split", "time"))
    c_rep, c_hide = champ["hit"]["repin"]["value"], champ["hit"]["hide"]["value"]
    n_rep, n_hide = challenger_metrics["hit"]["repin"]["value"], challenger_metrics["hit"]["hide"]["value"]
    checks = {
        "repin": n_rep >= c_rep * (1 - tolerance),
        "hide": n_hide <= c_hide * (1 + tolerance),
    }
    said = [f"HIT@3/repin {n_rep:.4f} vs champion {c_rep:.4f} ({'ok' if checks['repin'] else 'regressed'})",
            f"HIT@3/hide {n_hide:.4f} vs champion {c_hide:.4f} ({'ok' if checks['hide'] else 'regressed'})"]
    champion, challenger = {"repin": c_rep, "hide": c_hide}, {"repin": n_rep, "hide": n_hide}
    for h in sorted(set(champ["heads"]) & set(challenger_metrics["heads"])):  # the heads both models have
        c_ll, n_ll = champ["heads"][h]["logloss"], challenger_metrics["heads"][h]["logloss"]
        checks[f"logloss/{h}"] = n_ll <= c_ll * (1 + tolerance)
        said.append(f"log-loss/{h} {n_ll:.4f} vs champion {c_ll:.4f} ({'ok' if checks[f'logloss/{h}'] else 'regressed'})")
        champion[f"logloss/{h}"], challenger[f"logloss/{h}"] = c_ll, n_ll
    passed = all(checks.values())
    reason = "; ".join(said) + f"; tolerance {tolerance:.0%}; {champ['split']}"
    return {"passed": passed, "reason": reason, "champion": champion, "challenger": challenger,
            "champion_generation": current.generation, "champion_model": current.model_id}


def promote(model_dir: str, registry: str, metrics: dict, gated_against: int, rows_path: str,
            tolerance: float = 0.02, lineage: dict | None = None, progress: bool = True) -> dict:
    """Makes the gated model the registry's champion -- if the champion is still the one it
    was gated against (generation ``gated_against``). When another run moved it meanwhile,
    the model is gated again against the new champion and promoted only if it passes again
    (:mod:`transact.model.registry` says why this is race-free). Returns ``promoted`` (bool),
    ``reason``, and on success ``generation`` and ``model_id``."""
    from transact.model.registry import ChampionMoved, Registry

    reg = Registry(registry)
    reasons = []
    for _ in range(PROMOTE_ATTEMPTS):
        try:
            record = reg.promote(model_dir, metrics, lineage or {}, expected=gated_against)
        except ChampionMoved as moved:
            again = gate(metrics, model_dir, rows_path, registry, tolerance, progress=progress)
            reasons.append(f"{moved}: {again['reason']}")
            if not again["passed"]:
                return {"promoted": False, "reason": "; ".join(reasons), "registry": registry}
            gated_against = again["champion_generation"]
            continue
        return {"promoted": True, "generation": record.generation, "model_id": record.model_id,
                "previous": record.previous, "registry": registry,
                "reason": "; ".join([*reasons, f"champion generation {record.generation}"])}
    raise RuntimeError(f"{registry}: the champion moved {PROMOTE_ATTEMPTS} times while this run was gated; "
                       "try again when fewer runs promote at once")


def package(model_dir: str, registry: str = "") -> dict:
    """Puts the model into the BentoML model store (idempotent: same weights, same tag) and,
    with a ``registry``, exports it there (``<registry>/bentoml/<name>-<version>.bentomodel``) so
    that a fresh machine can serve it (``transact serve --from-registry``)."""
    from transact.serving.packaging import export_model, package_model

    packaged = package_model(model_dir)
    if registry:
        packaged["exported"] = export_model(packaged["tag"], registry)
    return packaged
