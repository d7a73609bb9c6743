"""The training pipeline (and the retrain pipeline the drift monitor triggers).

    ingest -> validate -[pass]-> features -> log NN features -> train -> evaluate
           -> gate vs champion -[pass]-> promote + package

(train: one pod, or with ``train_nodes`` > 0 a Kubeflow Trainer TrainJob, docs/scale-out.md)

A failed validation stops everything behind it (the batch is in quarantine, the
validation report says why); a failed gate stops packaging (the gate report says
which metric regressed).

What outlives a run -- quarantine, the validation reference, the model registry (champion,
history, exported models), the Feast repo -- lives under ``storage_root``
(:class:`transact.components.steps.Layout`): on a cluster an object-store URI
(``s3://bucket/prefix``), since every step is a fresh pod with an empty disk. It has no default
in the compiled pipeline: a pod-local path there would silently lose all of it. The local
runner gives it a folder of the run.

What a pod's spec needs (a Secret's keys as variables, a volume) cannot be a run parameter: it
is a :class:`Cluster` given when the pipeline is compiled (``transact pipeline compile
--storage-secret ... --shared-pvc ...``), and :func:`pipelines` builds the pipelines for it.
"""

import dataclasses
from dataclasses import dataclass

from kfp import dsl, kubernetes

from transact.components.kfp_components import (
    BASE_IMAGE,
    TRAIN,
    evaluate_op,
    features_op,
    gate_op,
    ingest_op,
    log_nn_op,
    package_op,
    train_op,
    trainjob_op,
    validate_op,
)


@dataclass(frozen=True)
class Defaults:
    """The pipelines' parameter defaults, defined once (both signatures read them)."""

    seed: int = TRAIN.seed
    model_name: str = TRAIN.model
    epochs: int = TRAIN.epochs
    batch_size: int = TRAIN.batch_size
    lr: float = TRAIN.lr
    max_steps: int = 0
    feature_repo: str = ""  #: empty: <storage_root>/feature_repo
    redis: str = ""  #: the Feast online store on a cluster, host:port[,password=...] (empty: SQLite in the repo)
    gate_tolerance: float = 0.02
    #: "time" (the global split at the world's train_end_ts) or "user" / "user:N" (each user's last
    #: N requests held out); the model records it, evaluate and the gate use the same one
    eval_split: str = "time"
    log_nn_engine: str = "local"  #: "ray": NN logging on Ray (docs/scale-out.md)
    ray_address: str = ""  #: a RayCluster's Jobs API (http://<head>:8265); empty: Ray inside the step
    train_nodes: int = 0  #: > 0: train as a Kubeflow Trainer TrainJob on this many nodes (docs/scale-out.md)
    gpus_per_node: int = 1  #: the TrainJob's GPUs (DDP processes) per node
    #: empty: the TrainJob's rows and model travel through <storage_root>/trainjobs (no volume); else a
    #: folder the train step and every node mount (shared_pvc on the nodes)
    shared_dir: str = ""
    shared_pvc: str = ""  #: the PVC mounted at shared_dir on the TrainJob's nodes (empty: already there)
    #: a Kubernetes Secret whose AWS_* keys (credentials, AWS_ENDPOINT_URL) the TrainJob's nodes get
    #: by reference (empty: the nodes' own identity, e.g. IRSA)
    storage_secret: str = ""


@dataclass(frozen=True)
class Cluster:
    """What the compiled pipeline's pods are given, fixed at compile time.

    ``storage_secret``: a Kubernetes Secret whose ``AWS_*`` keys (credentials, ``AWS_ENDPOINT_URL``;
    each optional) every step's container and the TrainJob's nodes get as variables, by reference
    (empty: the pods' own identity, e.g. IRSA or a PodDefault). ``shared_pvc``: a ReadWriteMany
    claim mounted at ``shared_dir`` on the TrainJob step's own pod and on its nodes (the volume
    mode; empty: rows and model travel through the storage root).
    """

    storage_secret: str = ""
    shared_pvc: str = ""
    shared_dir: str = "/mnt/transact-shared"

    def __post_init__(self) -> None:
        if self.shared_pvc and not self.shared_dir.startswith("/"):
            raise ValueError(f"shared_dir must be an absolute path in the pod, got {self.shared_dir!r}")

    def pod(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        """``task`` with the Secret's variables (the object store every step reads and writes)."""
        if self.storage_secret:
            from transact.components.trainjob import STORAGE_ENV

            kubernetes.use_secret_as_env(task, self.storage_secret, {k: k for k in STORAGE_ENV}, optional=True)
        return task


D = Defaults()

#: Steps that talk to storage or services and may fail transiently: retried with backoff.
RETRIES = 3
BACKOFF = "30s"


def _gpu(task: dsl.PipelineTask, cpu: str = "4", memory: str = "32G") -> dsl.PipelineTask:
    """A GPU step on a cluster (ignored, with a warning, by the local runner)."""
    return (task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
            .set_cpu_request(cpu).set_memory_request(memory))


def pipelines(cluster: Cluster = Cluster()) -> dict:
    """The training and retrain pipelines, their pods made for ``cluster``."""
    d = dataclasses.replace(D, storage_secret=cluster.storage_secret, shared_pvc=cluster.shared_pvc,
                            shared_dir=cluster.shared_dir if cluster.shared_pvc else D.shared_dir)
    pod = cluster.pod

    def _evaluate_gate_package(model, rows, storage_root, gate_tolerance) -> None:
        """evaluate -> gate vs champion -[pass]-> promote + package, for either train branch's model."""
        evaluate = _gpu(pod(evaluate_op(model=model, rows=rows)))

        gate = pod(gate_op(metrics_json=evaluate.outputs["Output"], model=model,
                           rows=rows, storage_root=storage_root, tolerance=gate_tolerance))
        gate.set_caching_options(False)  # the champion changes between runs
        _gpu(gate)

        with dsl.If(gate.outputs["Output"] == "pass", name="gate-passed"):
            package = pod(package_op(model=model, rows=rows, metrics_json=evaluate.outputs["Output"],
                                     storage_root=storage_root, gate_report=gate.outputs["report"],
                                     tolerance=gate_tolerance, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
            package.set_caching_options(False).set_retry(RETRIES, backoff_duration=BACKOFF)
            _gpu(package, cpu="2", memory="8G")

    @dsl.pipeline(name="transact-training", description="TransAct V2: events to a packaged, gated model.")
    def training_pipeline(
        storage_root: str,
        profile: str = "demo",
        seed: int = d.seed,
        source: str = "",
        drift: str = "none",
        model_name: str = d.model_name,
        epochs: int = d.epochs,
        batch_size: int = d.batch_size,
        lr: float = d.lr,
        max_steps: int = d.max_steps,
        feature_repo: str = d.feature_repo,
        redis: str = d.redis,
        gate_tolerance: float = d.gate_tolerance,
        log_nn_engine: str = d.log_nn_engine,
        ray_address: str = d.ray_address,
        train_nodes: int = d.train_nodes,
        gpus_per_node: int = d.gpus_per_node,
        shared_dir: str = d.shared_dir,
        shared_pvc: str = d.shared_pvc,
        storage_secret: str = d.storage_secret,
        eval_split: str = d.eval_split,
    ) -> None:
        ingest = pod(ingest_op(profile=profile, seed=seed, source=source, drift=drift))
        ingest.set_retry(RETRIES, backoff_duration=BACKOFF).set_cpu_request("2").set_memory_request("8G")
        # No caching: a failed validation moves the world into quarantine, so a cached
        # ingest output may no longer exist. Re-ingesting the same world is a no-op anyway.
        ingest.set_caching_options(False)

        validate = pod(validate_op(world=ingest.outputs["world"], storage_root=storage_root))
        validate.set_caching_options(False)  # quarantine moves files: always re-check

        with dsl.If(validate.outputs["Output"] == "pass", name="validation-passed"):
            features = pod(features_op(world=ingest.outputs["world"], storage_root=storage_root,
                                       repo_dir=feature_repo, redis=redis))
            features.set_retry(RETRIES, backoff_duration=BACKOFF).set_caching_options(False)

            log_nn = pod(log_nn_op(world=ingest.outputs["world"], engine=log_nn_engine,
                                   ray_address=ray_address).after(features))
            log_nn.set_retry(RETRIES, backoff_duration=BACKOFF).set_cpu_request("4").set_memory_request("16G")

            # One pod with one GPU (the default), or a Kubeflow Trainer TrainJob of train_nodes x
            # gpus_per_node whose launching task holds no GPU. Each branch evaluates, gates and packages
            # its own model: kfp.local cannot pass an artifact through dsl.OneOf.
            with dsl.If(train_nodes < 1, name="single-pod-train"):
                train = _gpu(pod(train_op(rows=log_nn.outputs["rows"], model_name=model_name, epochs=epochs,
                                          batch_size=batch_size, lr=lr, seed=seed, max_steps=max_steps,
                                          eval_split=eval_split)))
                _evaluate_gate_package(train.outputs["model"], log_nn.outputs["rows"], storage_root, gate_tolerance)
            with dsl.Else(name="trainjob-train"):
                # a volume mounted on this pod must be the one the nodes get, at the same path
                volume = dict(shared_dir=cluster.shared_dir, shared_pvc=cluster.shared_pvc) if cluster.shared_pvc \
                    else dict(shared_dir=shared_dir, shared_pvc=shared_pvc)
                trainjob = pod(trainjob_op(rows=log_nn.outputs["rows"], model_name=model_name, epochs=epochs,
                                           batch_size=batch_size, lr=lr, seed=seed, max_steps=max_steps,
                                           nodes=train_nodes, gpus_per_node=gpus_per_node, storage_root=storage_root,
                                           storage_secret=storage_secret, image=BASE_IMAGE, eval_split=eval_split,
                                           **volume))
                if cluster.shared_pvc:
                    kubernetes.mount_pvc(trainjob, cluster.shared_pvc, cluster.shared_dir)
                trainjob.set_cpu_request("2").set_memory_request("8G")
                _evaluate_gate_package(trainjob.outputs["model"], log_nn.outputs["rows"], storage_root, gate_tolerance)

    @dsl.pipeline(name="transact-retrain", description="Retrain on new logs after drift (monitoring trigger).")
    def retrain_pipeline(
        source: str,
        storage_root: str,
        model_name: str = d.model_name,
        epochs: int = d.epochs,
        seed: int = d.seed,
        feature_repo: str = d.feature_repo,
        redis: str = d.redis,
        gate_tolerance: float = d.gate_tolerance,
        eval_split: str = d.eval_split,
    ) -> None:
        training_pipeline(storage_root=storage_root, profile="", seed=seed, source=source, drift="none",
                          model_name=model_name, epochs=epochs, batch_size=d.batch_size, lr=d.lr, max_steps=d.max_steps,
                          feature_repo=feature_repo, redis=redis, gate_tolerance=gate_tolerance, eval_split=eval_split)

    return {"training": training_pipeline, "retrain": retrain_pipeline}


PIPELINES = pipelines()
