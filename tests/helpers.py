"""Shared test helpers: small hand-made event tables in the project schema, kernel test
inputs and device lists (imported as ``helpers``; ``tests/`` is on the path)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run in Triton's CPU interpreter
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from transact.data import schema as S
from transact.data.quantization import quantize
from transact.model.encoder import make_encoder

#: Kernel parity tests: CPU runs the Triton interpreter, CUDA the compiled kernel.
#: ``TRITON_INTERPRET=0 pytest tests/kernels/`` on a GPU machine runs the CUDA
#: cases only (compiled kernels need CUDA tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton interpreter off (TRITON_INTERPRET!=1)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]


def ptxas_available() -> bool:
    """Triton's bundled ptxas: kernels can be lowered to cubins without a GPU."""
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def aot_compile_in_subprocess(module: str, builds: list[dict]) -> None:
    """``<module>.aot_compile(**kw)`` for each build in a fresh interpreter with
    TRITON_INTERPRET unset; asserts every build yields a cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"from {module} import aot_compile\n"
            f"for kw in {builds!r}:\n"
            "    assert aot_compile(**kw).asm['cubin'], kw\n")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def random_encoder(seed: int, **kw) -> nn.TransformerEncoder:
    """make_encoder() with every parameter random, LayerNorm affine and biases included."""
    torch.manual_seed(seed)
    enc = make_encoder(**kw)
    with torch.no_grad():
        for layer in enc.layers:
            for norm in (layer.norm1, layer.norm2):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.3)
            for b in (layer.self_attn.in_proj_bias, layer.self_attn.out_proj.bias):
                b.normal_(0.0, 0.3)
    return enc.eval()


def valid_pattern(rng: np.random.Generator, B: int, S: int, kind: str) -> torch.Tensor:
    """bool [B, S]: random, segment-style (valid suffix), or mixed with all-0 / all-1 rows."""
    if kind == "random":
        v = rng.random((B, S)) < rng.uniform(0.2, 0.9)
    elif kind == "suffix":
        n = rng.integers(0, S + 1, B)
        v = np.arange(S)[None, :] >= (S - n)[:, None]
    else:  # "mixed": all-invalid, all-valid, then random rows
        v = rng.random((B, S)) < 0.5
        v[0] = False
        if B > 1:
            v[1] = True
    return torch.from_numpy(np.ascontiguousarray(v))


def make_items(n: int, rng: np.random.Generator) -> pa.Table:
    emb = (rng.normal(size=(n, S.EMB_DIM)) * 0.15).astype(np.float16)
    q = quantize(emb.astype(np.float32))
    return pa.table(
        {
            "item_id": pa.array(np.arange(n) * 7 + 3, pa.int64()),  # sparse, not dense ids
            "topic": pa.array(np.zeros(n), pa.int32()),
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), S.EMB_DIM),
            "emb_q": pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1), pa.int8()), S.EMB_DIM),
        },
        schema=S.ITEMS,
    )


def make_events(items: pa.Table, n_users: int, n_actions: int, n_imps: int,
                rng: np.random.Generator, t_span: int = 10 * 86_400_000, t0: int = 1_700_000_000_000):
    item_ids = items.column("item_id").to_numpy()
    actions = pa.table(
        {
            "user_id": pa.array(rng.integers(0, n_users, n_actions) * 11, pa.int64()),
            "item_id": pa.array(rng.choice(item_ids, n_actions), pa.int64()),
            "ts": pa.array(t0 + rng.integers(0, t_span, n_actions), pa.int64()),
            "action": pa.array(rng.integers(1, 16, n_actions), pa.uint8()),
            "surface": pa.array(rng.integers(0, len(S.SURFACES), n_actions), pa.int8()),
        },
        schema=S.ACTIONS_TABLE,
    )
    impressions = pa.table(
        {
            "user_id": pa.array(rng.integers(0, n_users, n_imps) * 11, pa.int64()),
            "item_id": pa.array(rng.choice(item_ids, n_imps), pa.int64()),
            "ts": pa.array(t0 + rng.integers(0, t_span, n_imps), pa.int64()),
            "surface": pa.array(rng.integers(0, len(S.SURFACES), n_imps), pa.int8()),
            "request_id": pa.array(rng.integers(0, 1000, n_imps), pa.int64()),
            "position": pa.array(rng.integers(0, 20, n_imps), pa.int16()),
        },
        schema=S.IMPRESSIONS,
    )
    return actions, impressions


def make_requests(items: pa.Table, n_users: int, n_requests: int, per_request: int,
                  rng: np.random.Generator, t_span: int = 10 * 86_400_000, t0: int = 1_700_000_000_000) -> pa.Table:
    """Requests of ``per_request`` candidates each, one user and one ts per request."""
    from transact.data.schema import LABEL_COLUMNS, REQUESTS

    item_ids = items.column("item_id").to_numpy()
    n = n_requests * per_request
    rid = np.repeat(np.arange(n_requests) + 100, per_request)
    return pa.table(
        {
            "request_id": pa.array(rid, pa.int64()),
            "user_id": pa.array(np.repeat(rng.integers(0, n_users + 1, n_requests) * 11, per_request), pa.int64()),
            "item_id": pa.array(rng.choice(item_ids, n), pa.int64()),
            "ts": pa.array(np.repeat(t0 + rng.integers(0, t_span, n_requests), per_request), pa.int64()),
            "surface": pa.array(np.zeros(n), pa.int8()),
            "position": pa.array(np.tile(np.arange(per_request), n_requests), pa.int16()),
            **{c: pa.array(rng.integers(0, 2, n), pa.uint8()) for c in LABEL_COLUMNS},
        },
        schema=REQUESTS,
    )


def write_world(path, seed: int = 0, n_users: int = 5):
    """A small hand-made world folder (all four tables) for step tests."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    items = make_items(60, rng)
    actions, _ = make_events(items, n_users, 400, 400, rng)
    requests = make_requests(items, n_users, 30, 6, rng)
    actions, impressions, requests = linked(actions, requests)
    path.mkdir(parents=True, exist_ok=True)
    from transact.data.world import publishing

    with publishing(path) as stage:  # sealed like every world a reader accepts
        for name, t in (("items", items), ("actions", actions), ("impressions", impressions), ("requests", requests)):
            pq.write_table(t, stage / f"{name}.parquet")
    return items, actions, impressions, requests


def linked(actions: pa.Table, requests: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(actions, impressions, requests) that agree the way one real log does: every request
    row is an impression, every label an engagement in actions (position + 1) seconds after its request,
    and no row combines hide with click or repin. Random tables break all three."""
    def no_hide_conflict(bits: np.ndarray) -> np.ndarray:
        hide = (bits & S.ACTION_BIT["hide"]) > 0
        return np.where(hide, bits & ~np.uint8(S.CONTRADICTS_HIDE_MASK), bits).astype(np.uint8)

    req = {c: requests.column(c).to_numpy() for c in requests.column_names}
    # an item twice in one request: one engagement, so both rows carry the first row's labels
    first = requests.to_pandas().groupby(["request_id", "item_id"])["position"].transform("idxmin").to_numpy()
    for c in S.LABEL_COLUMNS:
        req[c] = req[c][first]
    for a in S.CONTRADICTS_HIDE:
        req[f"label_{a}"] = np.where(req["label_hide"] == 1, 0, req[f"label_{a}"]).astype(np.uint8)
    requests = pa.table(req, schema=S.REQUESTS)
    bits = sum(req[f"label_{a}"].astype(np.uint8) * np.uint8(S.ACTION_BIT[a]) for a in S.EXPLICIT_ACTIONS)
    eng = np.flatnonzero(bits)
    engaged = pa.table({"user_id": req["user_id"][eng], "item_id": req["item_id"][eng],
                        "ts": req["ts"][eng] + 1_000 * (req["position"][eng].astype(np.int64) + 1),
                        "action": bits[eng].astype(np.uint8),
                        "surface": req["surface"][eng]}, schema=S.ACTIONS_TABLE)
    cols = {c: actions.column(c).to_numpy() for c in actions.column_names}
    cols["action"] = no_hide_conflict(cols["action"])
    actions = pa.concat_tables([pa.table(cols, schema=S.ACTIONS_TABLE), engaged])
    impressions = requests.select(list(S.IMPRESSIONS.names)).cast(S.IMPRESSIONS)
    return actions, impressions, requests


def queries_of(requests: pa.Table, weights) -> list:
    """One serving RankQuery per request of a requests table (candidates in position order)."""
    from transact.serving.ranker import RankQuery

    df = requests.to_pandas().sort_values(["request_id", "position"])
    out = []
    for rid, g in df.groupby("request_id", sort=True):
        out.append(RankQuery(user_id=int(g.user_id.iloc[0]), item_ids=g.item_id.to_numpy(np.int64), item_emb_q=None,
                             surface=int(g.surface.iloc[0]), ts=int(g.ts.iloc[0]), request_id=int(rid),
                             weights=dict(weights)))
    return out


def rows_with_split(folder, n_requests: int, cfg, n_users: int, seed: int, quantile: float = 0.75):
    """A synthetic NN-row file with a world.json next to it whose ``train_end_ts`` puts the
    first ``quantile`` of the requests in training; returns the row file's path."""
    import json

    import pyarrow.parquet as pq

    from transact.model.dataset import write_synthetic_rows

    rows = write_synthetic_rows(folder / "nn_rows.parquet", n_requests, cfg, per_request=8, n_users=n_users,
                                seed=seed, row_group_size=100)
    ts = pq.read_table(rows, columns=["ts"]).column("ts").to_numpy()
    (folder / "world.json").write_text(json.dumps({"train_end_ts": int(np.quantile(ts, quantile))}))
    return rows


# --- races ---

def at_once(fn, n: int) -> list:
    """``fn(i)`` for i in 0..n-1, on n threads released together by a barrier; the results in
    order, an exception in place of the result of a call that raised."""
    import threading

    barrier = threading.Barrier(n)
    out: list = [None] * n

    def call(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - handed back to the test, which asserts on it
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# --- features ---

#: the Feast tests' feature caps (``FeatureConfig(**FEAST_CAPS)``): small, so every sequence fills and overflows
FEAST_CAPS = {"ll_cap": 50, "rt_cap": 12, "imp_cap": 5, "k_ll": 8, "k_rt": 4, "r": 4, "k_imp": 4}
#: the first day of :func:`feast_world` (a day boundary)
FEAST_T0 = 1_700_006_400_000 - 1_700_006_400_000 % 86_400_000
#: users of :func:`feast_world`: every event late, impressions only, no event at all
LATE_USER, IMP_ONLY_USER, COLD_USER = 999, 555, 66


def feast_world(path: Path) -> dict:
    """Small sealed world with ties (15-minute grid), a user whose events all come late, a
    user with impressions only, a cold user in the requests, requests on event times and on
    day boundaries; returns its tables by name."""
    import pyarrow.parquet as pq

    from transact.data.world import seal_world
    from transact.features.config import DAY_MS

    rng = np.random.default_rng(7)
    items = make_items(60, rng)
    span = 6 * DAY_MS
    actions, imps = make_events(items, 6, 700, 700, rng, t_span=span, t0=FEAST_T0)
    grid = 15 * 60_000
    actions = actions.set_column(2, "ts", pa.array((actions.column("ts").to_numpy() // grid) * grid, pa.int64()))
    imps = imps.set_column(2, "ts", pa.array((imps.column("ts").to_numpy() // grid) * grid, pa.int64()))
    item_ids = items.column("item_id").to_numpy()
    late_t = FEAST_T0 + 5 * DAY_MS + np.arange(8) * grid
    late = pa.table({"user_id": pa.array(np.full(8, LATE_USER), pa.int64()),
                     "item_id": pa.array(item_ids[:8], pa.int64()), "ts": pa.array(late_t, pa.int64()),
                     "action": pa.array(np.full(8, 3), pa.uint8()), "surface": pa.array(np.zeros(8), pa.int8())},
                    schema=actions.schema)
    only_imp = pa.table({"user_id": pa.array(np.full(6, IMP_ONLY_USER), pa.int64()),
                         "item_id": pa.array(item_ids[:6], pa.int64()),
                         "ts": pa.array(FEAST_T0 + DAY_MS + np.arange(6) * grid, pa.int64()),
                         "surface": pa.array(np.ones(6), pa.int8()), "request_id": pa.array(np.zeros(6), pa.int64()),
                         "position": pa.array(np.arange(6), pa.int16())}, schema=imps.schema)
    actions = pa.concat_tables([actions, late])
    imps = pa.concat_tables([imps, only_imp])
    req = make_requests(items, 6, 60, 3, rng, t_span=span - DAY_MS, t0=FEAST_T0 + DAY_MS)
    ts = req.column("ts").to_numpy().copy()
    users = req.column("user_id").to_numpy().copy()
    a_ts, a_u = actions.column("ts").to_numpy(), actions.column("user_id").to_numpy()
    for k in range(0, 30, 3):  # requests exactly at one of the user's action times
        j = np.flatnonzero((a_u == users[k]) & (a_ts >= FEAST_T0 + DAY_MS))
        if len(j):
            ts[k:k + 3] = a_ts[j[0]]
    ts[30:33] = FEAST_T0 + 3 * DAY_MS  # exactly at a snapshot instant
    users[33:36], ts[33:36] = LATE_USER, FEAST_T0 + 2 * DAY_MS  # before the late user's first event
    users[36:39] = IMP_ONLY_USER
    req = req.set_column(1, "user_id", pa.array(users, pa.int64())).set_column(3, "ts", pa.array(ts, pa.int64()))
    path.mkdir(parents=True, exist_ok=True)
    tables = {"items": items, "actions": actions, "impressions": imps, "requests": req}
    for name, t in tables.items():
        pq.write_table(t, path / f"{name}.parquet")
    seal_world(path)
    return tables


def feast_cli() -> str:
    """The project's ``feast`` command. Feast is a dependency: its console script sits beside
    this interpreter (or on PATH); a missing one is a broken install, and fails the test."""
    import shutil

    exe = Path(sys.executable).parent / "feast"
    found = str(exe) if exe.exists() else shutil.which("feast")
    assert found, f"no feast command beside {sys.executable} or on PATH: feast is a dependency (pip install -e .)"
    return found


# --- serving ---
# Shared by tests/serving/*: the small feature contract of the service tests, a request poster,
# the world's requests as /rank bodies, and a BentoML home for tests that start child processes.

def _serving_cfg():
    from transact.features.config import FeatureConfig

    return FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)


#: The feature contract of the service tests (small sequences: fast on CPU).
SERVING_CFG = _serving_cfg()


def post_rank(url: str, body, **kw):
    """POST ``body`` to ``<url>/rank``: a dict or list as JSON, bytes as they are (JSON content type)."""
    import httpx

    if isinstance(body, (dict, list)):
        return httpx.post(f"{url}/rank", json=body, timeout=60, **kw)
    return httpx.post(f"{url}/rank", content=body, timeout=60,
                      headers=kw.pop("headers", {"content-type": "application/json"}), **kw)


def world_bodies(requests: pa.Table) -> list[dict]:
    """One /rank body per request of a world's requests table (its ids, surface and time)."""
    df = requests.to_pandas().sort_values(["request_id", "position"])
    return [{"user_id": int(g.user_id.iloc[0]), "item_ids": [int(x) for x in g.item_id],
             "surface": S.SURFACES[int(g.surface.iloc[0])], "request_ts": int(g.ts.iloc[0]), "request_id": int(rid)}
            for rid, g in df.groupby("request_id", sort=True)]


def bentoml_home(path):
    """Context manager for tests: this process's BentoML stores in ``path`` *and*
    ``BENTOML_HOME=path`` in the environment, for the child processes a test starts
    (pipelines, CLI runs). Serving code never writes the environment
    (``transact.serving.packaging.local_stores`` is the in-process part)."""
    import contextlib

    from transact.serving.packaging import local_stores

    @contextlib.contextmanager
    def both():
        old = os.environ.get("BENTOML_HOME")
        os.environ["BENTOML_HOME"] = str(path)
        try:
            with local_stores(path) as home:
                yield home
        finally:
            if old is None:
                os.environ.pop("BENTOML_HOME", None)
            else:
                os.environ["BENTOML_HOME"] = old

    return both()


def wait_served(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240.0, probe: str = "/readyz") -> None:
    """:func:`transact.serving.launch.wait_ready` for a server process a test started itself:
    the test fails with the tail of the server's log when it exits or never becomes ready."""
    from transact.serving.launch import wait_ready

    try:
        wait_ready(url, timeout, proc, probe)
    except (RuntimeError, TimeoutError) as e:
        pytest.fail(f"{e}:\n" + log.read_text()[-3000:])


def report_widgets(html: str) -> list[dict]:
    """An Evidently report's widgets in page order (depth first), from the data the page draws."""
    import json
    import re

    m = re.search(r"var metric_\w+ = (\{.*?\});\n", html, re.S)
    assert m, "no widget data in the report"
    out: list[dict] = []

    def walk(ws):
        for w in ws:
            out.append(w)
            walk(w.get("widgets") or [])
    walk(json.loads(m.group(1))["widgets"])
    return out


def monitoring_columns(n: int, seed: int, t0: int, pred_beta: tuple[float, float],
                       heads=("click", "repin", "hide")) -> tuple[dict, np.random.Generator]:
    """The columns of a hand-made monitoring frame (features_frame's columns, a prediction per
    head ~ Beta(*pred_beta), ``n`` rows over the day from ``t0``, 10 rows a request and a user)
    and the generator that drew them, for a test to draw more."""
    from transact.monitoring.features import EMBEDDINGS, NUMERICAL_COLUMNS

    rng = np.random.default_rng(seed)
    cols = {c: rng.normal(size=n) for c in NUMERICAL_COLUMNS}
    cols["surface"] = rng.choice(["homefeed", "search"], size=n)
    for c in EMBEDDINGS["cand"] + EMBEDDINGS["seq"]:
        cols[c] = rng.normal(size=n)
    for h in heads:
        cols[f"pred_{h}"] = rng.beta(*pred_beta, size=n)
    cols.update(ts=t0 + np.sort(rng.integers(0, 86_400_000, size=n)), request_id=np.arange(n) // 10,
                user_id=np.arange(n) // 10)
    return cols, rng
