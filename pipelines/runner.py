"""Run a pipeline locally, compile it to KFP IR YAML, or submit it to a Kubeflow cluster.

Locally (the embedded default) every component runs as a subprocess of this Python
environment (``kfp.local.SubprocessRunner(use_venv=False)``: no network, no image),
and every artefact stays under ``<run_dir>/pipeline/``; ``<run_dir>/summary.md`` says
what happened in words. Each step's whole output (kfp.local's executor log, the step's
own prints, its warnings) goes to ``<run_dir>/logs/<step>.log``; the screen gets one
status line per step when ``live`` is given (see :func:`run_local`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from transact.data import storage
from transact.data.storage import is_remote, local_path

#: Parameters that are a local folder or an object-store URI (a local one made absolute).
LOCATION_PARAMS = ("storage_root", "source", "feature_repo")
#: The storage root of local runs that name none (a cluster run must name one: the compiled
#: pipeline has no default, since a pod's disk vanishes with the pod).
LOCAL_STORAGE_ROOT = "runs/store"

#: The Kubeflow Pipelines API's health endpoint, relative to ``--host``.
HEALTHZ = "/apis/v2beta1/healthz"


class KubeflowError(ValueError):
    """The Kubeflow Pipelines API at ``--host`` cannot take the run. A ``ValueError`` so that
    the CLI's ``fail_on_user_error`` says it in one line: a host that is down or wrong is the
    user's to fix, not a bug to trace."""


def _pipeline(name: str, cluster=None):
    from transact.pipelines.training import PIPELINES, pipelines

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    return (pipelines(cluster) if cluster is not None else PIPELINES)[name]


def compile_pipeline(name: str, out: str | Path, image: str | None = None, cluster=None) -> Path:
    """Writes the pipeline's KFP IR YAML to ``out``; ``image``: the image every step (and the
    TrainJob's nodes) runs, instead of the project's default tag (:func:`with_image`);
    ``cluster``: what its pods get (:class:`transact.pipelines.training.Cluster`: a Secret's
    variables, a volume), which Kubeflow reads from the YAML's second document (the platform spec)."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(_pipeline(name, cluster), str(out))
    if image:
        import yaml

        docs = list(yaml.safe_load_all(out.read_text()))
        out.write_text(yaml.safe_dump_all([with_image(docs[0], image), *docs[1:]], sort_keys=False))
    return out


def with_image(spec: dict, image: str) -> dict:
    """The compiled pipeline with ``image`` wherever it names the project's default image: every
    executor's container and the constant the TrainJob step passes to its nodes. The compiled
    YAML is plain data; the components keep one default, and no setting is read at import."""
    from transact.components.kfp_components import BASE_IMAGE

    if not image.strip() or any(c.isspace() for c in image):
        raise ValueError(f"--image {image!r}: an image reference such as registry.example.com/transact:0.1.0")

    def swap(node):
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return image if node == BASE_IMAGE else node

    return swap(spec)


# --------------------------------------------------------------------------- parameters

def check_params(name: str, params: dict) -> dict:
    """The parameters checked against the pipeline's signature before anything runs:
    otherwise kfp fails on an unknown name with a traceback, on a wrong type mid-run, and
    a bad profile fails the first step only after its retries (minutes of back-off)."""
    inputs = _pipeline(name).component_spec.inputs or {}
    unknown = sorted(set(params) - set(inputs))
    if unknown:
        raise ValueError(f"pipeline {name!r} has no parameter {', '.join(unknown)}; "
                         f"its parameters: {', '.join(inputs)}")
    missing = [k for k, spec in inputs.items() if not spec.optional and k not in params]
    if missing:
        raise ValueError(f"pipeline {name!r} needs " + ", ".join(f"-p {k}=..." for k in missing))
    out = {k: _coerce(k, v, inputs[k].type) for k, v in params.items()}
    if out.get("profile") and not out.get("source"):
        from transact.data.simulator import get_profile

        get_profile(out["profile"])  # a one-line ValueError naming the valid ones
    return out


def local_params(name: str, params: dict) -> dict:
    """:func:`check_params` for a run on this machine: the storage root defaults to
    :data:`LOCAL_STORAGE_ROOT` (a cluster run must name one)."""
    return check_params(name, {"storage_root": LOCAL_STORAGE_ROOT, **params})


def resolve_locations(params: dict) -> dict:
    """Location parameters as the steps (other processes, another working folder) must see them:
    a local path made absolute, ``file://`` unwrapped, an object-store URI kept as given."""
    out = dict(params)
    for key in LOCATION_PARAMS:
        if out.get(key) and not is_remote(out[key]):
            out[key] = str(local_path(out[key], key).resolve())
    return out


def check_cluster_root(root: str) -> None:
    """A cluster run's storage root must outlive its pods: an object-store URI, or -- a volume
    mounted at that path on every step, said explicitly -- a ``file://`` URI."""
    from transact.data.storage import uri_scheme

    if not is_remote(root) and uri_scheme(root) != "file":
        raise ValueError(f"storage_root={root!r} would be a folder on each pod's own disk, lost with the pod: "
                         "give an object-store URI (s3://bucket/prefix), or file:///path for a volume "
                         "mounted there on every step")


def _coerce(key: str, value, kind: str):
    """``-p`` values arrive JSON-decoded: a number given to a string parameter becomes the
    string; an int is a float where a float is expected; anything else must match."""
    if kind == "String":
        return value if isinstance(value, str) else str(value)
    if kind == "Float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "Integer" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "Boolean" and isinstance(value, bool):
        return value
    if kind in ("Integer", "Float", "Boolean"):
        raise ValueError(f"parameter {key} expects {kind.lower()}, got {value!r}")
    return value


# --------------------------------------------------------------------------- local runs

def run_local(name: str = "training", run_dir: str | Path = "runs/pipeline", /, *,
              live: TextIO | None = None, **params) -> dict:
    """Runs the pipeline here; returns the summary (also ``<run_dir>/summary.json``/``.md``).

    Every step's output goes to ``<run_dir>/logs/<step>.log`` and kfp.local's own lines to
    ``logs/pipeline.log``; ``live`` (e.g. ``sys.stdout``) gets one status line per step."""
    from kfp import local

    params = resolve_locations(local_params(name, params))
    run_dir = local_path(run_dir, "run_dir").resolve()
    root = run_dir / "pipeline"
    root.mkdir(parents=True, exist_ok=True)
    if params.get("source") and not storage.exists(params["source"]):  # else: ingest fails after its retries
        raise FileNotFoundError(f"source {params['source']} does not exist (a folder of logs to import)")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=False)
    before = {p.name for p in root.iterdir()}
    t0 = time.perf_counter()
    with step_logs(run_dir / "logs", StatusLines(live), STEP_ORDER) as steps:
        _pipeline(name)(**params)
    seconds = time.perf_counter() - t0
    new = sorted(p for p in root.iterdir() if p.name not in before)
    if not new:
        raise RuntimeError(f"the local run left no output under {root} (see {run_dir / 'logs'})")
    summary = summarize_run(new[-1], seconds, params, steps, run_dir / "logs")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_dir / "summary.md").write_text(summary_markdown(summary))
    return summary


class StatusLines:
    """The compact view of a local run: one line per step (name, status, wall time, result).

    On a terminal the line says ``running`` while the step runs and is rewritten in place
    when it ends; elsewhere (a pipe, a CI log, a test) only the finished line is written."""

    def __init__(self, out: TextIO | None):
        self.out = out
        self.tty = bool(out is not None and getattr(out, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        if self.out is not None:
            self.out.write(text)
            self.out.flush()

    def started(self, step: str) -> None:
        if self.tty:
            self._write(f"  {step:<12} running ...")

    def finished(self, step: str, status: str, seconds: float | None, result: str = "") -> None:
        took = f"{seconds:6.1f} s" if seconds is not None else " " * 8
        line = f"  {step:<12} {status:<8} {took}  {result}".rstrip()
        self._write(("\r\033[K" if self.tty else "") + line + "\n")


@contextlib.contextmanager
def step_logs(logs: Path, status: StatusLines, steps: tuple[str, ...] = ()) -> Iterator[dict]:
    """Captures a kfp.local run: each task's output into ``<logs>/<task>.log``, the rest
    (pipeline start/end, warnings between tasks) into ``<logs>/pipeline.log``.

    kfp.local runs each task in one function (:mod:`transact.pipelines.kfp_task_hook`, retries
    included): it ``print``s the subprocess's merged stdout/stderr line by line, logs through a
    handler it binds to ``sys.stdout`` and ``warnings.warn``s to ``sys.stderr``. Wrapping that
    function and pointing ``sys.stdout``/``sys.stderr`` (and file descriptors 1 and 2, for anything
    written below Python) at the task's file catches all of it, and the wrapper knows when
    each task starts and ends, so the status line is live. Yields step -> status record;
    ``steps`` that never ran are reported ``skipped`` at the end."""
    from transact.pipelines.kfp_task_hook import around_each_task

    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    records: dict = {}

    def run_task(step: str, run):
        status.started(step)
        t0 = time.perf_counter()
        outputs, ok = {}, False
        try:
            with redirected(logs / f"{step}.log"):
                outputs, task_status = run()
            ok = task_status.name == "SUCCESS"
            return outputs, task_status
        finally:
            seconds = time.perf_counter() - t0
            records[step] = {"status": "ok" if ok else "failed", "seconds": round(seconds, 1),
                             "log": str(logs / f"{step}.log")}
            result = step_result(step, outputs) if ok else last_error(logs / f"{step}.log")
            status.finished(step, records[step]["status"], seconds, result)

    with around_each_task(run_task), redirected(logs / "pipeline.log", fds=False):
        yield records
    for step in steps:
        if step not in records and not any(t in records for t in BRANCH_TASKS.get(step, ())):
            status.finished(step, "skipped", None)


@contextlib.contextmanager
def redirected(path: Path, fds: bool = True) -> Iterator[None]:
    """``sys.stdout``/``sys.stderr`` (and, with ``fds``, file descriptors 1 and 2) appended
    to ``path`` for the duration, and Python warnings written there too (whoever else was
    showing or recording them, e.g. pytest); everything is restored, even on an error."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
    with open(path, "a", buffering=1) as f, contextlib.ExitStack() as stack:
        if fds:
            stack.enter_context(_fds_to(f.fileno()))
        stack.enter_context(contextlib.redirect_stdout(f))
        stack.enter_context(contextlib.redirect_stderr(f))
        stack.enter_context(warnings.catch_warnings())
        def show(message, category, filename, lineno, file=None, line=None) -> None:
            f.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _fds_to(fd: int) -> Iterator[None]:
    """File descriptors 1 and 2 pointed at ``fd`` (left alone where they are closed)."""
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:
        yield
        return
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for s in saved:
            os.close(s)


def last_error(log: Path) -> str:
    """The last exception line of a failed step's log (what a person needs first), else
    where the log is."""
    text = log.read_text(errors="replace") if log.exists() else ""
    errors = re.findall(r"^\s*((?:[\w.]+)(?:Error|Exception|Exit)\b:? .*)$", text, flags=re.M)
    return (errors[-1].strip()[:160] + f"  (log: {log})") if errors else f"see {log}"


def _json(value):
    return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value


def _result_ingest(out) -> str:
    return ", ".join(f"{n:,} {table}" for table, n in _json(out).items())


def _result_features(out) -> str:
    s = _json(out)
    views = s.get("materialize", {}).get("views", {})
    return (f"{len(s.get('apply', {}).get('applied', []))} Feast objects applied, "
            f"{len(views)} views materialised for {s.get('offline', {}).get('users', '?')} users")


def _result_train(out) -> str:
    s = _json(out)
    return f"{s['steps']} steps, final loss {s['final_loss']:.4f} ({s.get('device', '?')})"


def _result_evaluate(out) -> str:
    return "HIT@3 " + ", ".join(f"{a} {v['value']:.3f}" for a, v in _json(out)["hit"].items())


def _result_package(out) -> str:
    s = _json(out)
    if not s.get("promoted", True):
        return f"not promoted: {s['reason']}"
    return f"model {s['tag']}, champion generation {s['generation']} of {s['registry']}"


_RESULTS: dict[str, Callable] = {
    "ingest-op": _result_ingest, "features-op": _result_features, "log-nn-op": lambda o: f"{o:,} NN-feature rows",
    "train-op": _result_train, "evaluate-op": _result_evaluate, "package-op": _result_package,
}


def step_result(step: str, outputs: dict) -> str:
    """A step's one-line result from its outputs (rows written, HIT@3, pass/fail ...)."""
    step = next((k for k, twins in BRANCH_TASKS.items() if step in twins), step)  # a TrainJob-branch twin
    out = outputs.get("Output")
    try:
        if step == "validate-op":
            return "pass" if out == "pass" else "FAIL: the batch is in quarantine; see the validation report"
        if step == "gate-op":
            report = outputs.get("report")
            reason = Path(report.path).read_text().splitlines()[2] if report is not None else ""
            return f"{'pass' if out == 'pass' else 'FAIL'}: {reason}"[:200]
        return _RESULTS[step](out) if step in _RESULTS else str(out)[:160]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError):
        return str(out)[:160]


# --------------------------------------------------------------------------- summary

def _task_output(task_dir: Path, key: str = "Output"):
    f = task_dir / "executor_output.json"
    if not f.exists():
        return None
    data = json.loads(f.read_text())
    return data.get("parameterValues", {}).get(key)


def _artifact_metadata(task_dir: Path, artifact: str, key: str):
    """A value a step recorded in an output artifact's metadata (e.g. the validate step's
    GX Data Docs site), or None."""
    f = task_dir / "executor_output.json"
    if not f.exists():
        return None
    arts = json.loads(f.read_text()).get("artifacts", {}).get(artifact, {}).get("artifacts", [])
    return arts[0].get("metadata", {}).get(key) if arts else None


STEP_ORDER = ("ingest-op", "validate-op", "features-op", "log-nn-op", "train-op", "evaluate-op",
              "gate-op", "package-op")


#: the TrainJob branch's tasks (``train_nodes > 0``) stand for these steps of STEP_ORDER
BRANCH_TASKS: dict[str, tuple[str, ...]] = {"train-op": ("trainjob-op",), "evaluate-op": ("evaluate-op-2",),
                                            "gate-op": ("gate-op-2",), "package-op": ("package-op-2",)}


def task_of(run_root: Path, step: str) -> str:
    """The task that ran ``step`` in this run: the step itself, or its TrainJob-branch twin."""
    for task in (step, *BRANCH_TASKS.get(step, ())):
        if (run_root / task).exists():
            return task
    return step


def summarize_run(run_root: Path, seconds: float, params: dict, records: dict | None = None,
                  logs: Path | None = None) -> dict:
    """Which steps ran, what they decided and where their artefacts and logs are."""
    records = records or {}
    steps = {}
    for step in STEP_ORDER:
        task = task_of(run_root, step)
        d = run_root / task
        ran = (d / "executor_output.json").exists()
        rec = records.get(task, {})
        steps[step] = {"ran": ran, "dir": str(d) if d.exists() else None, "task": task,
                       "status": rec.get("status", "ok" if ran else "skipped"),
                       "seconds": rec.get("seconds"), "log": rec.get("log")}
    validate = _task_output(run_root / "validate-op")
    gate = _task_output(run_root / task_of(run_root, "gate-op"))
    evaluation = _task_output(run_root / task_of(run_root, "evaluate-op"))
    package = _task_output(run_root / task_of(run_root, "package-op"))
    where = f"its log in {logs}" if logs else "the step logs"
    if validate == "fail":
        outcome = "stopped: validation failed (the batch is in quarantine; see the validation report)"
    elif not steps["ingest-op"]["ran"] or (validate is None):
        outcome = f"failed before validation (see {where})"
    elif gate == "fail":
        outcome = "stopped: the challenger did not pass the gate; nothing packaged"
    elif package is not None and not json.loads(package).get("promoted", True):
        outcome = "stopped: another run changed the champion and this model did not pass the gate against it"
    elif package is not None:
        outcome = "packaged: the new model is the champion"
    else:
        failed = next((s for s in STEP_ORDER if not steps[s]["ran"]), "?")
        outcome = f"failed at {failed} (see {where})"
    return {
        "run": str(run_root), "seconds": round(seconds, 1), "params": params, "outcome": outcome,
        "steps": steps, "validation": validate, "gate": gate, "logs": str(logs) if logs else None,
        "metrics": json.loads(evaluation) if evaluation else None,
        "package": json.loads(package) if package else None,
        "reports": {**{s: str(p) for s in ("validate-op", "evaluate-op", "gate-op")
                       if (p := run_root / s / "report").exists()},
                    **({"validate-op data docs": d}
                       if (d := _artifact_metadata(run_root / "validate-op", "report", "data_docs")) else {})},
    }


def summary_markdown(s: dict) -> str:
    lines = [f"# Pipeline run `{Path(s['run']).name}`", "", f"**Outcome:** {s['outcome']}", "",
             f"Took {s['seconds']} s.", "", "| step | ran | status | seconds | log |", "|---|---|---|---|---|"]
    for k, v in s["steps"].items():
        took = "" if v.get("seconds") is None else v["seconds"]
        log = f"`{v['log']}`" if v.get("log") else ""
        lines.append(f"| {k} | {'yes' if v['ran'] else 'no'} | {v.get('status', '')} | {took} | {log} |")
    if s.get("logs"):
        lines += ["", f"Step logs (the executor output of every step): `{s['logs']}`"]
    if s.get("metrics"):
        lines += ["", "## HIT@3", "", "| action | HIT@3 | 95% CI |", "|---|---|---|"]
        for a, v in s["metrics"]["hit"].items():
            lines.append(f"| {a} | {v['value']:.4f} | [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] |")
    if s.get("reports"):
        lines += ["", "## Reports", ""] + [f"- {k}: `{v}`" for k, v in s["reports"].items()]
    if s.get("package"):
        lines += ["", "## Package", "", "```", json.dumps(s["package"], indent=2), "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- Kubeflow

def submit(host: str, name: str = "training", params: dict | None = None, experiment: str = "transact",
           namespace: str | None = None, run_name: str | None = None, existing_token: str | None = None,
           enable_caching: bool | None = None, image: str | None = None, cluster=None):
    """Compiles (with ``image`` and ``cluster``, see :func:`compile_pipeline`) and submits a run to the Kubeflow
    Pipelines API at ``host``; a host that is down, wrong or refuses the token raises
    :class:`KubeflowError` (one line)."""
    import tempfile

    import kfp

    params = check_params(name, params or {})
    check_cluster_root(params["storage_root"])
    host = normalize_host(host)
    probe_kubeflow(host, existing_token)
    with kubeflow_errors(host), warnings.catch_warnings():
        # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later": said on every
        # call, a line on the screen of every submit; the probe above found a v2 API already
        warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
        client = kfp.Client(host=host, namespace=namespace, existing_token=existing_token)
        with tempfile.TemporaryDirectory() as tmp:
            package = compile_pipeline(name, Path(tmp) / f"{name}.yaml", image=image, cluster=cluster)
            return client.create_run_from_pipeline_package(
                str(package), arguments=params, run_name=run_name, experiment_name=experiment,
                namespace=namespace, enable_caching=enable_caching)


def normalize_host(host: str) -> str:
    """What kfp.Client does to ``host`` (https:// when no scheme, no trailing slash), done
    here so the messages name the URL that was really asked, and kfp has nothing to warn."""
    host = host.strip()
    if not host.startswith(("http://", "https://")):
        host = "https://" + host
    return host.rstrip("/")


def probe_kubeflow(host: str, token: str | None = None, timeout: float = 10.0) -> None:
    """One GET of ``<host>/apis/v2beta1/healthz`` before kfp.Client is made: the client
    retries a failing host 5 times 5 s apart and logs a traceback each time, then raises a
    bare TimeoutError; this says at once what is wrong and what to check."""
    import certifi
    import urllib3

    url = host + HEALTHZ
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    try:
        r = pool.request("GET", url, headers=headers, timeout=timeout, retries=False)
    except urllib3.exceptions.HTTPError as e:
        raise KubeflowError(f"the Kubeflow Pipelines API at {host} did not answer ({_no_answer(e, timeout)}); "
                            "check --host and that the cluster (or its port-forward) is up") from None
    if r.status in (401, 403):
        raise KubeflowError(f"{url} refused the request (HTTP {r.status}); check --token or $KFP_TOKEN")
    if 300 <= r.status < 400:
        raise KubeflowError(f"{url} redirects to {r.headers.get('Location', '?')} (a login page?); "
                            "pass a bearer token with --token or $KFP_TOKEN")
    if r.status != 200 or not _is_json(r.data):
        what = f"HTTP {r.status}" if r.status != 200 else "an answer that is not JSON"
        raise KubeflowError(f"{host} is not a Kubeflow Pipelines API ({what} from {HEALTHZ}); check --host "
                            "(it includes the API's path, e.g. https://kubeflow.example.com/pipeline)")


def _is_json(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data or b"null"), dict)
    except ValueError:
        return False


def _no_answer(e: Exception, timeout: float) -> str:
    """Why a connection failed, in a few words (urllib3 nests the cause in long reprs)."""
    from urllib3.exceptions import (
        MaxRetryError,
        NameResolutionError,
        NewConnectionError,
        SSLError,
        TimeoutError as Urllib3Timeout,
    )

    cause = e.reason if isinstance(e, MaxRetryError) and e.reason else e
    if isinstance(cause, NameResolutionError):
        return "its name does not resolve"
    if isinstance(cause, NewConnectionError):
        m = re.search(r"\] ([^\]\)\"']+)", str(cause))
        return m.group(1).strip().lower() if m else "no connection"
    if isinstance(cause, Urllib3Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(cause, SSLError):
        return f"TLS failed: {str(cause).splitlines()[0][:120]}"
    return str(cause).splitlines()[0][:160] if str(cause) else type(cause).__name__


@contextlib.contextmanager
def kubeflow_errors(host: str) -> Iterator[None]:
    """The API's refusals (bad token, unknown namespace, server errors) and dropped
    connections while submitting, as one-line :class:`KubeflowError`."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as e:
        hint = "; check --token or $KFP_TOKEN" if e.status in (401, 403) else ""
        raise KubeflowError(f"the Kubeflow Pipelines API at {host} refused the run: HTTP {e.status} "
                            f"{e.reason}{_api_message(e.body)}{hint}") from None
    except urllib3.exceptions.HTTPError as e:
        raise KubeflowError(f"the Kubeflow Pipelines API at {host} stopped answering ({_no_answer(e, 10)}); "
                            "check --host and that the cluster is up") from None


def _api_message(body) -> str:
    try:
        data = json.loads(body or "{}")
    except (TypeError, ValueError):
        return ""
    msg = (data.get("message") or data.get("error") or "") if isinstance(data, dict) else ""
    return f" ({msg.splitlines()[0][:160]})" if msg else ""
