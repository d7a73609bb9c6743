"""``/metrics`` stays complete (issue 18, item 2).

BentoML empties ``$BENTOML_HOME/prometheus_multiproc_dir`` whenever a server starts, so a
second server under the same home blanked the first one's ``/metrics`` (200, empty body)
for good. Each server now runs with a BentoML home of its own (its models linked to the
shared store, :func:`transact.serving.launch.server_home`): the first keeps every series
through load, client errors and a second server's start.
"""
from __future__ import annotations

import os
import re

import httpx
import pytest
import torch

from helpers import SERVING_CFG as CFG, world_bodies, write_world
from transact.model.checkpoint import save_model
from transact.model.transact import build_model
from transact.serving.launch import running_server, server_env, server_home
from transact.serving.packaging import local_stores, package_model
from transact.serving.settings import ServeSettings

SERIES = ("transact_requests_total", "transact_candidates_total", "transact_batch_candidates_bucket",
          "transact_stage_seconds_bucket")


def scrape(url: str) -> dict[str, float]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.e+-]+|NaN|\+Inf)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def requests_by_code(metrics: dict[str, float]) -> dict[str, float]:
    return {re.search(r'code="(\d+)"', k).group(1): v for k, v in metrics.items()
            if k.startswith("transact_requests_total{")}


@pytest.mark.slow
def test_metrics_survive_load_errors_and_a_second_server(tmp_path):
    _, _, _, requests = write_world(tmp_path / "w")
    torch.manual_seed(0)
    save_model(tmp_path / "model", build_model("v2", CFG))
    bodies = world_bodies(requests)
    with local_stores(tmp_path / "bentoml"):
        tag = package_model(tmp_path / "model")["tag"]
        # the world's past request times are replayed: client times are trusted
        settings = ServeSettings(model_tag=tag, world=str(tmp_path / "w"), threads=1, max_clock_skew_s=None)
        with running_server(settings, bentoml_home=str(tmp_path / "bentoml")) as url:
            for b in bodies[:10]:
                assert httpx.post(f"{url}/rank", json=b, timeout=60).status_code == 200
            for bad in (b"{", b'{"user_id": "x", "item_ids": [1]}', b'{"user_id": 1, "item_ids": []}'):
                r = httpx.post(f"{url}/rank", content=bad, headers={"content-type": "application/json"}, timeout=60)
                assert r.status_code == 400
            assert httpx.get(f"{url}/rank", timeout=10).status_code == 405
            before = scrape(url)
            assert all(any(k.startswith(s) for k in before) for s in SERIES), sorted(before)
            assert requests_by_code(before) == {"200": 10, "400": 3, "405": 1}
            # a second server under the same BentoML home starts (and exits) meanwhile
            with running_server(settings, bentoml_home=str(tmp_path / "bentoml")) as other:
                assert httpx.post(f"{other}/rank", json=bodies[0], timeout=60).status_code == 200
                assert requests_by_code(scrape(other)) == {"200": 1}
            for b in bodies[10:15]:
                assert httpx.post(f"{url}/rank", json=b, timeout=60).status_code == 200
            after = scrape(url)
            assert all(any(k.startswith(s) for k in after) for s in SERIES), sorted(after)
            assert requests_by_code(after) == {"200": 15, "400": 3, "405": 1}
            assert after["transact_candidates_total"] > before["transact_candidates_total"]


def test_each_server_has_its_own_bentoml_home_sharing_the_model_store(tmp_path):
    """Unit level: two addresses, two homes (two Prometheus folders), one model store."""
    home = tmp_path / "bentoml"
    s = ServeSettings(world="/w")
    a, b = (server_env(s, home, "127.0.0.1", p, base={}) for p in (4001, 4002))
    assert a["BENTOML_HOME"] != b["BENTOML_HOME"]
    assert a["BENTOML_HOME"] == str(server_home(home, "127.0.0.1", 4001))
    for env in (a, b):
        models = os.path.join(env["BENTOML_HOME"], "models")
        assert os.path.islink(models) and os.path.realpath(models) == str((home / "models").resolve())
    (home / "models" / "m").mkdir()
    assert os.path.isdir(os.path.join(a["BENTOML_HOME"], "models", "m"))
    assert server_home(home, "127.0.0.1", 4001) == server_home(home, "127.0.0.1", 4001)  # again: same link
