"""The KFP pipeline: compiled YAML (steps, edges, GPUs, retries, conditions) and submission.

Submission is tested against a *fake Kubeflow Pipelines API* served on 127.0.0.1 by this
test (there is no Kubeflow cluster here): it records the requests kfp.Client sends.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from transact.pipelines.runner import compile_pipeline, submit

STEPS = ["ingest-op", "validate-op", "features-op", "log-nn-op", "train-op", "evaluate-op", "gate-op",
         "package-op"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = compile_pipeline("training", tmp_path_factory.mktemp("c") / "training.yaml")
    return yaml.safe_load(path.read_text())


def _all_tasks(spec):
    """task name -> (task dict, the DAG it sits in)."""
    out = {}
    dags = [("root", spec["root"]["dag"])] + [(k, v["dag"]) for k, v in spec["components"].items() if "dag" in v]
    for dag_name, dag in dags:
        for name, task in dag["tasks"].items():
            out[name] = (task, dag_name)
    return out


def test_every_step_and_edge(spec):
    tasks = _all_tasks(spec)
    for step in STEPS:
        assert step in tasks, step
    deps = {name: set(t.get("dependentTasks", [])) for name, (t, _) in tasks.items()}
    assert "ingest-op" in deps["validate-op"]
    assert "features-op" in deps["log-nn-op"]
    assert "log-nn-op" in deps["train-op"]
    assert {"train-op", "log-nn-op"} <= deps["evaluate-op"]
    assert "evaluate-op" in deps["gate-op"]


def test_conditions_gate_the_steps_behind_validation_and_gate(spec):
    tasks = _all_tasks(spec)
    cond_tasks = {n: t for n, (t, _) in tasks.items() if n.startswith("condition")}
    conditions = {n: t["triggerPolicy"]["condition"] for n, t in cond_tasks.items()}
    assert any("validate-op-Output" in c and "'pass'" in c for c in conditions.values())
    assert any("gate-op-Output" in c and "'pass'" in c for c in conditions.values())
    # Training sits inside the validation condition, packaging inside the gate condition.
    assert tasks["train-op"][1].startswith("comp-condition")
    assert tasks["package-op"][1] != tasks["train-op"][1]
    assert tasks["ingest-op"][1] == "root" and tasks["validate-op"][1] == "root"


def test_gpu_resources_and_retries(spec):
    executors = spec["deploymentSpec"]["executors"]
    for step in ("train-op", "evaluate-op", "package-op"):
        res = executors[f"exec-{step}"]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu", step
        assert res["accelerator"]["resourceCount"] == "1"
    assert "accelerator" not in executors["exec-ingest-op"]["container"].get("resources", {})
    tasks = _all_tasks(spec)
    for step in ("ingest-op", "features-op", "log-nn-op", "package-op"):
        policy = tasks[step][0]["retryPolicy"]
        assert policy["maxRetryCount"] == 3 and policy["backoffDuration"] == "30s", step
    assert tasks["gate-op"][0]["cachingOptions"] == {} or not tasks["gate-op"][0]["cachingOptions"].get("enableCache")


def test_components_run_the_project_image(spec):
    for name, ex in spec["deploymentSpec"]["executors"].items():
        assert ex["container"]["image"].startswith("ghcr.io/transact-v2/transact"), name
        assert "pip install" not in " ".join(ex["container"]["command"]), name  # the image holds the project


class _FakeKubeflow(BaseHTTPRequestHandler):
    """Answers the few KFP v2beta1 endpoints kfp.Client uses; records every request."""

    requests: list = []

    def _reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.requests.append(("GET", self.path, None, dict(self.headers)))
        self._reply({"multi_user": False} if "healthz" in self.path else {"experiments": []})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append(("POST", self.path, body, dict(self.headers)))
        if self.path.endswith("/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        else:
            self._reply({"run_id": "run-1", "experiment_id": "exp-1"})

    def log_message(self, *a):
        pass


def test_submit_builds_the_right_request_against_a_fake_kubeflow_api():
    _FakeKubeflow.requests = []
    server = HTTPServer(("127.0.0.1", 0), _FakeKubeflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = submit(f"http://127.0.0.1:{server.server_port}", "training",
                        {"epochs": 3, "profile": "demo"}, experiment="ranking", run_name="nightly",
                        existing_token="secret-token")
    finally:
        server.shutdown()
    assert result.run_id == "run-1"
    posts = {p: (b, h) for m, p, b, h in _FakeKubeflow.requests if m == "POST"}
    assert posts["/apis/v2beta1/experiments"][0]["display_name"] == "ranking"
    run, headers = posts["/apis/v2beta1/runs"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {"epochs": 3, "profile": "demo"}
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "transact-training"
    assert "exec-train-op" in run["pipeline_spec"]["deploymentSpec"]["executors"]
    assert {k.lower(): v for k, v in headers.items()}.get("authorization") == "Bearer secret-token"
