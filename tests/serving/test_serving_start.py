"""A bad start ends (issue 18, item 3).

`transact serve` checks the model, the source and the world before a server starts and
exits 2 with one line; a worker that cannot load (plain `bentoml serve` with a bad or no
configuration) stays alive but not ready, answers /rank with 503 naming the cause, and is
not restarted in a loop; a bento declares its source the BentoML way (bentofile ``envs``),
carries its model (bentofile ``models``) and serves it.

A server is a child process given its settings as its environment: this process's
environment and modules are left alone (no serving module writes ``os.environ`` or
re-imports a module); the one private BentoML API left (this process's stores, for tests
and the benchmark) is pinned here against the installed version.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from helpers import SERVING_CFG as CFG, wait_served, write_world
from transact.cli import app
from transact.model.checkpoint import save_model
from transact.model.transact import build_model
from transact.serving.launch import free_port
from transact.serving.packaging import local_stores, package_model
from transact.serving.settings import ServeSettings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    write_world(root / "w")
    torch.manual_seed(0)
    save_model(root / "model", build_model("v2", CFG))
    with local_stores(root / "bentoml"):
        tag = package_model(root / "model")["tag"]
    return root, tag


def one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.mark.parametrize(("args", "words"), [
    (["--world", "/nope"], ["--world", "/nope"]),
    (["--model", "nope:1", "--world", "{w}"], ["model 'nope:1'", "transact package"]),
    ([], ["no sequence source", "--world", "--feast-repo"]),
    (["--feast-repo", "{root}"], ["feature_store.yaml", "transact features apply"]),
])
def test_serve_checks_its_configuration_before_starting(packaged, args, words):
    root, tag = packaged
    args = [a.format(w=root / "w", root=root) for a in args]
    with local_stores(root / "bentoml"):
        r = CliRunner().invoke(app, ["serve", "--model", tag, *args])
    line = one_error_line(r)
    for w in words:
        assert w in line, (w, line)


def test_serve_refuses_an_unsealed_world(packaged, tmp_path):
    import shutil

    root, tag = packaged
    w = shutil.copytree(root / "w", tmp_path / "w")
    (w / "manifest.json").unlink()
    with local_stores(root / "bentoml"):
        line = one_error_line(CliRunner().invoke(app, ["serve", "--model", tag, "--world", str(w)]))
    assert "--world" in line and "seal-world" in line


@pytest.mark.parametrize(("env", "cause"), [
    ({"TRANSACT_WORLD": "/nope"}, "no world folder /nope"),
    ({}, "no sequence source"),
    # a bad value is read in the worker now (the module reads none): the same one line, unready
    ({"TRANSACT_WORLD": "/nope", "TRANSACT_REQUEST_TIMEOUT_S": "soon"}, "TRANSACT_REQUEST_TIMEOUT_S='soon'"),
    ({"TRANSACT_WORLD": "/nope", "TRANSACT_REQUEST_TIMEOUT_S": "9999"}, "TRANSACT_REQUEST_TIMEOUT_S=9999 must be"),
])
def test_a_worker_that_cannot_load_is_alive_not_ready_and_says_why(packaged, monkeypatch, env, cause):
    root, tag = packaged
    for k in [k for k in os.environ if k.startswith("TRANSACT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TRANSACT_MODEL_TAG", tag)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with local_stores(root / "bentoml"):
        from transact.serving.service import TransActRanker

        svc = TransActRanker()  # no exception: BentoML would restart a raising worker forever
        try:
            assert svc.__is_alive__() and not svc.__is_ready__()
            r = asyncio.run(svc.rank(user_id=11, item_ids=[3, 10]))
            body = json.loads(r.body)
            assert r.status_code == 503 and body["fields"] == ["service"] and cause in body["error"], body
        finally:
            svc.shutdown()


@pytest.mark.slow
def test_plain_bentoml_serve_with_a_bad_world_stays_up_unready_without_a_restart_loop(packaged, tmp_path):
    root, tag = packaged
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSACT_")}
    env.update(BENTOML_HOME=str(root / "bentoml"), TRANSACT_MODEL_TAG=tag, TRANSACT_WORLD="/nope",
               BENTOML_DO_NOT_TRACK="true")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "transact.serving.service:TransActRanker",
                             "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc, tmp_path / "server.log", timeout=120, probe="/livez")
        for _ in range(6):  # over a few seconds: alive, unready, the same worker
            assert httpx.get(f"{url}/livez", timeout=5).status_code == 200
            assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
            time.sleep(0.5)
        r = httpx.post(f"{url}/rank", json={"user_id": 1, "item_ids": [3]}, timeout=10)
        assert r.status_code == 503 and "no world folder /nope" in r.json()["error"], r.text
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert text.count("not ready: ") == 1, text[-3000:]  # one worker start, no restarts
    assert "Traceback" not in text, text[-3000:]


def test_transact_source_configures_the_bento_the_bentoml_way():
    import yaml

    from transact.serving.launch import SERVICE  # noqa: F401 - the service path the bento names

    text = (REPO / "serving" / "bentofile.yaml").read_text()
    bentofile = yaml.safe_load(text)
    required = [e for e in bentofile["envs"] if not e.get("value")]
    assert [e["name"] for e in required] == ["TRANSACT_SOURCE"]  # declared; nothing enforces it
    # what the file says about it is what happens (test_a_worker_that_cannot_load_...[env1])
    assert "refuses" not in text and "unready" in text and "no sequence source" in text
    assert bentofile["models"] == ["transact-ranker:latest"]  # the bento carries its model
    assert not [e for e in bentofile["envs"] if e["name"] in ("TRANSACT_HOST", "TRANSACT_PORT")]
    s = ServeSettings.from_env({"TRANSACT_SOURCE": "world:/data/w"})
    assert (s.world, s.feast_repo) == ("/data/w", None)
    assert ServeSettings.from_env({"TRANSACT_SOURCE": "feast:/repo"}).feast_repo == "/repo"
    with pytest.raises(ValueError, match="TRANSACT_SOURCE='s3://bucket': write world:<folder> or feast:<repo>"):
        ServeSettings.from_env({"TRANSACT_SOURCE": "s3://bucket"})
    with pytest.raises(ValueError, match="both set"):
        ServeSettings.from_env({"TRANSACT_SOURCE": "world:/a", "TRANSACT_WORLD": "/b"})


# --- configuration passed, never smuggled ----------------------------------------------------------
# (no library module writes os.environ or reloads a module: tests/test_settings_passed.py)

def test_importing_the_service_reads_no_setting():
    """A bad value in the environment does not break the import (the service reads its
    settings when an instance is made); what BentoML reads from the class is constant."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRANSACT_")},
           "TRANSACT_REQUEST_TIMEOUT_S": "soon", "TRANSACT_MAX_BODY_BYTES": "nope", "TRANSACT_MODEL_TAG": "x:1"}
    code = ("import transact.serving.service as s; c = s.TransActRanker.config; "
            "print(c['http'], c['traffic'], s.ROUTE.max_body_bytes)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[0] == "{'host': '127.0.0.1', 'port': 3000} {'timeout': 610.0} 4194304"


def test_start_server_gives_the_child_its_settings_and_leaves_this_process_alone(monkeypatch, tmp_path):
    """Unit level (no server): the command is BentoML's own, the environment is explicit --
    this process's minus every TRANSACT_* variable, plus the settings and a BentoML home of
    the server's own -- and nothing in this process changes; no module is re-imported."""
    import importlib

    from transact.serving import launch

    started = {}

    class FakePopen:
        def __init__(self, args, env=None, **kw):
            started.update(args=args, env=env, kw=kw)
            self.pid, self.returncode = 999_999_999, None

        def poll(self):
            return self.returncode

    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(importlib, "reload", lambda m: pytest.fail(f"reloaded {m}"))
    monkeypatch.setenv("TRANSACT_LOG_DIR", "/from/the/caller")  # must not leak into the server
    before = dict(os.environ)
    settings = ServeSettings(model_tag="m:1", world="/w", max_clock_skew_s=None, threads=2)
    server = launch.start_server(settings, tmp_path / "home", "127.0.0.1", 4567)
    assert dict(os.environ) == before
    assert started["args"] == [sys.executable, "-m", "bentoml", "serve", launch.SERVICE,
                               "--host", "127.0.0.1", "--port", "4567"]
    env = started["env"]
    assert {k: v for k, v in env.items() if k.startswith("TRANSACT_")} == settings.to_env()
    assert ServeSettings.from_env(env) == settings and "TRANSACT_LOG_DIR" not in env
    assert env["BENTOML_HOME"] == str((tmp_path / "home").resolve() / "servers" / "127.0.0.1-4567")
    assert started["kw"]["start_new_session"] is True
    assert server.url == "http://127.0.0.1:4567" and server.running


def test_local_stores_point_this_process_at_a_home(tmp_path):
    """Pins the one private BentoML API the serving code uses (this process's stores, for
    tests and the benchmark) against the installed BentoML: inside, models are stored and
    found under the folder; after -- also after an error -- the previous stores are back; the
    environment is never touched."""
    import bentoml

    from transact.serving.packaging import local_stores

    before_env = dict(os.environ)
    outer = [str(m.tag) for m in bentoml.models.list()]
    with local_stores(tmp_path / "a"):
        with bentoml.models.create("pin-test:1") as m:
            (Path(m.path) / "x").write_text("1")
        assert Path(bentoml.models.get("pin-test:1").path).is_relative_to(tmp_path / "a" / "models")
        seen_inside = []

        def fail_inside():
            with local_stores(tmp_path / "b"):
                seen_inside.extend(bentoml.models.list())
                raise RuntimeError("inside")

        with pytest.raises(RuntimeError, match="inside"):
            fail_inside()
        assert seen_inside == []
        assert [str(m.tag) for m in bentoml.models.list()] == ["pin-test:1"]  # restored after the error
    assert [str(m.tag) for m in bentoml.models.list()] == outer
    assert dict(os.environ) == before_env


@pytest.mark.slow
def test_a_built_bento_carries_its_model_and_serves_it(tmp_path):
    """`transact package --build`, then the bento alone: exported, imported into an empty
    BentoML home, served with plain `bentoml serve <bento>` and TRANSACT_SOURCE -- the model
    it answers with is the one it carries (the home holds nothing else)."""
    import bentoml

    from transact.serving.packaging import build_bento

    write_world(tmp_path / "w")
    torch.manual_seed(7)
    save_model(tmp_path / "model", build_model("v2", CFG))
    torch.manual_seed(8)
    save_model(tmp_path / "other", build_model("v2", CFG))
    with local_stores(tmp_path / "build-home"):
        tag = package_model(tmp_path / "model")["tag"]
        package_model(tmp_path / "other")  # stored later: "latest" in this home, not in the bento
        bento_tag = build_bento(tag)
        bentoml.export_bento(bento_tag, str(tmp_path / "ranker.bento"))
    with local_stores(tmp_path / "serve-home"):
        bentoml.import_bento(str(tmp_path / "ranker.bento"))
        assert [str(m.tag) for m in bentoml.models.list()] == [tag]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSACT_")}
    env.update(BENTOML_HOME=str(tmp_path / "serve-home"), BENTOML_DO_NOT_TRACK="true",
               TRANSACT_SOURCE=f"world:{tmp_path / 'w'}", TRANSACT_CPU_FORWARD="eager", TRANSACT_THREADS="1")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc, tmp_path / "server.log")
        r = httpx.post(f"{url}/rank", json={"user_id": 11, "item_ids": [3, 10]}, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == tag, r.text
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["sigterm", "ctrl-c", "hangup"])
def test_transact_serve_runs_in_the_foreground_and_stops_gracefully(packaged, tmp_path, sig):
    """`transact serve` starts the server as its child, serves, and on SIGTERM, Ctrl+C or a hang-up stops
    it the graceful way: the shutdown hook flushes the served log, nothing is left running."""
    import psutil

    root, tag = packaged
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSACT_")}
    env.update(BENTOML_HOME=str(root / "bentoml"), BENTOML_DO_NOT_TRACK="true")
    log = open(tmp_path / "cli.log", "w")
    cli = [sys.executable, "-m", "transact.cli", "serve", "--model", tag, "--world", str(root / "w"),
           "--port", str(port), "--log-dir", str(tmp_path / "served"), "--cpu-forward", "eager", "--threads", "1"]
    proc = subprocess.Popen(cli, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc, tmp_path / "cli.log")
        r = httpx.post(f"{url}/rank", json={"user_id": 11, "item_ids": [3, 10, 17], "request_id": 4242}, timeout=60)
        assert r.status_code == 200, r.text
        server_tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(server_tree) >= 2  # BentoML's arbiter and its worker
        proc.send_signal(sig)
        try:
            code = proc.wait(180)  # its own stop path: up to 120 s for the arbiter, then a kill
        except subprocess.TimeoutExpired:
            pytest.fail("still running 180 s after the signal; its log:\n" + (tmp_path / "cli.log").read_text()[-3000:])
        assert code == 0, (tmp_path / "cli.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not [p for p in server_tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    from transact.serving.served_log import read_served_log

    served = read_served_log(tmp_path / "served")
    assert served.column("request_id").to_pylist() == [4242] * 3  # flushed by the shutdown hook
