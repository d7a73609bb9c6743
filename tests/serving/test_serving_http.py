"""The real service: ``bentoml.serve`` on 127.0.0.1, driven over HTTP.

One server is started for the module (a packaged random-weight model, a hand-made
world, served-row logging held in memory until shutdown); the last test stops it and
checks that the served log, with labels attached, equals the offline NN-logging rows.
"""
from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import SERVING_CFG as CFG, post_rank as _post, world_bodies, write_world
from transact.features.nn_features import arrow_to_s_all, nn_rows_schema
from transact.features.nn_logging import log_nn_features
from transact.model.checkpoint import load_model, save_model
from transact.model.transact import Batch, build_model
from transact.serving.launch import running_server
from transact.serving.packaging import local_stores, package_model
from transact.serving.settings import ServeSettings

MAX_CANDIDATES = 64


class Served:
    def __init__(self, root, url, ctx, rows, requests, model):
        self.root, self.url, self._ctx = root, url, ctx
        self.rows, self.requests, self.model = rows, requests, model
        self.item_ids = sorted(set(requests.column("item_id").to_pylist()))
        self.stopped = False

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self._ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_http")
    items, actions, impressions, requests = write_world(root / "w")
    torch.manual_seed(1)
    save_model(root / "model", build_model("v2", CFG))
    log_nn_features(root / "w", root / "rows.parquet", CFG, progress=False)
    with local_stores(root / "bentoml"):
        info = package_model(root / "model")
        settings = ServeSettings(model_tag=info["tag"], world=str(root / "w"), log_dir=str(root / "log"),
                                 log_flush_rows=10**7, log_flush_s=3600, log_queue_rows=10**7,
                                 log_ship_to=str(root / "store" / "served"), log_ship_s=3600,
                                 max_candidates=MAX_CANDIDATES, threads=1,
                                 max_clock_skew_s=None)  # replays the world's past request times
        ctx = running_server(settings, bentoml_home=str(root / "bentoml"))
        url = ctx.__enter__()
        s = Served(root, url, ctx, pq.read_table(root / "rows.parquet"), requests, load_model(root / "model"))
        try:
            yield s
        finally:
            s.stop()


def test_rank_over_http_matches_offline_model_scores(served):
    rows, model = served.rows, served.model
    s_all, cand = arrow_to_s_all(rows, CFG)
    surface = torch.from_numpy(rows.column("surface").to_numpy().astype(np.int64))
    exp = model.predict_proba(Batch.from_s_all(s_all, cand, surface)).numpy()
    key = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(rows.column("request_id").to_numpy(),
                                                               rows.column("position").to_numpy()))}
    bodies = world_bodies(served.requests)
    first = [_post(served.url, b) for b in bodies[:10]]  # one at a time
    with ThreadPoolExecutor(8) as pool:  # concurrent: cross-request batches
        rest = list(pool.map(lambda b: _post(served.url, b), bodies[10:]))
    heads = list(model.cfg.heads)
    for body, r in zip(bodies, first + rest):
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["request_id"] == body["request_id"] and out["heads"] == heads
        assert sorted(x["position"] for x in out["ranked"]) == list(range(len(body["item_ids"])))
        w = out["score_weights"]
        scores = [x["score"] for x in out["ranked"]]
        assert scores == sorted(scores, reverse=True)
        for x in out["ranked"]:
            assert x["item_id"] == body["item_ids"][x["position"]]
            want = exp[key[(body["request_id"], x["position"])]]
            got = np.array([x["probs"][h] for h in heads])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
            assert x["score"] == pytest.approx(sum(w.get(h, 0) * x["probs"][h] for h in heads), abs=1e-9)


def test_cold_user_top_k_and_request_weights(served):
    body = {"user_id": 987654321, "item_ids": [3, 10, 17, 24], "top_k": 2, "score_weights": {"hide": -1}}
    r = _post(served.url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["cold_start"] is True and len(out["ranked"]) == 2
    assert out["score_weights"] == {"hide": -1.0}
    assert all(x["score"] == pytest.approx(-x["probs"]["hide"]) for x in out["ranked"])
    assert abs(out["request_ts"] - time.time() * 1000) < 600_000  # defaults to now
    emb = [[0.01 * ((i + j) % 7) for j in range(32)] for i in range(3)]
    r = _post(served.url, {"user_id": 5, "item_ids": [1, 2, 999_999_999], "item_embeddings": emb})
    assert r.status_code == 200, r.text  # unknown items are fine with raw embeddings
    assert all(x.get("raw_probs") is None for x in r.json()["ranked"])  # the raw heads only on request
    r = _post(served.url, {"user_id": 5, "item_ids": [3, 10], "raw_probs": True})
    assert r.status_code == 200, r.text
    assert all(set(x["raw_probs"]) == set(x["probs"]) for x in r.json()["ranked"])


NAN_EMB = "[" + ",".join(["NaN"] + ["0"] * 31) + "]"
CLIENT_ERRORS = [
    ("bad json", b"{\"user_id\": 1, ", 400, "body"),
    ("not an object", b"[1, 2]", 400, "body"),
    ("missing field", {"user_id": 1}, 400, "item_ids"),
    ("string id", {"user_id": "1", "item_ids": [3]}, 400, "user_id"),
    ("float id", {"user_id": 1.5, "item_ids": [3]}, 400, "user_id"),
    ("bool id", {"user_id": True, "item_ids": [3]}, 400, "user_id"),
    ("negative user", {"user_id": -1, "item_ids": [3]}, 400, "user_id"),
    ("negative item", {"user_id": 1, "item_ids": [3, -10]}, 400, "item_ids.1"),
    ("too big id", {"user_id": 2**64, "item_ids": [3]}, 400, "user_id"),
    ("empty candidates", {"user_id": 1, "item_ids": []}, 400, "item_ids"),
    ("too many candidates", {"user_id": 1, "item_ids": list(range(MAX_CANDIDATES + 1))}, 400, "item_ids"),
    ("NaN embedding", ('{"user_id": 1, "item_ids": [3], "item_embeddings": [' + NAN_EMB + "]}").encode(), 400,
     "item_embeddings.0.0"),
    ("Infinity", b'{"user_id": 1, "item_ids": [3], "score_weights": {"click": Infinity}}', 400, "score_weights.click"),
    ("short embedding", {"user_id": 1, "item_ids": [3], "item_embeddings": [[0.1] * 31]}, 400, "item_embeddings.0"),
    ("long embedding", {"user_id": 1, "item_ids": [3], "item_embeddings": [[0.1] * 33]}, 400, "item_embeddings.0"),
    ("embedding count", {"user_id": 1, "item_ids": [3, 10], "item_embeddings": [[0.1] * 32]}, 400, "item_embeddings"),
    ("unknown item", {"user_id": 1, "item_ids": [3, 424242]}, 400, "item_ids"),
    ("unknown head", {"user_id": 1, "item_ids": [3], "score_weights": {"like": 1}}, 400, "score_weights"),
    ("huge weight", {"user_id": 1, "item_ids": [3], "score_weights": {"click": 1.7e308}}, 400, "score_weights.click"),
    ("unknown surface", {"user_id": 1, "item_ids": [3], "surface": "moon"}, 400, "surface"),
    ("unknown field", {"user_id": 1, "item_ids": [3], "item_id": 3}, 400, "item_id"),
    ("negative ts", {"user_id": 1, "item_ids": [3], "request_ts": -5}, 400, "request_ts"),
    ("zero top_k", {"user_id": 1, "item_ids": [3], "top_k": 0}, 400, "top_k"),
]


@pytest.mark.parametrize(("name", "body", "status", "field"), CLIENT_ERRORS, ids=[c[0] for c in CLIENT_ERRORS])
def test_client_errors_are_4xx_naming_the_field(served, name, body, status, field):
    r = _post(served.url, body)
    assert r.status_code == status, r.text
    err = r.json()
    assert field in err["fields"], err
    assert err["error"].startswith(field) or f"; {field}" in err["error"], err


def test_protocol_errors(served):
    assert _post(served.url, b"{}", headers={"content-type": "text/plain"}).status_code == 415
    r = _post(served.url, b"{" + b" " * (5 << 20) + b"}")
    assert r.status_code == 413 and r.json()["fields"] == ["body"]
    assert httpx.get(f"{served.url}/rank").status_code == 405
    assert httpx.post(f"{served.url}/nope", json={}).status_code == 404


def test_probes_and_metrics(served):
    assert httpx.get(f"{served.url}/livez").status_code == 200
    assert httpx.get(f"{served.url}/readyz").status_code == 200
    m = httpx.get(f"{served.url}/metrics").text
    assert 'transact_requests_total{code="200"}' in m and 'transact_requests_total{code="400"}' in m
    for name in ("transact_candidates_total", "transact_log_dropped_rows_total", "transact_stage_seconds_count"):
        assert name in m
    dropped = [ln for ln in m.splitlines() if ln.startswith("transact_log_dropped_rows_total")]
    assert dropped and float(dropped[0].split()[-1]) == 0.0


def test_binds_loopback_by_default():
    """The bind address is a constant of the class (BentoML's ``--host/--port`` override it),
    not a setting read when the module is imported."""
    import transact.serving.service as svc
    from transact.serving.launch import server_command

    assert svc.TransActRanker.config["http"] == {"host": "127.0.0.1", "port": 3000}
    assert not hasattr(svc, "SETTINGS") and "host" not in ServeSettings.variables()
    cmd = server_command("127.0.0.1", 4321)
    assert cmd[-4:] == ["--host", "127.0.0.1", "--port", "4321"]


def _grounded(body: dict, known: list[int], heads: list[str]) -> dict:
    """A schema-valid generated body made semantically valid: known item ids, known heads.

    Random ids are almost never in the item table, so raw positive cases mostly (and, with
    some seeds, always) end in a 400; the grounded copy must always be served.
    """
    body = dict(body)
    body["item_ids"] = [known[i % len(known)] for i in body["item_ids"]]
    if body.get("item_embeddings") is not None and len(body["item_embeddings"]) != len(body["item_ids"]):
        del body["item_embeddings"]
    if body.get("score_weights") is not None:
        body["score_weights"] = {h: w for h, w in zip(heads, body["score_weights"].values())}
    return body


def _fuzz(url: str, positive: int, negative: int, known: list[int], heads: list[str]) -> collections.Counter:
    """Schemathesis cases (positive and negative) from the service's own OpenAPI: never a 5xx.

    Every positive case is also sent grounded (:func:`_grounded`), which must be a 200.
    """
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    spec = httpx.get(f"{url}/docs.json").json()
    op = schemathesis.openapi.from_dict(spec)["/rank"]["POST"]
    codes, failures = collections.Counter(), []
    session = requests.Session()
    for mode, n in ((schemathesis.GenerationMode.POSITIVE, positive), (schemathesis.GenerationMode.NEGATIVE, negative)):
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def run(case):
            r = case.call(base_url=url, session=session, timeout=60)
            codes[r.status_code] += 1
            if r.status_code >= 500:
                failures.append((case.body, r.status_code, r.text[:300]))
            if mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):
                body = _grounded(case.body, known, heads)
                g = session.post(f"{url}/rank", json=body, timeout=60)
                codes[g.status_code] += 1
                if g.status_code != 200:
                    failures.append((body, g.status_code, g.text[:300]))

        run()
    assert not failures, failures[:5]
    assert codes[200] > 0 and any(400 <= c < 500 for c in codes), codes
    return codes


def test_fuzz_quick_finds_no_5xx(served):
    codes = _fuzz(served.url, 100, 100, served.item_ids, list(served.model.cfg.heads))
    assert sum(codes.values()) >= 200


@pytest.mark.slow
def test_fuzz_1000_cases_finds_no_5xx(served):
    codes = _fuzz(served.url, 500, 550, served.item_ids, list(served.model.cfg.heads))
    assert sum(codes.values()) >= 1000, codes


def test_served_log_after_shutdown_equals_offline_rows(served):
    """Stopping the server flushes the log and ships it to the storage root (the shipper's last
    pass runs after the writer's close); with labels attached it equals the offline rows.

    The log also holds the other tests' requests; the world's requests were served first,
    and attach_labels keeps the first served copy of a (request_id, position).
    """
    from transact.serving.served_log import attach_labels, read_served_log

    assert not list((served.root / "log").glob("served-*.parquet"))  # held in memory so far
    served.stop()
    assert not list((served.root / "log").glob("served-*.parquet"))  # shipped, then deleted here
    log = read_served_log(served.root / "store" / "served")  # <served>/<host>/served-*.parquet
    assert log.num_rows >= served.requests.num_rows
    train = attach_labels(log, served.requests)
    assert train.equals(served.rows.cast(nn_rows_schema(CFG)))


def test_packaging_round_trip_and_offline_bento_build(tmp_path):
    import bentoml

    from transact.serving.packaging import build_bento, stored_model_dir

    torch.manual_seed(3)
    model = build_model("v2", CFG)
    save_model(tmp_path / "model", model)
    with local_stores(tmp_path / "bentoml"):
        a = package_model(tmp_path / "model")
        b = package_model(tmp_path / "model")
        assert a["created"] and not b["created"] and a["tag"] == b["tag"]
        d = stored_model_dir(a["tag"])
        assert sorted(p.name for p in d.iterdir() if p.name != "model.yaml") == ["config.json", "model.safetensors"]
        assert not list(d.rglob("*.pkl")) and not list(d.rglob("*.pickle"))
        again = load_model(d)
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v)
        assert bentoml.models.get(a["tag"]).info.metadata["sha256"] == a["sha256"]
        torch.manual_seed(4)
        save_model(tmp_path / "model2", build_model("v2", CFG))
        c = package_model(tmp_path / "model2")
        assert c["tag"] != a["tag"]
        bento_tag = build_bento(a["tag"])
        bento = bentoml.get(bento_tag)
        assert [str(m.tag) for m in bento.info.all_models] == [a["tag"]]
        # the bento carries the package as installed: its src alone imports the service (as a
        # container made by `bentoml containerize` does, with no project installed beside it)
        src = Path(bento.path_of("src"))
        assert (src / "transact" / "serving" / "service.py").is_file()
        assert (src / "transact" / "serving" / "bentofile.yaml").is_file()
        probe = ("import sys; sys.path.insert(0, sys.argv[1]); import transact.serving.service as s, "
                 "transact.data.storage as d; print(s.__file__); print(d.__file__)")
        p = subprocess.run([sys.executable, "-c", probe, str(src)], capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-2000:]
        assert all(Path(f).is_relative_to(src) for f in p.stdout.split()), p.stdout


def test_service_class_instantiated_directly(tmp_path, monkeypatch):
    """Unit level: the BentoML service class without a server."""
    write_world(tmp_path / "w")
    torch.manual_seed(5)
    save_model(tmp_path / "model", build_model("v2", CFG))
    with local_stores(tmp_path / "bentoml"):
        tag = package_model(tmp_path / "model")["tag"]
        monkeypatch.setenv("TRANSACT_MODEL_TAG", tag)
        monkeypatch.setenv("TRANSACT_WORLD", str(tmp_path / "w"))
        from transact.serving.service import TransActRanker

        svc = TransActRanker()
        try:
            out = asyncio.run(svc.rank(user_id=11, item_ids=[3, 10]))
            assert [x.item_id for x in out.ranked] and out.model_version.startswith("transact-ranker:")
            err = asyncio.run(svc.rank(user_id=11, item_ids=[3, 5]))  # 5 is not an item
            assert err.status_code == 400 and json.loads(err.body)["fields"] == ["item_ids"]
        finally:
            svc.shutdown()
