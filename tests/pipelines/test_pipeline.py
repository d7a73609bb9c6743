"""The KFP pipeline: compiled YAML (steps, edges, GPUs, retries, conditions) and submission.

Submission is tested against a *fake Kubeflow Pipelines API* served on 127.0.0.1 by this
test (there is no Kubeflow cluster here): it records the requests kfp.Client sends.

Also here (issue 18): every user error of ``transact pipeline|demo`` is one ``error:`` line
and exit 2 (a host that is down or is no Kubeflow, bad ``-p``, bad paths), and a local
run's step output goes to ``<run>/logs/<step>.log`` with one status line per step on the
screen (a toy pipeline of three lightweight components shows it in well under a second).

No ``from __future__ import annotations``: KFP reads the toy components' real annotations.
"""
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml
from kfp import dsl
from typer.testing import CliRunner

from transact.cli import app
from transact.pipelines.runner import StatusLines, compile_pipeline, redirected, step_logs, submit

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
    # train-op sits in a dsl.If/Else (else: trainjob-op, tests/pipelines/test_trainjob.py) that waits for log-nn-op
    branches = next(n for n in tasks if n.startswith("condition-branches"))
    assert "log-nn-op" in deps[branches] and "train-op" in deps["evaluate-op"]
    assert "evaluate-op" in deps["gate-op"]


def test_conditions_gate_the_steps_behind_validation_and_gate(spec):
    tasks = _all_tasks(spec)
    cond_tasks = {n: t for n, (t, _) in tasks.items() if n.startswith("condition") and "triggerPolicy" in t}
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


@pytest.mark.parametrize("name", ["training", "retrain"])
def test_the_compiled_pipeline_keeps_nothing_on_a_pods_disk(name, tmp_path):
    """Each step on a cluster is a fresh pod: a relative default (``runs/champion``, ``feature_repo``)
    would put the champion, quarantine and Feast store on a disk that vanishes with the pod. The
    storage root has no default (a run must name one); no string default is a relative path."""
    compiled = yaml.safe_load(compile_pipeline(name, tmp_path / f"{name}.yaml").read_text())
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in params["storage_root"] and not params["storage_root"].get("isOptional")
    for key in ("champion_dir", "quarantine_dir", "reference"):
        assert key not in params, key  # one storage root instead of three pod-local folders
    for key, p in params.items():
        default = p.get("defaultValue")
        if isinstance(default, str) and default:
            assert "/" not in default, (key, default)  # no folder: the TrainJob's too goes under the root


def test_package_promotes_with_the_generation_the_gate_judged_against(spec):
    tasks = _all_tasks(spec)
    inputs = tasks["package-op"][0]["inputs"]
    assert inputs["artifacts"]["gate_report"] == {"componentInputArtifact": "pipelinechannel--gate-op-report"}
    assert "storage_root" in inputs["parameters"] and "run_id" in inputs["parameters"]


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

    def do_GET(self):
        self.requests.append(("GET", self.path, None, dict(self.headers)))
        self._reply({"multi_user": False} if "healthz" in self.path else {"experiments": []})

    def do_POST(self):
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
                        {"epochs": 3, "profile": "demo", "storage_root": "s3://team-bucket/transact"},
                        experiment="ranking", run_name="nightly",
                        existing_token="secret-token")
    finally:
        server.shutdown()
    assert result.run_id == "run-1"
    posts = {p: (b, h) for m, p, b, h in _FakeKubeflow.requests if m == "POST"}
    assert posts["/apis/v2beta1/experiments"][0]["display_name"] == "ranking"
    run, headers = posts["/apis/v2beta1/runs"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {"epochs": 3, "profile": "demo",
                                                   "storage_root": "s3://team-bucket/transact"}
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "transact-training"
    assert "exec-train-op" in run["pipeline_spec"]["deploymentSpec"]["executors"]
    assert {k.lower(): v for k, v in headers.items()}.get("authorization") == "Bearer secret-token"


# --------------------------------------------------------------------------- one-line user errors

class _NotKubeflow(BaseHTTPRequestHandler):
    """A web server that is no Kubeflow Pipelines API; the first path segment picks how it
    answers (``/missing`` 404, ``/html`` a 200 web page, ``/auth`` 401, ``/login`` a redirect
    to a login page, ``/broken`` a healthy API that fails every call with HTTP 500)."""

    def _send(self, status, body=b"", ctype="text/html", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        kind = self.path.split("/")[1]
        if kind == "html":
            self._send(200, b"<html>hello</html>")
        elif kind == "auth":
            self._send(401)
        elif kind == "login":
            self._send(302, headers=[("Location", "/dex/auth")])
        elif kind == "broken" and self.path.endswith("/healthz"):
            self._send(200, b'{"multi_user": false}', "application/json")
        elif kind == "broken":
            self._send(500, b'{"error": "database is down", "code": 13}', "application/json")
        else:
            self._send(404)

    do_POST = do_GET

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def hosts():
    """``down``: a port on 127.0.0.1 where nothing listens; ``web``: the _NotKubeflow server."""
    server = HTTPServer(("127.0.0.1", 0), _NotKubeflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    yield {"down": f"http://127.0.0.1:{down}", "web": f"http://127.0.0.1:{server.server_port}"}
    server.shutdown()


def _a_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    return f


#: a cluster run names its storage root (the compiled pipeline has no default for it)
SUBMIT = ["pipeline", "submit", "-p", "storage_root=s3://team-bucket/transact", "--host"]

#: (command line from hosts and tmp_path, words the one error line must hold)
USER_ERRORS = {
    "submit: no storage root": (lambda h, t: ["pipeline", "submit", "--host", h["down"]],
                                ["needs -p storage_root="]),
    "submit: a pod-local storage root": (
        lambda h, t: ["pipeline", "submit", "-p", "storage_root=runs/store", "--host", h["down"]],
        ["storage_root='runs/store' would be a folder on each pod's own disk", "s3://bucket/prefix"]),
    "monitor: a cluster retrain on a pod-local root": (
        lambda h, t: ["monitor", "--reference", str(t / "r"), "--current", str(t / "c"), "--retrain", "cluster",
                      "--retrain-source", "s3://b/logs", "--kfp-host", h["down"]],
        ["storage_root='runs/store' would be a folder on each pod's own disk"]),
    "submit: host down": (lambda h, t: [*SUBMIT, h["down"]],
                          ["did not answer", "connection refused", "{down}", "--host"]),
    "submit: 404": (lambda h, t: [*SUBMIT, h["web"] + "/missing"],
                    ["not a Kubeflow Pipelines API", "HTTP 404", "--host"]),
    "submit: web page": (lambda h, t: [*SUBMIT, h["web"] + "/html/"],
                         ["not a Kubeflow Pipelines API", "not JSON"]),
    "submit: 401": (lambda h, t: [*SUBMIT, h["web"] + "/auth", "--token", "x"],
                    ["HTTP 401", "--token"]),
    "submit: login redirect": (lambda h, t: [*SUBMIT, h["web"] + "/login"],
                               ["/dex/auth", "--token"]),
    "submit: API error": (lambda h, t: [*SUBMIT, h["web"] + "/broken"],
                          ["refused the run", "HTTP 500", "database is down"]),
    "submit: no such name": (lambda h, t: [*SUBMIT, h["down"], "--name", "nope"],
                             ["unknown pipeline 'nope'", "training"]),
    "submit: unknown -p": (lambda h, t: [*SUBMIT, h["down"], "-p", "nosuch=1"],
                           ["no parameter nosuch", "epochs"]),
    "run: no such name": (lambda h, t: ["pipeline", "run", "--name", "nope", "--run-dir", str(t / "r")],
                          ["unknown pipeline 'nope'"]),
    "run: -p without =": (lambda h, t: ["pipeline", "run", "-p", "epochs", "--run-dir", str(t / "r")],
                          ["key=value", "'epochs'"]),
    "run: unknown -p": (lambda h, t: ["pipeline", "run", "-p", "nosuch=1", "--run-dir", str(t / "r")],
                        ["no parameter nosuch"]),
    "run: -p name (a keyword of run_local)": (
        lambda h, t: ["pipeline", "run", "-p", "name=x", "--run-dir", str(t / "r")], ["no parameter name"]),
    "run: -p live (a keyword of run_local)": (
        lambda h, t: ["pipeline", "run", "-p", "live=1", "--run-dir", str(t / "r")], ["no parameter live"]),
    "run: -p of the wrong type": (lambda h, t: ["pipeline", "run", "-p", "epochs=many", "--run-dir", str(t / "r")],
                                  ["epochs", "integer", "'many'"]),
    "run: unknown profile": (lambda h, t: ["pipeline", "run", "-p", "profile=huge", "--run-dir", str(t / "r")],
                             ["profile 'huge'", "tiny"]),
    "run: source missing": (lambda h, t: ["pipeline", "run", "-p", f"source={t / 'nowhere'}",
                                          "--run-dir", str(t / "r")], ["nowhere", "does not exist"]),
    "run: retrain needs source": (lambda h, t: ["pipeline", "run", "--name", "retrain", "--run-dir", str(t / "r")],
                                  ["-p source="]),
    "run: run dir under a file": (lambda h, t: ["pipeline", "run", "--run-dir", str(_a_file(t) / "r")],
                                  ["a-file is a file"]),
    "compile: no such name": (lambda h, t: ["pipeline", "compile", "--name", "nope", "--out", str(t / "x.yaml")],
                              ["unknown pipeline 'nope'"]),
    "compile: out under a file": (lambda h, t: ["pipeline", "compile", "--out", str(_a_file(t) / "x.yaml")],
                                  ["a-file is a file"]),
    "compile: out not .yaml": (lambda h, t: ["pipeline", "compile", "--out", str(t)], [".yaml"]),
    "demo: out under a file": (lambda h, t: ["demo", "--out", str(_a_file(t) / "d")], ["a-file is a file"]),
    "demo: unknown profile": (lambda h, t: ["demo", "--out", str(t / "d"), "--profile", "huge"],
                              ["profile 'huge'"]),
}


@pytest.mark.filterwarnings("error")  # a warning would be one more line on the person's screen
@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_2(case, hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client writes ~/.config/kfp/context.json
    build, words = USER_ERRORS[case]
    r = CliRunner().invoke(app, build(hosts, tmp_path))
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.output
    for w in words:
        assert w.format(**hosts) in errors[0], (w, r.output)
    # nothing else but a header line ("running ...") may come with it
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) <= 2, r.output


def test_submit_to_a_host_that_is_down_is_one_line_from_the_real_cli(hosts, tmp_path):
    """The installed command line, as a person runs it: one stderr line, exit 2."""
    env = {**os.environ, "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "transact.cli", *SUBMIT, hosts["down"]],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr + p.stdout and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and hosts["down"] in lines[0], p.stderr


# --------------------------------------------------------------------------- step logs

@dsl.component(base_image="python:3.11", install_kfp_package=False)
def hello_op(n: int) -> str:
    import warnings

    for i in range(n):
        print(f"hello line {i}")
    warnings.warn("a warning from inside the step", stacklevel=1)
    return "said hello"


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def boom_op(msg: str) -> str:
    raise ValueError(f"boom after {msg}")


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def after_op(x: str) -> str:
    return x


@dsl.pipeline(name="toy")
def toy_pipeline(n: int = 30):
    hello = hello_op(n=n)
    boom = boom_op(msg=hello.output)
    after_op(x=boom.output)


def test_step_logs_keep_the_output_in_files_and_show_one_line_per_step(tmp_path, capfd):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=False)
    logs = tmp_path / "logs"
    with step_logs(logs, StatusLines(sys.stdout), ("hello-op", "boom-op", "after-op")) as records:
        toy_pipeline(n=30)
    screen = capfd.readouterr()
    lines = screen.out.splitlines()
    assert screen.err == "" and len(lines) == 3, screen
    assert lines[0].split()[:2] == ["hello-op", "ok"] and " s  said hello" in lines[0]
    assert lines[1].split()[:2] == ["boom-op", "failed"] and "ValueError: boom after said hello" in lines[1]
    assert lines[2].split() == ["after-op", "skipped"]
    for word in ("hello line", "KFP Executor", "executor_input", "Warning", "Traceback"):
        assert word not in screen.out, word
    hello = (logs / "hello-op.log").read_text()
    assert "hello line 29" in hello and "a warning from inside the step" in hello and "KFP Executor" in hello
    assert "RuntimeWarning" not in hello  # a python base image: kfp.local has nothing to warn about
    assert "Traceback" in (logs / "boom-op.log").read_text()
    assert "Running pipeline" in (logs / "pipeline.log").read_text()
    assert records["hello-op"]["status"] == "ok" and records["boom-op"]["status"] == "failed"
    assert records["hello-op"]["seconds"] >= 0 and "after-op" not in records


def test_redirected_catches_python_and_file_descriptor_output(tmp_path, capfd):
    import warnings

    log = tmp_path / "step.log"
    with redirected(log):
        print("from print")
        print("from stderr", file=sys.stderr)
        os.write(1, b"from fd 1\n")
        os.write(2, b"from fd 2\n")
        warnings.warn("from warnings", UserWarning, stacklevel=1)
    print("back on the screen")
    screen = capfd.readouterr()
    assert screen.out == "back on the screen\n" and screen.err == ""
    text = log.read_text()
    for line in ("from print", "from stderr", "from fd 1", "from fd 2", "from warnings"):
        assert line in text, line
    # the warning's category is there however a library formats warnings (kfp, imported by
    # other tests, puts the message on its own line)
    assert "UserWarning:" in text.split("from fd 2", 1)[1], text


def test_status_lines_rewrite_the_running_line_on_a_terminal_only():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Terminal(), io.StringIO()
    for out in (tty, pipe):
        lines = StatusLines(out)
        lines.started("train-op")
        lines.finished("train-op", "ok", 12.34, "30 steps")
    assert tty.getvalue() == "  train-op     running ...\r\033[K  train-op     ok         12.3 s  30 steps\n"
    assert pipe.getvalue() == "  train-op     ok         12.3 s  30 steps\n"


def test_the_trainjob_branch_is_summarised_as_its_steps(tmp_path):
    """A run down the TrainJob branch (train_nodes > 0) has tasks trainjob-op,
    evaluate-op-2, gate-op-2, package-op-2: the summary reports them as train, evaluate,
    gate and package (it said "failed at train-op" before)."""
    import json

    from transact.pipelines.runner import STEP_ORDER, step_result, summarize_run

    def task(name, output, key="Output"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "executor_output.json").write_text(json.dumps({"parameterValues": {key: output}}))

    for name in ("ingest-op", "features-op", "log-nn-op"):
        task(name, "{}")
    task("validate-op", "pass")
    task("trainjob-op", json.dumps({"trainjob": "tj-1", "steps": 3}))
    task("evaluate-op-2", json.dumps({"hit": {"click": {"value": 1.5, "ci95": [1.0, 2.0]}}}))
    task("gate-op-2", "pass")
    package = {"promoted": True, "tag": "transact-ranker:abc", "generation": 2, "registry": "s3://b/r"}
    task("package-op-2", json.dumps(package))
    s = summarize_run(tmp_path, 1.0, {})
    assert s["outcome"].startswith("packaged"), s["outcome"]
    assert all(s["steps"][k]["ran"] for k in STEP_ORDER)
    assert s["steps"]["train-op"]["task"] == "trainjob-op" and s["package"]["tag"] == "transact-ranker:abc"
    assert step_result("package-op-2", {"Output": json.dumps(package)}) == \
        "model transact-ranker:abc, champion generation 2 of s3://b/r"
    lost = {"promoted": False, "reason": "the champion moved: ...", "registry": "s3://b/r"}
    assert step_result("package-op", {"Output": json.dumps(lost)}) == "not promoted: the champion moved: ..."
    assert step_result("evaluate-op-2", {"Output": json.dumps({"hit": {"click": {"value": 1.5}}})}) == \
        "HIT@3 click 1.500"


def test_compile_with_an_image_puts_it_in_every_step_and_the_trainjob(tmp_path):
    """The image was chosen by an environment variable read when the components were imported;
    now it is an option of compile and submit, applied to the compiled (plain-data) pipeline."""
    from transact.components.kfp_components import BASE_IMAGE

    image = "registry.example.com/ml/transact:0.1.0"
    r = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(tmp_path / "t.yaml"), "--image", image])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "t.yaml").read_text()
    compiled = yaml.safe_load(text)
    images = {ex["container"]["image"] for ex in compiled["deploymentSpec"]["executors"].values()}
    assert images == {image} and BASE_IMAGE not in text
    trainjob = _all_tasks(compiled)["trainjob-op"][0]["inputs"]["parameters"]["image"]
    assert trainjob["runtimeValue"]["constant"] == image
    default = yaml.safe_load(compile_pipeline("training", tmp_path / "d.yaml").read_text())
    assert {ex["container"]["image"] for ex in default["deploymentSpec"]["executors"].values()} == {BASE_IMAGE}
    bad = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(tmp_path / "b.yaml"), "--image", "a b"])
    assert bad.exit_code == 2 and "an image reference" in bad.output
