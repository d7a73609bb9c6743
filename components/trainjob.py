"""The train step as a Kubeflow Trainer ``TrainJob``: N nodes x G GPUs, DDP inside.

One KFP pod holds one node's GPUs at most; a TrainJob on the ``torch-distributed``
runtime spreads training over several nodes. Every node runs ``torchrun`` (the runtime
sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``, ...) and every process
runs :func:`train_node`, which calls :func:`transact.model.train.train`: its ``DistEnv``
joins the process group exactly as under ``torchrun -m transact.cli train``, so the
TrainJob trains the model that command trains.

The nodes and the launching step exchange the rows and the model through ``shared_dir``:

- an object-store URI (``s3://bucket/root/trainjobs``; no volume needed): the launcher
  publishes the rows there, the first process of each node fetches them onto the node's disk
  (every byte checked), node 0's rank 0 publishes the model, and the launcher fetches it;
- or a folder every node and the launching step mount at the same path (a ReadWriteMany PVC,
  ``shared_pvc``): the launcher copies the rows in, the job writes the model there, and the
  launcher copies it back into the step's output.

Two backends of the Kubeflow SDK (``kubeflow.trainer``):

- ``kubernetes``: the cluster (in-cluster config, or ``kubeconfig``); nodes run ``image``.
- ``local``: the SDK's local process backend, for tests and laptops: one ``torchrun``
  with ``nodes x gpus_per_node`` processes on this machine, in a venv the SDK builds
  (``python -m venv`` + ``pip install torch``). That venv gets exactly this environment's
  torch build (never a CUDA download), then :func:`train_node` puts this environment's
  site-packages first on ``sys.path`` so the job imports this project.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from transact.data import storage

#: the Kubeflow Trainer runtime every TrainJob of this project runs on
RUNTIME = "torch-distributed"
#: the node container of the runtime (its logs; the PVC is mounted there)
NODE = "node"
LOG_FILE = "trainjob.log"
BACKENDS = ("kubernetes", "local")


def train_node(args: dict | None = None, **kwargs) -> None:
    """What every process of the TrainJob runs (under torchrun, one per GPU).

    The SDK ships this function as source text and calls it with the arguments: the
    local backend as one dict, the Kubernetes backend as keywords; both arrive here. On
    a cluster the source passes an unquoted bash here-document, so it holds no dollar
    sign, backquote or backslash (not even in this docstring). python_paths (site-packages
    folders) go first on sys.path, .pth files included, so that the local job imports the
    launching environment; the rest are the arguments of transact.model.train.train.
    """
    import os
    import site
    import sys

    args = {**(args or {}), **kwargs}
    before = list(sys.path)
    for path in args.pop("python_paths", None) or []:
        if os.path.isdir(path):
            site.addsitedir(path)
    sys.path[:] = [p for p in sys.path if p not in before] + before

    from transact.components.trainjob import stage_in, stage_out
    from transact.model.train import train

    stage = args.pop("stage", None)
    if stage:
        stage_in(stage)
    train(**args)
    if stage:
        stage_out(stage, args["out"])


def stage_in(stage: dict) -> None:
    """The rows of an object-store TrainJob onto this node's disk, once per node: the first
    process takes the lock and fetches them (every byte checked); the others find them there."""
    import fcntl

    from transact.data import storage

    local = Path(stage["local"])
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (local / "rows" / storage.MANIFEST).exists():
            storage.fetch_tree(stage["rows"], local / "rows")


def stage_out(stage: dict, out: str) -> None:
    """The trained model to the object store, by the process that wrote it (global rank 0)."""
    from transact.data import storage

    if os.environ.get("RANK", "0") == "0":
        storage.publish_tree(out, stage["model"])


def make_client(backend: str = "kubernetes", namespace: str = "", kubeconfig: str = ""):
    """A ``TrainerClient`` on the cluster (in-cluster config inside a pod, else
    ``kubeconfig`` / ~/.kube/config) or on the local process backend."""
    from kubeflow.trainer import KubernetesBackendConfig, LocalProcessBackendConfig, TrainerClient

    if backend == "local":
        return TrainerClient(LocalProcessBackendConfig(cleanup_venv=True))
    if backend == "kubernetes":
        if kubeconfig and not namespace:  # the SDK would read ~/.kube/config's namespace, not this file's
            from kubernetes import config

            namespace = config.list_kube_config_contexts(config_file=kubeconfig)[1]["context"].get("namespace", "")
        return TrainerClient(KubernetesBackendConfig(namespace=namespace or None, config_file=kubeconfig or None))
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _shell_safe(value, where: str) -> None:
    """The Kubernetes runtime writes the function call through an unquoted bash
    here-document: a dollar sign, backquote or backslash in an argument would be expanded."""
    if isinstance(value, str) and any(c in value for c in "$`\\"):
        raise ValueError(f"{where} = {value!r}: no $, ` or \\ in TrainJob arguments")
    if isinstance(value, (list, tuple)):
        for v in value:
            _shell_safe(v, where)
    if isinstance(value, dict):  # the object-store stage: URIs built from the storage root
        for k, v in value.items():
            _shell_safe(k, where)
            _shell_safe(v, f"{where}.{k}")


def _local_env(env: dict | None) -> dict:
    """The local backend starts the job with exactly ``CustomTrainer.env``: PATH, HOME and
    this machine's pip settings go along (the job's ``pip install`` must find the same
    wheels); torchrun reads its options from ``PET_*`` variables."""
    keep = {k: v for k, v in os.environ.items()
            if k in ("PATH", "HOME", "LANG", "TMPDIR") or k.startswith(("PIP_", "TRANSACT_"))}
    return {"OMP_NUM_THREADS": "1", **keep, **(env or {})}


def build_trainer(train_args: dict, *, nodes: int, gpus_per_node: int, image: str, backend: str = "kubernetes",
                  env: dict | None = None):
    """The ``CustomTrainer`` for ``nodes`` x ``gpus_per_node`` processes running
    :func:`train_node` with ``train_args`` (:func:`transact.model.train.train`'s)."""
    from importlib.metadata import version

    from kubeflow.trainer import CustomTrainer

    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if backend == "local":
        # One machine: every process of every node, CPU (gloo) or this machine's GPUs.
        local_env = {**_local_env(env), "PET_NPROC_PER_NODE": str(nodes * gpus_per_node), "PET_STANDALONE": "1"}
        index = os.environ.get("PIP_INDEX_URL")
        index_urls: dict[str, Any] = {"pip_index_urls": [index]} if index else {}
        return CustomTrainer(func=train_node, func_args={**train_args, "python_paths": site.getsitepackages()},
                             packages_to_install=[f"torch=={version('torch')}"], env=local_env, **index_urls)
    if backend != "kubernetes":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not image:
        raise ValueError("image is required on a cluster: the nodes must hold the project (BASE_IMAGE)")
    for key, value in train_args.items():
        _shell_safe(value, key)
    return CustomTrainer(func=train_node, func_args=dict(train_args), image=image, num_nodes=nodes,
                         resources_per_node={"gpu": str(gpus_per_node)}, env=dict(env) if env else None)


#: the standard variables an object-store client reads, taken from ``storage_secret`` when they are there
STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
               "AWS_DEFAULT_REGION")


def build_options(name: str, shared_dir: str, shared_pvc: str = "", backend: str = "kubernetes",
                  storage_secret: str = "") -> list:
    """The job's name and, on a cluster, a patch of the node container: ``shared_pvc`` mounted at
    ``shared_dir``, and the object-store variables from the Kubernetes Secret ``storage_secret``
    (by reference: no credential is written into the TrainJob)."""
    from kubeflow.trainer import options as o

    opts: list = [o.Name(name)]
    if backend != "kubernetes":
        return opts
    opts.append(o.Labels({"app.kubernetes.io/part-of": "transact"}))
    if not (shared_pvc or storage_secret):
        return opts
    env = [{"name": k, "valueFrom": {"secretKeyRef": {"name": storage_secret, "key": k, "optional": True}}}
           for k in STORAGE_ENV] if storage_secret else None
    mounts = [{"name": "shared", "mountPath": shared_dir}] if shared_pvc else None
    volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": shared_pvc}}] if shared_pvc else None
    pod = o.PodSpecPatch(volumes=volumes, containers=[o.ContainerPatch(name=NODE, env=env, volume_mounts=mounts)])
    job = o.JobTemplatePatch(spec=o.JobSpecPatch(template=o.PodTemplatePatch(spec=pod)))
    opts.append(o.RuntimePatch(training_runtime_spec=o.TrainingRuntimeSpecPatch(template=o.JobSetTemplatePatch(
        spec=o.JobSetSpecPatch(replicated_jobs=[o.ReplicatedJobPatch(name=NODE, template=job)])))))
    return opts


def check_local_python() -> None:
    """The local backend builds the job's venv from the first ``python`` on PATH (the SDK
    looks it up itself); the job imports this environment's site-packages, which fit only
    the same Python version. One-line ValueError when they differ (the PATH is the caller's:
    activate this environment, or put its ``bin`` first)."""
    found = shutil.which("python") or shutil.which("python3")
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    got = None
    if found:
        r = subprocess.run([found, "-c", "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')"],
                           capture_output=True, text=True, timeout=60)
        got = r.stdout.strip() if r.returncode == 0 else None
    if got != want:
        raise ValueError(f"the local TrainJob backend runs the first python on PATH ({found or 'none found'}, "
                         f"Python {got or '?'}), but this environment is Python {want}: put "
                         f"{os.path.dirname(sys.executable)} first on PATH (activate the environment)")


def _copy_rows(rows: Path, dest: Path) -> Path:
    """The rows (a file or a folder of parts) into ``dest``, where every node can read them."""
    dest.mkdir(parents=True, exist_ok=True)
    if rows.is_dir():
        shutil.copytree(rows, dest / rows.name, dirs_exist_ok=True)
    else:
        shutil.copy2(rows, dest / rows.name)
    return dest / rows.name


def error_line(lines: list[str]) -> str:
    """The line of a failed job's log that says why: the last ``SomeError: ...`` that is
    not torchrun's own summary, else the last non-empty line."""
    pat = re.compile(r"^\s*([\w.]+)?(Error|Exception)\b.*")
    found = [s.strip() for s in lines if pat.match(s) and "ChildFailedError" not in s]
    rest = [s.strip() for s in lines if s.strip()]
    return (found or rest or ["(empty log)"])[-1]


def _save_logs(client, name: str, path: Path, backend: str) -> list[str]:
    """node-0's log into ``path`` (what the SDK can read; the other nodes' pods keep theirs)."""
    try:
        lines = list(client.get_job_logs(name))
    except (RuntimeError, ValueError) as e:  # the pod may be gone: say so in the file
        lines = [f"logs unavailable: {e}"]
    if backend == "kubernetes":
        lines.append(f"# other nodes: kubectl logs -n {getattr(client.backend, 'namespace', '<namespace>')} "
                     f"-l jobset.sigs.k8s.io/jobset-name={name} -c {NODE}")
    path.write_text("\n".join(lines) + "\n")
    return lines


def run_trainjob(rows: str, model_dir: str, shared_dir: str, train_args: dict | None = None, *, nodes: int = 1,
                 gpus_per_node: int = 1, image: str = "", backend: str = "kubernetes", namespace: str = "",
                 kubeconfig: str = "", shared_pvc: str = "", env: dict | None = None, storage_secret: str = "",
                 timeout_s: int = 7 * 86400,
                 poll_s: int = 10, client=None) -> dict:
    """Trains ``rows`` into ``model_dir`` as a TrainJob of ``nodes`` x ``gpus_per_node``
    DDP processes; waits for it; returns the training summary plus ``trainjob`` (its
    name) and ``log`` (node-0's log, under ``shared_dir/<trainjob>/``).

    ``train_args`` are :func:`transact.model.train.train`'s keyword arguments (rows and
    out are set here; train_end_ts is resolved here when absent, so the job needs only
    the row files). A failed job raises one line: the error in its log, and the log's path.
    """
    from transact.model.dataset import Split, default_train_end_ts

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "local":
        check_local_python()
    # Absolute paths: the local backend changes this process's working directory while its job runs.
    rows_p, model_p = Path(rows).resolve(), Path(model_dir).resolve()
    name = f"transact-{uuid.uuid4().hex[:8]}"
    remote = storage.is_remote(shared_dir)
    args = dict(train_args or {})
    if args.get("train_end_ts") is None and Split.parse(args.get("split")).kind == "time":  # per-user: none
        args["train_end_ts"] = default_train_end_ts(rows_p)[0]
    if remote:  # no shared volume: the rows and the model travel through the object store
        work = storage.join(shared_dir, name)
        storage.publish_tree(rows_p if rows_p.is_dir() else rows_p.parent, storage.join(work, "rows"),
                             only=None if rows_p.is_dir() else [rows_p.name])
        node = f"/tmp/{name}"  # each node's own disk
        args.update(rows=f"{node}/rows" + ("" if rows_p.is_dir() else f"/{rows_p.name}"), out=f"{node}/model",
                    progress=False, stage={"rows": storage.join(work, "rows"), "model": storage.join(work, "model"),
                                           "local": node})
        log_local = Path(tempfile.mkdtemp(prefix="transact-trainjob-log-")) / LOG_FILE
        log = storage.join(work, LOG_FILE)
    else:
        work_p = Path(shared_dir).resolve() / name
        args.update(rows=str(_copy_rows(rows_p, work_p / "rows")), out=str(work_p / "model"), progress=False)
        log_local = work_p / LOG_FILE
        log = str(log_local)
    trainer = build_trainer(args, nodes=nodes, gpus_per_node=gpus_per_node, image=image, backend=backend, env=env)
    opts = build_options(name, shared_dir if remote else str(Path(shared_dir).resolve()), shared_pvc, backend,
                         storage_secret)
    client = client or make_client(backend, namespace, kubeconfig)
    client.train(runtime=RUNTIME, trainer=trainer, options=opts)

    def save_logs() -> list[str]:
        lines = _save_logs(client, name, log_local, backend)
        if remote:
            storage.put_file(log_local, log)
        return lines

    try:
        job = client.wait_for_job_status(name, status={"Complete", "Failed"}, timeout=timeout_s,
                                         polling_interval=poll_s)
    except TimeoutError:
        save_logs()
        with contextlib.suppress(RuntimeError, ValueError):  # best effort: stop its processes / free its GPUs
            client.delete_job(name)
        raise TimeoutError(f"TrainJob {name} did not finish in {timeout_s}s (deleted); log so far: {log}") from None
    lines = save_logs()
    if backend == "local" and job.status != "Complete":  # its script stops (set -e) before removing its venv
        for venv in Path(tempfile.gettempdir()).glob(f"{name}*"):
            shutil.rmtree(venv, ignore_errors=True)
    if job.status != "Complete":
        raise RuntimeError(f"TrainJob {name} {job.status}: {error_line(lines)} (full log: {log})")
    if remote:
        try:
            storage.fetch_tree(storage.join(work, "model"), model_p)
        except storage.Unpublished:
            raise RuntimeError(f"TrainJob {name} completed but published no model to {storage.join(work, 'model')}; "
                               f"log: {log}") from None
        storage.remove_tree(storage.join(work, "rows"))  # a copy; the model and the log stay as the job's record
        shutil.rmtree(log_local.parent, ignore_errors=True)
    else:
        if not (work_p / "model" / "model.safetensors").exists():
            raise RuntimeError(f"TrainJob {name} completed but wrote no model to {work_p / 'model'} "
                               f"(is {shared_dir} shared by the nodes and this step?); log: {log}")
        shutil.copytree(work_p / "model", model_p, dirs_exist_ok=True)
        shutil.rmtree(work_p / "rows", ignore_errors=True)  # a copy; the model and the log stay as the job's record
    summary = json.loads((model_p / "train_summary.json").read_text())
    return {**summary, "trainjob": name, "log": log, "nodes": nodes, "gpus_per_node": gpus_per_node}
