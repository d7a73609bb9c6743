"""Feature-store benchmark (``transact bench features``): token-blob vs Feast-array
encoding, materialisation throughput and peak memory per engine, online read latency per
online store (SQLite, Redis); plus the local ``redis-server`` it (and the tests) start."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transact.data import schema as S
from transact.features.config import FeatureConfig
from transact.features.feast.codec import decode_tokens, encode_tokens, lengths_of
from transact.features.feast.materialize import materialize
from transact.features.feast.offline import load_world, write_offline
from transact.features.feast.online import OnlineSequences
from transact.features.feast.store import (
    IMP_VIEW,
    ITEM_KEY,
    ITEM_VIEW,
    LL_VIEW,
    OFFLINE_DIRS,
    RT_VIEW,
    USER_KEY,
    VIEW_FEATURES,
    apply,
    init_repo,
    open_store,
)


@contextlib.contextmanager
def local_redis(port: int | None = None, timeout_s: float = 10.0):
    """Starts ``redis-server`` on 127.0.0.1 (no persistence) and yields "127.0.0.1:port";
    stops it on exit. FileNotFoundError when redis-server is not installed."""
    import socket
    import subprocess

    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server not found (Debian: apt-get install -y redis-server)")
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - a server that will not stop is killed
            proc.kill()
            proc.wait()


def encoding_sizes(item_emb_q: np.ndarray, length: int = 16_384, seed: int = 0) -> dict:
    """Bytes per user of one lifelong sequence of ``length`` tokens in the online store
    (SQLite and Redis both store ``ValueProto.SerializeToString()`` per feature), and Feast's
    Python -> proto conversion time, for (a) Feast arrays (Array(Int64) ts + Array(Int32)
    action, surface and the flattened int8 embeddings) vs (b) one packed ``Bytes`` blob."""
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    rng = np.random.default_rng(seed)
    ts = np.sort(1_767_139_200_000 - rng.integers(1, 730 * 86_400_000, length))[::-1].astype(np.int64)
    emb = item_emb_q[rng.integers(0, len(item_emb_q), length)]
    action = rng.choice([1, 2, 3, 8, 9, 10, 4], length).astype(np.uint8)
    surface = rng.integers(0, len(S.SURFACES), length).astype(np.int8)

    t0 = time.perf_counter()
    arrays = [python_values_to_proto_values([ts.tolist()], ValueType.INT64_LIST)[0],
              python_values_to_proto_values([action.astype(np.int32).tolist()], ValueType.INT32_LIST)[0],
              python_values_to_proto_values([surface.astype(np.int32).tolist()], ValueType.INT32_LIST)[0],
              python_values_to_proto_values([emb.astype(np.int32).reshape(-1).tolist()], ValueType.INT32_LIST)[0]]
    a_bytes = sum(len(v.SerializeToString()) for v in arrays)
    t_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob = encode_tokens(ts, emb, action, surface)
    packed = python_values_to_proto_values([blob], ValueType.BYTES)[0]
    p_bytes = len(packed.SerializeToString())
    t_p = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode_tokens([packed.bytes_val])
    t_pd = time.perf_counter() - t0
    t0 = time.perf_counter()
    [np.asarray(v.int64_list_val.val if i == 0 else v.int32_list_val.val) for i, v in enumerate(arrays)]
    t_ad = time.perf_counter() - t0
    return {"l_ll": length,
            "arrays": {"bytes_per_user": a_bytes, "bytes_per_token": a_bytes / length, "values_per_user": 4,
                       "encode_ms": t_a * 1e3, "decode_ms": t_ad * 1e3},
            "packed": {"bytes_per_user": p_bytes, "bytes_per_token": p_bytes / length, "values_per_user": 1,
                       "encode_ms": t_p * 1e3, "decode_ms": t_pd * 1e3},
            "ratio": a_bytes / p_bytes}


def _materialize_child(repo: str, engine: str, batch_rows: int) -> dict:
    """Runs in a fresh process: materialises and reports time and peak memory."""
    from transact.bench.machine import peak_rss_mib

    store = open_store(repo)
    store.list_feature_views()  # registry loaded before the baseline
    base = peak_rss_mib()
    t0 = time.perf_counter()
    out = materialize(store, engine=engine, batch_rows=batch_rows, progress=False)
    out["wall_s"] = time.perf_counter() - t0
    out["rss_base_mib"] = base
    out["rss_peak_mib"] = peak_rss_mib()
    return out


def _subset_world(world: Path, dest: Path, max_users: int) -> Path:
    """The ``max_users`` users with the most actions (all their events) as a world folder."""
    tables = load_world(world)
    au = tables["actions"].column("user_id").to_numpy()
    ids, counts = np.unique(au, return_counts=True)
    keep = ids[np.argsort(-counts, kind="stable")[:max_users]]
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(tables["items"], dest / "items.parquet")
    for name in ("actions", "impressions"):
        t = tables[name]
        pq.write_table(t.filter(pa.array(np.isin(t.column("user_id").to_numpy(), keep))), dest / f"{name}.parquet")
    from transact.data.world import seal_world

    seal_world(dest)  # load_world reads only sealed worlds
    return dest


def bench_features(world: str | Path, workdir: str | Path | None = None, max_users: int | None = None,
                   online: Sequence[str] = ("sqlite", "redis"), redis: str | None = None,
                   engines: Sequence[str] = ("direct", "feast"), reads: int = 300,
                   cfg: FeatureConfig | None = None, batch_rows: int = 2048, seed: int = 0,
                   progress: bool = True) -> dict:
    """Materialisation throughput and peak memory per engine, online read latency, per
    online store; and the encoding comparison at L_LL. Each materialisation runs in a fresh
    process (peak RSS is that process's), from an emptied online store."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import tempfile

    cfg = cfg or FeatureConfig()
    world = Path(world)
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="feast-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        if max_users:
            world = _subset_world(world, work / "world", max_users)
        base = init_repo(work / "offline")
        t0 = time.perf_counter()
        offline = write_offline(world, base, cfg, progress=progress)
        offline["wall_s"] = time.perf_counter() - t0
        result: dict[str, Any] = {"world": str(world), "max_users": max_users, "feature_config": cfg.to_dict(),
                  "offline": offline, "stores": {}}
        items = load_world(world)["items"]
        emb = items.column("emb_q").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, S.EMB_DIM)
        result["encoding"] = encoding_sizes(emb, cfg.ll_cap, seed)
        for kind in online:
            url = None
            if kind == "redis":
                if redis:
                    url = redis
                else:
                    try:
                        url = stack.enter_context(local_redis())
                    except FileNotFoundError as e:
                        result["stores"][kind] = {"skipped": str(e)}
                        continue
            repo = init_repo(work / kind, online=kind, redis=url)
            shutil.rmtree(repo / "data" / "offline", ignore_errors=True)
            shutil.copytree(base / "data" / "offline", repo / "data" / "offline")
            res: dict = {"materialize": {}}
            for engine in engines:
                store = open_store(repo)
                with contextlib.suppress(Exception):
                    store.teardown()  # an empty online store for each engine
                apply(open_store(repo))
                # a fresh process per run: its peak RSS is this materialisation's alone
                with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                    m = pool.submit(_materialize_child, str(repo), engine, batch_rows).result()
                n_users = offline["users"]
                tokens = _online_tokens(repo)  # stored: S_LL + S_RT + impression windows
                views_s = {v: x.get("seconds") for v, x in m["views"].items()}
                user_s = sum(views_s[v] for v in (LL_VIEW, RT_VIEW, IMP_VIEW))
                n_items = offline["views"][ITEM_VIEW]["rows"]
                res["materialize"][engine] = {
                    "wall_s": round(m["wall_s"], 3), "users": n_users, "tokens": tokens,
                    "user_views_s": round(user_s, 3),
                    "users_per_s": n_users / user_s, "tokens_per_s": tokens / user_s,
                    "items": n_items, "items_per_s": n_items / views_s[ITEM_VIEW],
                    "rss_peak_mib": round(m["rss_peak_mib"], 1), "rss_base_mib": round(m["rss_base_mib"], 1),
                    "views_s": views_s}
            res["read"] = _read_latency(repo, cfg, reads, seed)
            result["stores"][kind] = res
    from transact.bench.machine import machine_info

    return {"benchmark": "features", "machine": machine_info(), "result": result}


def _online_tokens(repo: Path) -> int:
    """Tokens of every user's three sequences as stored online (after a materialisation)."""
    store = open_store(repo)
    users = np.unique(np.concatenate([pq.read_table(f, columns=[USER_KEY]).column(USER_KEY).to_numpy()
                                      for v in (LL_VIEW, RT_VIEW, IMP_VIEW)
                                      for f in (repo / OFFLINE_DIRS[v]).glob("part-*.parquet")] or [np.zeros(0, np.int64)]))
    reader = OnlineSequences(store)
    total = 0
    for s in range(0, len(users), 256):
        d = reader.raw(users[s:s + 256])
        total += sum(lengths_of(b) for v in (LL_VIEW, RT_VIEW, IMP_VIEW) for b in d[VIEW_FEATURES[v][0]])
    return int(total)


def _read_latency(repo: Path, cfg: FeatureConfig, reads: int, seed: int) -> dict:
    store = open_store(repo)
    reader = OnlineSequences(store, cfg)
    users = np.unique(pq.read_table(repo / OFFLINE_DIRS[LL_VIEW]).column(USER_KEY).to_numpy())
    rng = np.random.default_rng(seed)
    pick = rng.choice(users, reads) if len(users) else np.zeros(0, np.int64)
    for u in pick[:20]:
        reader.sequences([int(u)])
    lat, toks = [], []
    for u in pick:
        t0 = time.perf_counter()
        ll, rt, imp = reader.sequences([int(u)])
        lat.append(time.perf_counter() - t0)
        toks.append(int(ll.offsets[-1] + rt.offsets[-1] + imp.offsets[-1]))
    items = pq.read_table(repo / OFFLINE_DIRS[ITEM_VIEW], columns=[ITEM_KEY]).column(ITEM_KEY).to_numpy()
    cand_lat = []
    for _ in range(max(reads // 3, 1)):
        c = rng.choice(items, 256)
        t0 = time.perf_counter()
        reader.item_emb_q(c)
        cand_lat.append(time.perf_counter() - t0)
    q = lambda x, p: float(np.percentile(np.asarray(x) * 1e3, p)) if len(x) else None  # noqa: E731
    return {"reads": len(lat), "sequences_p50_ms": q(lat, 50), "sequences_p99_ms": q(lat, 99),
            "sequences_mean_ms": float(np.mean(lat) * 1e3) if lat else None,
            "tokens_mean": float(np.mean(toks)) if toks else 0.0, "tokens_max": int(max(toks, default=0)),
            "candidates": 256, "candidates_p50_ms": q(cand_lat, 50), "candidates_p99_ms": q(cand_lat, 99)}


def format_bench(out: dict) -> str:
    r = out["result"]
    enc = r["encoding"]
    lines = [f"features benchmark -- {r['offline']['users']:,} users, world {r['world']}",
             f"offline sources: {r['offline']['wall_s']:.1f} s, "
             + ", ".join(f"{v} {x['rows']:,} rows / {x['bytes'] / 2**20:.1f} MiB"
                         for v, x in r["offline"]["views"].items() if not v.endswith("_index")),
             "",
             f"encoding of one S_LL of {enc['l_ll']:,} tokens   bytes/user   bytes/token   encode ms   decode ms",
             *(f"  {name:<38}{enc[k]['bytes_per_user']:>11,}{enc[k]['bytes_per_token']:>14.1f}"
               f"{enc[k]['encode_ms']:>12.1f}{enc[k]['decode_ms']:>12.2f}"
               for name, k in (("(a) Feast arrays (4 features)", "arrays"), ("(b) packed Bytes blob (chosen)", "packed"))),
             f"  arrays / packed: {enc['ratio']:.2f}x", "",
             "materialisation: users/s and tokens/s over the three user views; items/s: item_embedding",
             f"{'store':<8}{'engine':<8}{'wall s':>8}{'users/s':>9}{'tokens/s':>12}{'items/s':>9}{'peak MiB':>10}"
             f"{'read p50 ms':>13}{'read p99 ms':>13}{'cand256 p50':>13}"]
    for kind, res in r["stores"].items():
        if "skipped" in res:
            lines.append(f"{kind:<8}skipped: {res['skipped']}")
            continue
        rd = res["read"]
        for n, (engine, m) in enumerate(res["materialize"].items()):
            tail = (f"{rd['sequences_p50_ms']:>13.2f}{rd['sequences_p99_ms']:>13.2f}{rd['candidates_p50_ms']:>13.2f}"
                    if n == 0 and rd["reads"] else "")
            lines.append(f"{kind:<8}{engine:<8}{m['wall_s']:>8.1f}{m['users_per_s']:>9.1f}{m['tokens_per_s']:>12,.0f}"
                         f"{m['items_per_s']:>9,.0f}{m['rss_peak_mib']:>10,.0f}{tail}")
    base = min((m["rss_base_mib"] for res in r["stores"].values() if "materialize" in res
                for m in res["materialize"].values()), default=0)
    lines.append(f"(peak MiB: RSS of the materialising process, ~{base:,.0f}"
                 " MiB of it imports before any work; reads: one user's three sequences)")
    return "\n".join(lines)


def write_bench_json(out: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return path
