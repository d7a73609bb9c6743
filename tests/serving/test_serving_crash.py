"""SIGKILL of the real service under load loses no row it answered (issue 18, item 1).

A BentoML server on 127.0.0.1 ranks concurrent requests with its parquet writer set to
never flush; mid-load, the server (BentoML's arbiter, a child process) and its worker get
SIGKILL (what the OOM killer does). After recovery -- the next writer on the log folder
writes the write-ahead segments of stopped processes -- every candidate of every answered
request is on disk, and no batch twice: each (request, position) is on disk at least as
often as it was answered and at most as often as it was sent, and a second recovery finds
nothing. Whether something recovered the segments before the test does (a respawned
worker, say) is not the guarantee and is not asserted.
"""
from __future__ import annotations

import collections
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import torch

from helpers import SERVING_CFG as CFG, world_bodies, write_world
from transact.model.checkpoint import save_model
from transact.model.transact import build_model
from transact.serving.launch import running_server
from transact.serving.packaging import local_stores, package_model
from transact.serving.served_log import ServedLogWriter, read_served_log
from transact.serving.settings import ServeSettings


def kill_server_processes(before: set[int]) -> list[psutil.Process]:
    """SIGKILL every process this test started (the server: BentoML's arbiter and its worker)
    at once -- the children of this process that were not there ``before`` it, never the test
    session's own services (the S3 server) -- all stopped (SIGSTOP) first, so the arbiter cannot
    restart a worker between kills. Returns them (see :func:`wait_gone`)."""
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    return procs


def wait_gone(procs: list[psutil.Process], timeout: float = 120.0) -> None:
    """Until the killed processes are gone, not zombies: the worker, orphaned by its killed
    arbiter, is reaped by init a moment later, and until then its pid exists -- a writer
    starting then takes its segments for a live process's and leaves them for later."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, alive


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
    bodies = world_bodies(requests) * 4  # 120 requests, each id served up to 4 times
    answered: list[dict] = []
    sent: collections.Counter = collections.Counter()
    lock = threading.Lock()
    with local_stores(tmp_path / "bentoml"):
        info = package_model(tmp_path / "model")
        settings = ServeSettings(model_tag=info["tag"], world=str(tmp_path / "w"), log_dir=str(tmp_path / "log"),
                                 log_flush_rows=10**7, log_flush_s=3600, log_queue_rows=10**7, threads=1,
                                 max_clock_skew_s=None)  # replays the world's past request times
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        ctx = running_server(settings, bentoml_home=str(tmp_path / "bentoml"))
        url = ctx.__enter__()
        killed = threading.Event()
        killed_procs: list[psutil.Process] = []

        def post(body):
            if killed.is_set():
                return
            with lock:
                sent.update((body["request_id"], p) for p in range(len(body["item_ids"])))
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
                        killed_procs.extend(kill_server_processes(before))
                        assert len(killed_procs) >= 2  # the arbiter and its worker
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
    wait_gone(killed_procs)
    writer = ServedLogWriter(tmp_path / "log", CFG, model.cfg.heads)  # what a restarted service does first
    writer.close()
    served = read_served_log(tmp_path / "log")
    on_disk = collections.Counter(zip(served.column("request_id").to_pylist(), served.column("position").to_pylist()))
    answers = collections.Counter((a["request_id"], x["position"]) for a in answered for x in a["ranked"])
    lost = {k: n - on_disk[k] for k, n in answers.items() if on_disk[k] < n}
    assert not lost, f"{len(lost)} answered rows lost, e.g. {list(lost.items())[:5]}"
    twice = {k: n for k, n in on_disk.items() if n > sent[k]}
    assert not twice, f"rows on disk more often than served: {list(twice.items())[:5]}"
    # recovered once: a second writer on the folder finds nothing left to recover
    again = ServedLogWriter(tmp_path / "log", CFG, model.cfg.heads)
    again.close()
    assert again.recovered.rows_recovered == 0
    assert read_served_log(tmp_path / "log").num_rows == served.num_rows
