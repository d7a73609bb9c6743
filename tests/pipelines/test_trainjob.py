"""Multi-node training as a Kubeflow Trainer TrainJob (components/trainjob.py).

There is no Kubernetes here. The TrainJob the SDK sends is checked against a *fake
Kubernetes API* served on 127.0.0.1 by the test: it records the POSTed TrainJob, answers
the GETs the SDK makes (runtime, TrainJob, pods, logs) and, where asked, runs the posted
node command on this machine the way a torch-distributed node would (torchrun, one
process per requested GPU, here CPU/gloo). The slow test runs the same job on the SDK's
local process backend and compares its model with `torchrun -m transact.cli train`.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import rows_with_split
from transact.components import steps, trainjob
from transact.components.kfp_components import BASE_IMAGE
from transact.features.config import FeatureConfig

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)
TRAIN = dict(model="v2", epochs=2, batch_size=16, lr=3e-3, seed=3)
ENV = {"OMP_NUM_THREADS": "1"}
GROUP = "/apis/trainer.kubeflow.org/v1alpha1"
NS = "ml"
NOW = datetime(2025, 1, 1, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

#: the torch-distributed ClusterTrainingRuntime as Kubeflow Trainer installs it (the fields the SDK reads)
RUNTIME = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {"mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
             "template": {"spec": {"replicatedJobs": [{
                 "name": "node", "template": {
                     "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                     "spec": {"template": {"spec": {"containers": [{
                         "name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime",
                         "command": ["/bin/bash", "-c"]}]}}}}}]}}},
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """A row file with world.json next to it (train = first ~75% of the requests)."""
    return rows_with_split(tmp_path_factory.mktemp("world"), 48, FCFG, n_users=12, seed=0)


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


class FakeKube:
    """A fake Kubernetes API for the Trainer SDK; ``run_nodes`` runs each posted TrainJob's
    node command here (node 0 only, one process per GPU in resourcesPerNode)."""

    def __init__(self, tmp: Path, run_nodes: bool):
        self.tmp, self.run_nodes = tmp, run_nodes
        self.posted: list[dict] = []
        self.jobs: dict[str, dict] = {}  # name -> {"job", "phase", "log", "thread"}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body, content_type: str = "application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                code, body, ctype = fake.get(urlparse(self.path).path)
                self._send(code, body, ctype)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(201, fake.create(body))

            def do_DELETE(self):
                fake.jobs.pop(urlparse(self.path).path.rsplit("/", 1)[-1], None)
                self._send(200, {"kind": "Status", "status": "Success"})

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        for job in list(self.jobs.values()):
            if job["thread"]:
                job["thread"].join()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self) -> str:
        path = self.tmp / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.server.server_port}"}}],
            "users": [{"name": "me", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": NS}}]}))
        return str(path)

    def create(self, body: dict) -> dict:
        self.posted.append(body)
        name = body["metadata"]["name"]
        job = {"job": {**body, "metadata": {**body["metadata"], "namespace": NS, "creationTimestamp": NOW}},
               "phase": "Running" if self.run_nodes else "Succeeded", "log": "", "thread": None}
        self.jobs[name] = job
        if self.run_nodes:
            job["thread"] = threading.Thread(target=self._run_node, args=(name,))
            job["thread"].start()
        return job["job"]

    def _run_node(self, name: str) -> None:
        """What a torch-distributed node does: the trainer's command, PET_NPROC_PER_NODE = its GPUs."""
        trainer = self.jobs[name]["job"]["spec"]["trainer"]
        gpus = trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
        cwd = self.tmp / name
        cwd.mkdir()
        env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], "HOME": str(cwd),
               **ENV, **{e["name"]: e["value"] for e in trainer.get("env") or []},
               "PET_NPROC_PER_NODE": str(gpus), "PET_STANDALONE": "1"}
        p = subprocess.run(trainer["command"], cwd=cwd, env=env, capture_output=True, text=True)
        self.jobs[name].update(log=p.stdout + p.stderr, phase="Succeeded" if p.returncode == 0 else "Failed")

    def get(self, path: str):
        if path.endswith("/configmaps/kubeflow-trainer-public"):
            return 200, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kubeflow-trainer-public"},
                         "data": {"kubeflow_trainer_version": "v2.1.0"}}, "application/json"
        if path == f"{GROUP}/clustertrainingruntimes/torch-distributed":
            return 200, RUNTIME, "application/json"
        if path.startswith(f"{GROUP}/namespaces/{NS}/trainjobs/"):
            job = self.jobs[path.rsplit("/", 1)[-1]]
            done = {"Succeeded": "Complete", "Failed": "Failed"}.get(job["phase"])
            conds = [{"type": done, "status": "True", "reason": done, "message": "", "lastTransitionTime": NOW}]
            return 200, {**job["job"], "status": {"conditions": conds if done else []}}, "application/json"
        if path == f"/api/v1/namespaces/{NS}/pods":
            return 200, {"apiVersion": "v1", "kind": "PodList", "items": [self._pod(n, j) for n, j in
                                                                          self.jobs.items()]}, "application/json"
        if path.startswith(f"/api/v1/namespaces/{NS}/pods/") and path.endswith("/log"):
            name = path.split("/")[-2].removesuffix("-node-0-0")
            return 200, self.jobs[name]["log"], "text/plain"
        return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}, "application/json"

    @staticmethod
    def _pod(name: str, job: dict) -> dict:
        labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                  "batch.kubernetes.io/job-completion-index": "0"}
        return {"metadata": {"name": f"{name}-node-0-0", "labels": labels, "creationTimestamp": NOW},
                "spec": {"containers": [{"name": "node", "image": job["job"]["spec"]["trainer"]["image"]}]},
                "status": {"phase": job["phase"]}}


def test_the_trainjob_spec_for_nodes_x_gpus(rows, tmp_path):
    """3 nodes x 4 GPUs on torch-distributed, the project's image, the shared PVC on every node;
    a job that completes without writing the model into the shared folder is an error."""
    with FakeKube(tmp_path, run_nodes=False) as kube:
        with pytest.raises(RuntimeError, match=r"completed but wrote no model .*is .* shared by the nodes"):
            steps.train_trainjob(str(rows), str(tmp_path / "model"), str(tmp_path / "shared"), nodes=3,
                                 gpus_per_node=4, image=BASE_IMAGE, shared_pvc="transact-shared",
                                 kubeconfig=kube.kubeconfig(), poll_s=1, **TRAIN)
    (job,) = kube.posted
    assert job["kind"] == "TrainJob" and job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["metadata"]["labels"] == {"app.kubernetes.io/part-of": "transact"}
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 3 and trainer["image"] == BASE_IMAGE
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    assert trainer["resourcesPerNode"]["requests"] == {"nvidia.com/gpu": "4"}
    script = trainer["command"][-1]
    assert "torchrun" in script and "def train_node(" in script and "pip install" not in script  # the image has it
    call = script[script.index("train_node(**"):]
    assert "'rows': '" + str((tmp_path / "shared").resolve() / job["metadata"]["name"] / "rows") in call
    assert "'out': '" + str((tmp_path / "shared").resolve() / job["metadata"]["name"] / "model") in call
    assert "'python_paths'" not in call and "'epochs': 2" in call and "'train_end_ts': " in call
    (patch,) = spec["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    pod_spec = pod["template"]["spec"]["template"]["spec"]
    assert pod_spec["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "transact-shared"}}]
    assert "env" not in pod_spec["containers"][0]  # no storage secret asked for
    assert pod_spec["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "shared", "mountPath": str((tmp_path / "shared").resolve())}]}]


def test_a_node_runs_the_posted_command_and_the_model_comes_back(rows, tmp_path):
    """The fake cluster runs the TrainJob's own command (the here-document that writes the
    function, then torchrun with 2 processes): the model lands in the step's folder."""
    with FakeKube(tmp_path, run_nodes=True) as kube:
        s = steps.train_trainjob(str(rows), str(tmp_path / "model"), str(tmp_path / "shared"), nodes=1,
                                 gpus_per_node=2, image=BASE_IMAGE, kubeconfig=kube.kubeconfig(), poll_s=1, **TRAIN)
    assert s["world_size"] == 2 and s["finished"] and s["ddp_params_in_sync"] and s["trainjob"].startswith("transact-")
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert Path(s["log"]).read_text().count("\n") >= 1 and not (Path(s["log"]).parent / "rows").exists()


def test_without_a_shared_volume_rows_and_model_travel_through_the_object_store(rows, s3, tmp_path):
    """On a cluster with no ReadWriteMany volume: the step publishes the rows to the bucket, the
    node (a process of its own, with the credentials the standard way and nothing of the step's
    disk) fetches them, rank 0 publishes the model, the step fetches it; the rows copy is removed.
    The rows are a folder, as the pipeline's step has them: world.json beside the row file."""
    import shutil

    from transact.data import storage

    step_rows = tmp_path / "log-nn-rows"
    step_rows.mkdir()
    shutil.copy2(rows, step_rows / steps.ROWS_FILE)
    shutil.copy2(rows.parent / "world.json", step_rows / "world.json")
    shared = f"{s3.bucket()}/store/trainjobs"
    with FakeKube(tmp_path, run_nodes=True) as kube:
        s = steps.train_trainjob(str(step_rows), str(tmp_path / "model"), shared, nodes=1, gpus_per_node=2,
                                 image=BASE_IMAGE, kubeconfig=kube.kubeconfig(), env=dict(s3.env), poll_s=1, **TRAIN)
        posted = kube.posted[0]
    assert s["world_size"] == 2 and s["finished"] and s["ddp_params_in_sync"]
    assert (tmp_path / "model" / "model.safetensors").exists()
    work = f"{shared}/{s['trainjob']}"
    assert s["log"] == f"{work}/trainjob.log" and storage.read_bytes(s["log"]).count(b"\n") >= 1
    assert storage.read_manifest(f"{work}/model")["files"]["model.safetensors"]["bytes"] > 0  # the job's record
    assert not storage.exists(f"{work}/rows")
    assert "volumes" not in json.dumps(posted)  # no volume asked of the cluster
    assert not (tmp_path / "shared").exists() and not (tmp_path / "s3:").exists()


def test_the_nodes_get_object_store_credentials_from_a_secret_by_reference():
    """With no shared volume the nodes read the bucket: the Secret's AWS_* keys reach the node
    container as secretKeyRefs (optional: an endpoint-less AWS Secret is fine); no value is
    copied into the TrainJob, which anyone who may read TrainJobs can read."""
    (name, labels, patch) = trainjob.build_options("transact-x", "s3://b/t", storage_secret="minio-creds")
    container = patch.training_runtime_spec.template.spec.replicated_jobs[0].template.spec.template.spec.containers[0]
    assert container.name == "node" and not container.volume_mounts
    assert [e["name"] for e in container.env] == list(trainjob.STORAGE_ENV)
    assert all(e["valueFrom"] == {"secretKeyRef": {"name": "minio-creds", "key": e["name"], "optional": True}}
               for e in container.env)
    assert len(trainjob.build_options("transact-x", "s3://b/t")) == 2  # neither secret nor volume: no patch
    assert len(trainjob.build_options("transact-x", "s3://b/t", backend="local", storage_secret="s")) == 1


def test_a_failed_trainjob_says_why_in_one_line_and_where_the_log_is(rows, tmp_path):
    with FakeKube(tmp_path, run_nodes=True) as kube:
        with pytest.raises(RuntimeError) as e:
            steps.train_trainjob(str(rows), str(tmp_path / "model"), str(tmp_path / "shared"), nodes=1,
                                 gpus_per_node=1, image=BASE_IMAGE, kubeconfig=kube.kubeconfig(), poll_s=1,
                                 **{**TRAIN, "model": "no_such_model"})
    msg = str(e.value)
    assert "\n" not in msg and "Failed" in msg and "no_such_model" in msg, msg
    log = Path(msg.rsplit("full log: ", 1)[1].rstrip(")"))
    text = log.read_text()
    assert "Traceback" in text and f"kubectl logs -n {NS} -l jobset.sigs.k8s.io/jobset-name=" in text


def test_the_node_function_survives_the_clusters_here_document():
    """The torch-distributed runtime writes the function through an unquoted bash
    here-document: no $, backquote or backslash in its source, nor in its arguments."""
    source = inspect.getsource(trainjob.train_node)
    assert not any(c in source for c in "$`\\")
    with pytest.raises(ValueError, match=r"rows = '/data/\$RUN': no \$"):
        trainjob.build_trainer({"rows": "/data/$RUN"}, nodes=1, gpus_per_node=1, image="x")
    stage = {"rows": "s3://b/team$HOME/rows", "model": "s3://b/m", "local": "/tmp/j"}  # inside the stage too
    with pytest.raises(ValueError, match=r"stage.rows = 's3://b/team\$HOME/rows': no \$"):
        trainjob.build_trainer({"stage": stage}, nodes=1, gpus_per_node=1, image="x")
    with pytest.raises(ValueError, match="nodes must be an integer >= 1, got 0"):
        trainjob.build_trainer({}, nodes=0, gpus_per_node=1, image="x")
    with pytest.raises(ValueError, match="image is required on a cluster"):
        trainjob.build_trainer({}, nodes=1, gpus_per_node=1, image="")
    with pytest.raises(ValueError, match="backend must be one of kubernetes, local, got 'ray'"):
        trainjob.make_client("ray")


def test_error_line_picks_the_workers_error_not_torchruns_summary():
    log = ["Traceback (most recent call last):", '  File "x.py", line 3', "ValueError: unknown model 'x'",
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "[job-train] Completed with code 1"]
    assert trainjob.error_line(log) == "ValueError: unknown model 'x'"
    assert trainjob.error_line(["", "killed"]) == "killed"


def test_the_compiled_pipeline_launches_a_trainjob_only_when_train_nodes_is_positive(tmp_path):
    """train-op (one GPU pod) when train_nodes < 1, the default; else trainjob-op (no GPU: it
    waits) with the project's image; each branch evaluates, gates and packages its model."""
    from transact.pipelines.runner import compile_pipeline

    spec = yaml.safe_load(compile_pipeline("training", tmp_path / "t.yaml").read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["train_nodes"]["defaultValue"] == 0 and params["gpus_per_node"]["defaultValue"] == 1
    dags = {k: c["dag"]["tasks"] for k, c in spec["components"].items() if "dag" in c}
    (branches,) = [tasks for k, tasks in dags.items() if k.startswith("comp-condition-branches")]
    when = {t["componentRef"]["name"]: t["triggerPolicy"]["condition"] for t in branches.values()}
    dag_of = {name: k for k, tasks in dags.items() for name in tasks}
    limit = "int(inputs.parameter_values['pipelinechannel--train_nodes']) < 1"
    assert when[dag_of["train-op"]] == limit and when[dag_of["trainjob-op"]] == f"!({limit})"
    assert dag_of["evaluate-op"] == dag_of["train-op"] and dag_of["evaluate-op-2"] == dag_of["trainjob-op"]
    assert "trainjob-op" in dags[dag_of["trainjob-op"]]["evaluate-op-2"]["dependentTasks"]
    job = dags[dag_of["trainjob-op"]]["trainjob-op"]["inputs"]["parameters"]
    assert job["image"]["runtimeValue"]["constant"] == BASE_IMAGE
    assert job["nodes"]["componentInputParameter"] == "pipelinechannel--train_nodes"
    executors = spec["deploymentSpec"]["executors"]
    assert "accelerator" not in executors["exec-trainjob-op"]["container"].get("resources", {})
    assert executors["exec-train-op"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"


@pytest.mark.slow
def test_local_process_trainjob_trains_the_model_torchrun_trains(rows, tmp_path):
    """The SDK's local process backend (its own venv, torchrun, 2 gloo processes) and
    `torchrun --standalone --nproc_per_node 2 -m transact.cli train`: the same tensors."""
    s = steps.train_trainjob(str(rows), str(tmp_path / "job"), str(tmp_path / "shared"), nodes=1, gpus_per_node=2,
                             backend="local", env=ENV, poll_s=1, **TRAIN)
    assert s["world_size"] == 2 and s["finished"] and s["ddp_params_in_sync"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "transact.cli", "train", "--rows", str(rows), "--out", str(tmp_path / "cli"), "--model", "v2",
           "--epochs", "2", "--batch-size", "16", "--lr", "0.003", "--seed", "3", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cli = json.loads((tmp_path / "cli" / "train_summary.json").read_text())
    assert cli["steps"] == s["steps"] and cli["train_end_ts"] == s["train_end_ts"]
    assert same_tensors(tmp_path / "job", tmp_path / "cli")


@pytest.mark.slow
def test_a_failed_local_trainjob_says_why_and_leaves_no_venv(rows, tmp_path):
    import tempfile

    with pytest.raises(RuntimeError) as e:
        steps.train_trainjob(str(rows), str(tmp_path / "job"), str(tmp_path / "shared"), nodes=1, gpus_per_node=1,
                             backend="local", env=ENV, poll_s=1, **{**TRAIN, "model": "no_such_model"})
    msg = str(e.value)
    assert "\n" not in msg and "Failed" in msg and "no_such_model" in msg and "full log: " in msg, msg
    name = msg.split()[1]
    assert not list(Path(tempfile.gettempdir()).glob(f"{name}*"))  # the SDK's job venv is gone


def test_the_local_backend_refuses_another_python_on_path_without_touching_path(tmp_path, monkeypatch):
    """The local backend builds the job from the first python on PATH. The launcher used to put
    this interpreter first by rewriting the process's PATH; now it checks and says what to do."""
    from transact.components.trainjob import check_local_python

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\necho 2.7\n")
    (fake / "python").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    before = os.environ["PATH"]
    with pytest.raises(ValueError, match=r"first python on PATH .*Python 2\.7.*activate the environment"):
        check_local_python()
    assert os.environ["PATH"] == before
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{before}")
    check_local_python()  # this environment's own python first: accepted


def test_compiled_for_a_cluster_every_pod_gets_the_storage_secret_and_the_trainjob_step_its_volume(tmp_path):
    """A pod's spec is fixed when the pipeline is compiled: with --storage-secret every step's
    container gets the Secret's AWS_* keys by reference (each optional, none copied into the YAML),
    and with --shared-pvc the TrainJob step's own pod mounts the claim where its nodes mount it."""
    from typer.testing import CliRunner

    from transact.cli import app
    from transact.components.trainjob import STORAGE_ENV

    out = tmp_path / "t.yaml"
    r = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out), "--image", "reg.example.com/t:1",
                                 "--storage-secret", "s3-creds", "--shared-pvc", "rwx", "--shared-dir", "/mnt/s"])
    assert r.exit_code == 0, r.output
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every step, none left out
    for name, ex in executors.items():
        (secret,) = ex["secretAsEnv"]
        assert secret["secretNameParameter"]["runtimeValue"]["constant"] == "s3-creds" and secret["optional"], name
        assert [k["envVar"] for k in secret["keyToEnv"]] == list(STORAGE_ENV)
    (mount,) = executors["exec-trainjob-op"]["pvcMount"]
    assert mount["mountPath"] == "/mnt/s" and mount["constant"] == "rwx"
    assert [n for n, ex in executors.items() if "pvcMount" in ex] == ["exec-trainjob-op"]
    dags = {k: c["dag"]["tasks"] for k, c in spec["components"].items() if "dag" in c}
    (job,) = [tasks["trainjob-op"]["inputs"]["parameters"] for tasks in dags.values() if "trainjob-op" in tasks]
    assert job["shared_pvc"]["runtimeValue"]["constant"] == "rwx"  # the nodes mount the same claim,
    assert job["shared_dir"]["runtimeValue"]["constant"] == "/mnt/s"  # at the same path
    assert {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()} == {"reg.example.com/t:1"}

    plain = list(yaml.safe_load_all(compile_default(tmp_path).read_text()))
    assert len(plain) == 1  # nothing of a cluster's unless asked
    bad = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out), "--shared-pvc", "rwx",
                                   "--shared-dir", "mnt"])
    assert bad.exit_code == 2 and "shared_dir must be an absolute path" in bad.output


def compile_default(tmp_path):
    from transact.pipelines.runner import compile_pipeline

    return compile_pipeline("training", tmp_path / "plain.yaml")
