"""SIGKILL of the real service under load loses no row it answered (issue 18, item 1).

A BentoML server on 127.0.0.1 ranks concurrent requests with its parquet writer set to
never flush; mid-load, the server and its worker get SIGKILL (what the OOM killer does).
The next writer on the log folder recovers the write-ahead segments: every candidate of
every answered request is on disk, none twice, and ``transact_logged_rows_total`` counted
rows as they became durable.
"""
from __future__ import annotations

import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import torch

from helpers import write_world
from test_serving_http import _world_bodies
from transact.model.checkpoint import save_model
from transact.features.config import FeatureConfig
from transact.model.transact import build_model
from transact.serving.launch import running_server
from transact.serving.packaging import bentoml_home, package_model
from transact.serving.served_log import ServedLogWriter, read_served_log
from transact.serving.settings import ServeSettings

CFG = FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)


def kill_server_processes() -> int:
    """SIGKILL every process this test started (the server, its arbiter and worker) at once:
    all are stopped (SIGSTOP) first, so the arbiter cannot restart a worker between kills."""
    procs = psutil.Process().children(recursive=True)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    return len(procs)


def logged_rows_metric(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^transact_logged_rows_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else -1.0


@pytest.mark.slow
def test_sigkill_under_load_loses_no_answered_row(tmp_path):
    _, _, _, requests = write_world(tmp_path / "w", n_users=8)
    torch.manual_seed(1)
    model = build_model("v2", CFG)
    save_model(tmp_path / "model", model)
    bodies = _world_bodies(requests) * 4  # 120 requests, each id served up to 4 times
    answered: list[dict] = []
    lock = threading.Lock()
    with bentoml_home(tmp_path / "bentoml"):
        info = package_model(tmp_path / "model")
        settings = ServeSettings(model_tag=info["tag"], world=str(tmp_path / "w"), log_dir=str(tmp_path / "log"),
                                 log_flush_rows=10**7, log_flush_s=3600, log_queue_rows=10**7, threads=1,
                                 max_clock_skew_s=None)  # replays the world's past request times
        ctx = running_server(settings, bentoml_home=str(tmp_path / "bentoml"))
        url = ctx.__enter__()
        killed = threading.Event()

        def post(body):
            if killed.is_set():
                return
            try:
                r = httpx.post(f"{url}/rank", json=body, timeout=60)
            except httpx.HTTPError:
                return  # in flight when the server died: never answered
            if r.status_code == 200:
                with lock:
                    answered.append(r.json())
                    if len(answered) == 60:
                        metric = logged_rows_metric(url)
                        assert metric >= sum(len(a["ranked"]) for a in answered[:55])
                        assert kill_server_processes() >= 1
                        killed.set()

        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(post, bodies))
        finally:
            try:
                ctx.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - the server is already dead
                pass
    assert killed.is_set() and len(answered) >= 60
    assert not list((tmp_path / "log").glob("served-*.parquet"))  # nothing had reached a file
    writer = ServedLogWriter(tmp_path / "log", CFG, model.cfg.heads)  # what a restarted service does first
    writer.close()
    served = read_served_log(tmp_path / "log")
    on_disk = {}
    for rid, pos in zip(served.column("request_id").to_pylist(), served.column("position").to_pylist()):
        on_disk[(rid, pos)] = on_disk.get((rid, pos), 0) + 1
    want = {(a["request_id"], x["position"]) for a in answered for x in a["ranked"]}
    assert want <= set(on_disk), f"{len(want - set(on_disk))} answered rows lost"
    # each answer is one served copy: rows on disk are at least the answered candidates
    assert served.num_rows >= sum(len(a["ranked"]) for a in answered)
    assert writer.recovered.rows_recovered == served.num_rows
