"""KFP v2 components: thin typed wrappers over :mod:`transact.components.steps`.

No ``from __future__ import annotations`` here: KFP reads the real annotation types.
Every body imports what it needs (KFP ships the function's source alone to the
task), so one image holding the project runs every step on a cluster. Locally the
same components run in subprocesses of this environment (``SubprocessRunner(use_venv=False)``).

``BASE_IMAGE`` names that image for clusters (built from this repository's ``Containerfile``:
``make image``); ``transact pipeline compile|submit --image`` puts another in the compiled
pipeline (:func:`transact.pipelines.runner.with_image`).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from transact import __version__
from transact.model.defaults import TRAIN  # noqa: F401  (the pipelines' training parameters default to these)

#: the image tag is the project's version (pyproject.toml), never written twice
BASE_IMAGE = f"ghcr.io/transact-v2/transact:{__version__}"
_opts = dict(base_image=BASE_IMAGE, install_kfp_package=False)


@dsl.component(**_opts)
def ingest_op(profile: str, seed: int, source: str, drift: str, world: Output[Dataset]) -> str:
    """Simulate a world (empty ``source``) or import logs from ``source``."""
    import json

    from transact.components import steps

    summary = steps.ingest(world.path, profile=profile, seed=seed, source=source, drift=drift, progress=False)
    world.metadata["rows"] = summary.get("rows", {})
    return json.dumps(summary.get("rows", {}))


@dsl.component(**_opts)
def validate_op(world: Input[Dataset], storage_root: str, report: Output[Markdown]) -> str:
    """Great Expectations; returns "pass" or "fail" (the failed batch is quarantined under the storage root)."""
    from transact.components import steps

    where = steps.Layout(storage_root)
    result = steps.validate(world.path, where.quarantine, where.reference)
    with open(report.path, "w") as f:
        f.write(result.get("summary", ""))
    if result.get("data_docs"):  # the GX Data Docs index, for the run summary to link
        report.metadata["data_docs"] = result["data_docs"]
    print(result.get("summary", ""))
    return "pass" if result["passed"] else "fail"


@dsl.component(**_opts)
def features_op(world: Input[Dataset], storage_root: str, repo_dir: str, redis: str) -> str:
    """Feast: write sources, apply, materialise the lifelong sequence, push realtime ones
    (``repo_dir`` empty: ``<storage_root>/feature_repo``; ``redis``: the online store's address)."""
    import json

    from transact.components import steps

    repo = repo_dir or steps.Layout(storage_root).feature_repo
    return json.dumps(steps.materialize_features(world.path, repo, progress=False, redis=redis), default=str)


@dsl.component(**_opts)
def log_nn_op(world: Input[Dataset], rows: Output[Dataset], engine: str = "local", ray_address: str = "") -> int:
    """NN-feature logging: one compact row per (request, candidate); ``engine="ray"`` builds
    them on Ray (``ray_address``: a RayCluster's Jobs API, else a Ray inside this step). A
    RayCluster's workers read the world at its artifact URI and publish the parts under the rows
    artifact's URI themselves (no volume shared with this pod); a Ray inside the step reads the
    local copies Kubeflow made, needing no credentials of its own."""
    from transact.components import steps
    from transact.data import storage

    on_store = engine == "ray" and bool(ray_address) and storage.is_remote(rows.uri)
    summary = steps.log_nn(world.uri if on_store else world.path, rows.path, progress=False, engine=engine,
                           ray_address=ray_address,
                           parts_at=storage.join(rows.uri, steps.ROWS_PARTS) if on_store else "")
    rows.metadata["rows"] = summary["rows"]
    return int(summary["rows"])


@dsl.component(**_opts)
def train_op(rows: Input[Dataset], model_name: str, epochs: int, batch_size: int, lr: float, seed: int,
             max_steps: int, model: Output[Model], eval_split: str = "time") -> str:
    """Train (CPU here; on a cluster this task gets a GPU) on the training rows of ``eval_split``."""
    import json

    from transact.components import steps

    summary = steps.train(rows.path, model.path, model_name, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, max_steps=max_steps, progress=False, eval_split=eval_split)
    model.metadata.update(model=model_name, split=summary["split"]["description"])
    return json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


@dsl.component(**_opts)
def trainjob_op(rows: Input[Dataset], model_name: str, epochs: int, batch_size: int, lr: float, seed: int,
                max_steps: int, nodes: int, gpus_per_node: int, storage_root: str, shared_dir: str, shared_pvc: str,
                storage_secret: str, image: str, model: Output[Model], eval_split: str = "time") -> str:
    """Train as a Kubeflow Trainer TrainJob (nodes x GPUs, DDP); this task only waits for it.
    Rows and model travel through ``<storage_root>/trainjobs`` (``shared_dir`` empty) or a volume."""
    import json

    from transact.components import steps

    shared = shared_dir or steps.Layout(storage_root).trainjobs
    summary = steps.train_trainjob(rows.path, model.path, shared, model_name, epochs=epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, max_steps=max_steps, nodes=nodes,
                                   gpus_per_node=gpus_per_node, image=image, shared_pvc=shared_pvc,
                                   storage_secret=storage_secret, eval_split=eval_split)
    model.metadata.update(model=model_name, split=eval_split, trainjob=summary["trainjob"], nodes=nodes,
                          gpus_per_node=gpus_per_node)
    return json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


@dsl.component(**_opts)
def evaluate_op(model: Input[Model], rows: Input[Dataset], metrics: Output[Metrics],
                report: Output[Markdown]) -> str:
    """HIT@3 per action with bootstrap intervals, AUC and log-loss per head."""
    import json
    import os

    from transact.components import steps

    out = os.path.join(os.path.dirname(report.path), "eval")
    m = steps.evaluate(model.path, rows.path, out, progress=False)
    for action, v in m["hit"].items():
        metrics.log_metric(f"hit@3/{action}", v["value"])
    for head, v in m["heads"].items():
        metrics.log_metric(f"auc/{head}", v["auc"])
    with open(os.path.join(out, "report.md")) as src, open(report.path, "w") as dst:
        text = src.read()
        dst.write(text)
    print(text)
    return json.dumps(m)


@dsl.component(**_opts)
def gate_op(metrics_json: str, model: Input[Model], rows: Input[Dataset], storage_root: str,
            tolerance: float, report: Output[Markdown]) -> str:
    """Challenger vs the registry's champion on the same window: "pass" or "fail". The report's
    metadata carries the champion generation it was judged against (promotion holds only while
    that is still the champion; kfp.local cannot branch on one of several outputs)."""
    import json

    from transact.components import steps

    g = steps.gate(json.loads(metrics_json), model.path, rows.path, steps.Layout(storage_root).registry, tolerance,
                   progress=False)
    with open(report.path, "w") as f:
        f.write(f"# Gate: {'PASS' if g['passed'] else 'FAIL'}\n\n{g['reason']}\n")
    report.metadata["champion_generation"] = int(g["champion_generation"])
    print(f"gate: {'pass' if g['passed'] else 'FAIL'}: {g['reason']}")
    return "pass" if g["passed"] else "fail"


@dsl.component(**_opts)
def package_op(model: Input[Model], rows: Input[Dataset], metrics_json: str, storage_root: str,
               gate_report: Input[Markdown], tolerance: float, run_id: str, bento: Output[Dataset]) -> str:
    """Promote to the registry's champion (if it is still the one the gate judged against, else
    gate again), put the model into the BentoML model store and export it to the registry."""
    import json

    from transact import __version__
    from transact.components import steps

    registry = steps.Layout(storage_root).registry
    lineage = {"run_id": run_id, "version": __version__, "rows": rows.uri, "rows_count": rows.metadata.get("rows"),
               "model": model.metadata.get("model")}
    gated_against = int(gate_report.metadata["champion_generation"])
    promoted = steps.promote(model.path, registry, json.loads(metrics_json), gated_against, rows.path, tolerance,
                             lineage=lineage, progress=False)
    out = {**promoted, "champion": model.path}
    if promoted["promoted"]:
        out.update(steps.package(model.path, registry))
    print(f"promotion: {promoted['reason']}")
    with open(bento.path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    return json.dumps(out, default=str)
