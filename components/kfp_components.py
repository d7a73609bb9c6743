"""KFP v2 components: thin typed wrappers over :mod:`transact.components.steps`.

No ``from __future__ import annotations`` here: KFP reads the real annotation types.
Every body imports what it needs (KFP ships the function's source alone to the
task), so one image holding the project runs every step on a cluster. Locally the
same components run in subprocesses of this environment (``SubprocessRunner(use_venv=False)``).

``BASE_IMAGE`` names that image for clusters; override it with ``TRANSACT_BASE_IMAGE``
when compiling. It is built from this repository (``pip install .`` on a Python 3.11
image with CUDA for the GPU steps).
"""

import os

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from transact import __version__
from transact.model.defaults import TRAIN  # noqa: F401  (the pipelines' training parameters default to these)

#: the image tag is the project's version (pyproject.toml), never written twice
BASE_IMAGE = os.environ.get("TRANSACT_BASE_IMAGE", f"ghcr.io/transact-v2/transact:{__version__}")
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
def validate_op(world: Input[Dataset], quarantine_dir: str, reference: str, report: Output[Markdown]) -> str:
    """Great Expectations; returns "pass" or "fail" (the failed batch is quarantined)."""
    from transact.components import steps

    result = steps.validate(world.path, quarantine_dir, reference)
    with open(report.path, "w") as f:
        f.write(result.get("summary", ""))
    if result.get("data_docs"):  # the GX Data Docs index, for the run summary to link
        report.metadata["data_docs"] = result["data_docs"]
    print(result.get("summary", ""))
    return "pass" if result["passed"] else "fail"


@dsl.component(**_opts)
def features_op(world: Input[Dataset], repo_dir: str) -> str:
    """Feast: write sources, apply, materialise the lifelong sequence, push realtime ones."""
    import json

    from transact.components import steps

    return json.dumps(steps.materialize_features(world.path, repo_dir), default=str)


@dsl.component(**_opts)
def log_nn_op(world: Input[Dataset], rows: Output[Dataset], engine: str = "local", ray_address: str = "") -> int:
    """NN-feature logging: one compact row per (request, candidate); ``engine="ray"`` builds
    them on Ray (``ray_address``: a RayCluster's Jobs API, else a Ray inside this step)."""
    from transact.components import steps

    summary = steps.log_nn(world.path, rows.path, progress=False, engine=engine, ray_address=ray_address)
    rows.metadata["rows"] = summary["rows"]
    return int(summary["rows"])


@dsl.component(**_opts)
def train_op(rows: Input[Dataset], model_name: str, epochs: int, batch_size: int, lr: float, seed: int,
             max_steps: int, model: Output[Model]) -> str:
    """Train (CPU here; on a cluster this task gets a GPU)."""
    import json

    from transact.components import steps

    summary = steps.train(rows.path, model.path, model_name, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, max_steps=max_steps, progress=False)
    model.metadata["model"] = model_name
    return json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


@dsl.component(**_opts)
def trainjob_op(rows: Input[Dataset], model_name: str, epochs: int, batch_size: int, lr: float, seed: int,
                max_steps: int, nodes: int, gpus_per_node: int, shared_dir: str, shared_pvc: str, image: str,
                model: Output[Model]) -> str:
    """Train as a Kubeflow Trainer TrainJob (nodes x GPUs, DDP); this task only waits for it."""
    import json

    from transact.components import steps

    summary = steps.train_trainjob(rows.path, model.path, shared_dir, model_name, epochs=epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, max_steps=max_steps, nodes=nodes,
                                   gpus_per_node=gpus_per_node, image=image, shared_pvc=shared_pvc)
    model.metadata.update(model=model_name, trainjob=summary["trainjob"], nodes=nodes, gpus_per_node=gpus_per_node)
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
def gate_op(metrics_json: str, model: Input[Model], rows: Input[Dataset], champion_dir: str,
            tolerance: float, report: Output[Markdown]) -> str:
    """Challenger vs champion on the same window; "pass" or "fail"."""
    import json

    from transact.components import steps

    g = steps.gate(json.loads(metrics_json), model.path, rows.path, champion_dir, tolerance, progress=False)
    with open(report.path, "w") as f:
        f.write(f"# Gate: {'PASS' if g['passed'] else 'FAIL'}\n\n{g['reason']}\n")
    print(f"gate: {'pass' if g['passed'] else 'FAIL'}: {g['reason']}")
    return "pass" if g["passed"] else "fail"


@dsl.component(**_opts)
def package_op(model: Input[Model], metrics_json: str, champion_dir: str, bento: Output[Dataset]) -> str:
    """Promote to champion and put the model into the BentoML model store."""
    import json

    from transact.components import steps

    promoted = steps.promote(model.path, champion_dir, json.loads(metrics_json))
    packaged = steps.package(promoted["champion"])
    with open(bento.path, "w") as f:
        json.dump({**promoted, **packaged}, f, indent=2, default=str)
    return json.dumps({**promoted, **packaged}, default=str)
