"""NN-feature logging (paper §3.4.1): requests + sequences -> compact training rows.

One row per (request, candidate) holding its |S_all| tokens, labels and ids, so an
example costs O(|S_all|) bytes instead of O(L_LL). Requests are processed in batches,
de-duplicated exactly like serving does (each user's sequences once, candidates by
offsets) through the same :func:`transact.features.nn_features.build_s_all`, and streamed
to parquet row groups; the output file appears only when complete. :func:`write_nn_rows`
builds the rows of any set of requests from an :class:`EventStore` holding their users'
events: the whole world here, one user part on Ray (:mod:`transact.components.ray_engine`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from transact.data import schema as S
from transact.data.io import AtomicParquetWriter, read_table, table_path
from transact.data.requests import sorted_requests
from transact.data.world import check_world, read_world_json, train_end_of
from transact.features.config import FeatureConfig
from transact.features.nn_features import build_s_all, nn_rows_schema, s_all_to_arrow
from transact.features.sequences import EventStore

#: parquet schema metadata key of the rows' train/eval split (from the world's world.json)
TRAIN_END_META = b"train_end_ts"


def log_nn_features(world: str | Path, out: str | Path, cfg: FeatureConfig | None = None,
                    batch_requests: int = 256, progress: bool = True,
                    store: EventStore | None = None, num_threads: int = 1) -> dict:
    """Writes the NN-feature training rows of every request in ``world`` to ``out``.

    Args:
        world: folder with items/actions/impressions/requests parquet tables.
        out: destination parquet file (written atomically).
        cfg: feature contract; defaults to :class:`FeatureConfig`.
        batch_requests: requests per de-duplicated batch (bounds memory).
        num_threads: torch intra-op threads. One per worker: the work is one process's
            chunks of small GEMMs and numpy passes, where thread hand-offs cost more than
            they save (measured with the per-user loop: 1 thread ran ~10x faster than 2 on
            a loaded 2-core machine); a machine scales out by workers (docs/scale-out.md).
    Returns:
        A summary: rows, requests, seconds, bytes, path.
    """
    cfg = cfg or FeatureConfig()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _log(world, out, cfg, batch_requests, progress, store)
    finally:
        torch.set_num_threads(threads_before)


def _log(world, out, cfg: FeatureConfig, batch_requests: int, progress: bool, store: EventStore | None) -> dict:
    t_start = time.perf_counter()
    store = store or EventStore.from_dir(world, cfg)
    check_world(world, ("requests",))  # a sealed world, never a mix of two
    requests = read_table(table_path(world, "requests"), S.REQUESTS, what="requests")
    rows, n_req = write_nn_rows(store, requests, out, rows_schema(world, cfg), cfg, batch_requests, progress)
    summary = {
        "path": str(out),
        "rows": rows,
        "requests": n_req,
        "seconds": round(time.perf_counter() - t_start, 2),
        "bytes": Path(out).stat().st_size,
        "feature_config": cfg.to_dict(),
    }
    Path(out).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def rows_schema(world: str | Path, cfg: FeatureConfig) -> pa.Schema:
    """:func:`nn_rows_schema` plus the world's train/eval split in the metadata (readers of
    the rows need no world.json)."""
    schema = nn_rows_schema(cfg)
    train_end = train_end_of(read_world_json(world))
    if train_end is not None:
        schema = schema.with_metadata({**schema.metadata, TRAIN_END_META: str(train_end).encode()})
    return schema


def write_nn_rows(store: EventStore, requests: pa.Table, out: str | Path, schema: pa.Schema,
                  cfg: FeatureConfig, batch_requests: int = 256, progress: bool = False,
                  num_threads: int | None = None) -> tuple[int, int]:
    """The rows of ``requests`` (their users' events in ``store``) into the parquet file
    ``out``, written atomically, sorted by (ts, request_id, position, item_id); returns
    (rows, requests). Every engine builds its rows here: the whole world at once or one
    partition of its users (:mod:`transact.components.ray_engine`)."""
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        requests, starts = sorted_requests(requests)
        ends = np.append(starts[1:], requests.num_rows)
        users = requests.column("user_id").to_numpy()
        ts = requests.column("ts").to_numpy()
        items = requests.column("item_id").to_numpy()
        n_req = len(starts)
        # The EventStore cuts S_LL where build_s_all would (one search per request, not a
        # pass and a copy of every lifelong token); other stores (Feast's historical reads)
        # hand S_LL whole and build_s_all cuts it: the same rows.
        cut = {"ll_before_rt": True} if isinstance(store, EventStore) else {}
        with AtomicParquetWriter(out, schema) as writer, \
                tqdm(total=n_req, desc="log-nn", unit="req", disable=not progress) as bar:
            for b in range(0, n_req, batch_requests):
                s, e = starts[b : b + batch_requests], ends[b : b + batch_requests]
                row_lo, row_hi = int(s[0]), int(e[-1])
                ll, rt, imp = store.sequences(users[s], ts[s], **cut)
                cand_q = torch.from_numpy(store.item_emb_q_of(items[row_lo:row_hi]))  # [N, D]
                cand_off = torch.from_numpy(np.append(s - row_lo, row_hi - row_lo).astype(np.int64))
                with torch.no_grad():
                    s_all = build_s_all(ll, rt, imp, cand_q, cand_off, torch.from_numpy(ts[s]), cfg)
                writer.write(s_all_to_arrow(s_all, cand_q, requests.slice(row_lo, row_hi - row_lo), cfg))
                bar.update(len(s))
        return writer.rows, n_req
    finally:
        torch.set_num_threads(threads_before)


def rows_time_range(path: str | Path) -> tuple[int, int]:
    """(min ts, max ts) of a row file, read from its ``ts`` column only."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["ts"]).column("ts")
    return int(pc.min(t).as_py()), int(pc.max(t).as_py())
