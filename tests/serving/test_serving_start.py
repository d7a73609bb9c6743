"""A bad start ends (issue 18, item 3).

`transact serve` checks the model, the source and the world before a server starts and
exits 2 with one line; a worker that cannot load (plain `bentoml serve` with a bad or no
configuration) stays alive but not ready, answers /rank with 503 naming the cause, and is
not restarted in a loop; a bento requires its source the BentoML way (bentofile ``envs``).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
from typer.testing import CliRunner

from helpers import write_world
from transact.cli import app
from transact.model.checkpoint import save_model
from transact.features.config import FeatureConfig
from transact.model.transact import build_model
from transact.serving.launch import free_port
from transact.serving.packaging import bentoml_home, package_model
from transact.serving.settings import ServeSettings

CFG = FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    write_world(root / "w")
    torch.manual_seed(0)
    save_model(root / "model", build_model("v2", CFG))
    with bentoml_home(root / "bentoml"):
        tag = package_model(root / "model")["tag"]
    return root, tag


def one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--world", "/nope"], ["--world", "/nope"]),
    (["--model", "nope:1", "--world", "{w}"], ["model 'nope:1'", "transact package"]),
    ([], ["no sequence source", "--world", "--feast-repo"]),
    (["--feast-repo", "{root}"], ["feature_store.yaml", "transact features apply"]),
])
def test_serve_checks_its_configuration_before_starting(packaged, args, words):
    root, tag = packaged
    args = [a.format(w=root / "w", root=root) for a in args]
    with bentoml_home(root / "bentoml"):
        r = CliRunner().invoke(app, ["serve", "--model", tag, *args])
    line = one_error_line(r)
    for w in words:
        assert w in line, (w, line)


def test_serve_refuses_an_unsealed_world(packaged, tmp_path):
    import shutil

    root, tag = packaged
    w = shutil.copytree(root / "w", tmp_path / "w")
    (w / "manifest.json").unlink()
    with bentoml_home(root / "bentoml"):
        line = one_error_line(CliRunner().invoke(app, ["serve", "--model", tag, "--world", str(w)]))
    assert "--world" in line and "seal-world" in line


@pytest.mark.parametrize("env, cause", [
    ({"TRANSACT_WORLD": "/nope"}, "no world folder /nope"),
    ({}, "no sequence source"),
])
def test_a_worker_that_cannot_load_is_alive_not_ready_and_says_why(packaged, monkeypatch, env, cause):
    root, tag = packaged
    for k in [k for k in os.environ if k.startswith("TRANSACT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TRANSACT_MODEL_TAG", tag)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with bentoml_home(root / "bentoml"):
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
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/livez", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the server never answered /livez:\n" + (tmp_path / "server.log").read_text()[-3000:])
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


def test_transact_source_configures_the_bento_the_bentoml_way(monkeypatch):
    import yaml

    from transact.serving.launch import SERVICE  # noqa: F401 - the service path the bento names

    bentofile = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "..", "serving", "bentofile.yaml")))
    required = [e for e in bentofile["envs"] if not e.get("value")]
    assert [e["name"] for e in required] == ["TRANSACT_SOURCE"]  # BentoML refuses to serve without it
    for k in [k for k in os.environ if k.startswith("TRANSACT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TRANSACT_SOURCE", "world:/data/w")
    s = ServeSettings.from_env()
    assert (s.world, s.feast_repo) == ("/data/w", None)
    monkeypatch.setenv("TRANSACT_SOURCE", "feast:/repo")
    assert ServeSettings.from_env().feast_repo == "/repo"
    monkeypatch.setenv("TRANSACT_SOURCE", "s3://bucket")
    with pytest.raises(ValueError, match="TRANSACT_SOURCE='s3://bucket': write world:<folder> or feast:<repo>"):
        ServeSettings.from_env()
    monkeypatch.setenv("TRANSACT_SOURCE", "world:/a")
    monkeypatch.setenv("TRANSACT_WORLD", "/b")
    with pytest.raises(ValueError, match="both set"):
        ServeSettings.from_env()
