"""Materialisation: each view's latest offline row per entity -> the online store
(SQLite or Redis), streamed ("direct") or through ``FeatureStore.materialize`` ("feast")."""
from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from transact.features.feast.codec import lengths_of
from transact.features.feast.store import (
    EPOCH,
    IMP_VIEW,
    ITEM_FEATURE,
    ITEM_KEY,
    ITEM_VIEW,
    ITEMS_TS_MS,
    LL_VIEW,
    OFFLINE_DIRS,
    RT_VIEW,
    TS_COL,
    USER_KEY,
    VIEW_FEATURES,
    as_store,
    read_manifest,
)


def _dt(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=int(ms))


def _provider(store):
    # FeatureStore has no public accessor for its provider; Feast's own CLI paths use this one.
    return store._get_provider()


def _entity_key(key: str, value: int):
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return EntityKey(join_keys=[key], entity_values=[Value(int64_val=int(value))])


def _latest_rows(files: list[Path], key: str, start_us: int, end_us: int):
    """Per key, the (file, row) of its latest row with start <= ts <= end (ties: last written)."""
    keys, tss, fids, rows = [], [], [], []
    for f_id, f in enumerate(files):
        t = pq.read_table(f, columns=[key, TS_COL])
        k = t.column(key).to_numpy()
        ts = t.column(TS_COL).cast(pa.int64()).to_numpy()
        keys.append(k)
        tss.append(ts)
        fids.append(np.full(len(k), f_id))
        rows.append(np.arange(len(k)))
    if not keys:
        return {}
    k, ts, fid, row = (np.concatenate(x) for x in (keys, tss, fids, rows))
    m = (ts >= start_us) & (ts <= end_us)
    k, ts, fid, row = k[m], ts[m], fid[m], row[m]
    o = np.lexsort((row, fid, ts, k))
    last = np.ones(len(o), bool)
    last[:-1] = k[o][1:] != k[o][:-1]
    o = o[last]
    by_file: dict[int, np.ndarray] = {}
    for f_id in np.unique(fid[o]):
        by_file[int(f_id)] = np.sort(row[o][fid[o] == f_id])
    return by_file


def materialize(store_or_repo, end_ms: int | None = None, start_ms: int | None = None,
                views: Sequence[str] | None = None, engine: str = "direct",
                batch_rows: int = 2048, batch_bytes: int = 32 << 20, progress: bool = True) -> dict:
    """Loads each view's latest offline row per entity (``start <= ts <= end``) into the
    online store.

    engine "feast": ``FeatureStore.materialize`` -- reads the whole source into one
    DataFrame and converts every row to protos at once (memory ~ source size).
    engine "direct" (default): the same rows, streamed -- a first pass reads only keys and
    timestamps to pick each entity's latest row, a second reads just the row groups holding
    them and writes ``batch_rows`` entities (at most ``batch_bytes``) per
    ``online_write_batch`` call of the configured online store; memory is bounded by one
    row group plus one batch. The materialised interval is recorded in the registry as
    ``feast materialize`` does.
    """
    from feast.protos.feast.types.Value_pb2 import Value

    store = as_store(store_or_repo)
    repo = Path(store.repo_path)
    manifest = read_manifest(repo)
    end_ms = int(manifest["until_ms"] if end_ms is None else end_ms)
    start_ms = int(ITEMS_TS_MS if start_ms is None else start_ms)
    views = list(views or (ITEM_VIEW, LL_VIEW, RT_VIEW, IMP_VIEW))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"engine": engine, "end_ms": end_ms, "views": {}}
    if engine == "feast":
        for view in views:  # one view per call, to time each
            tv = time.perf_counter()
            store.materialize(_dt(start_ms), _dt(end_ms), feature_views=[view])
            out["views"][view] = {"seconds": round(time.perf_counter() - tv, 3)}
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out
    if engine != "direct":
        raise ValueError(f"engine must be 'direct' or 'feast', got {engine!r}")
    provider = _provider(store)
    for view in views:
        tv = time.perf_counter()
        fv = store.get_feature_view(view)
        key = ITEM_KEY if view == ITEM_VIEW else USER_KEY
        names = [ITEM_FEATURE] if view == ITEM_VIEW else list(VIEW_FEATURES[view])
        files = sorted((repo / OFFLINE_DIRS[view]).glob("part-*.parquet"))
        picked = _latest_rows(files, key, start_ms * 1000, end_ms * 1000)
        total = sum(len(v) for v in picked.values())
        n_rows = n_tokens = n_bytes = 0
        bar = tqdm(total=total, desc=f"materialize {view}", unit="row", disable=not progress)
        batch: list[tuple] = []
        size = 0

        def flush():
            nonlocal batch, size
            if batch:
                provider.online_write_batch(store.config, fv, batch, None)
                bar.update(len(batch))
            batch, size = [], 0

        for f_id, rows in picked.items():
            pf = pq.ParquetFile(files[f_id])
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            for rg in range(pf.num_row_groups):
                sel = rows[(rows >= starts[rg]) & (rows < starts[rg + 1])] - starts[rg]
                if not len(sel):
                    continue
                t = pf.read_row_group(rg).take(pa.array(sel))
                ks = t.column(key).to_numpy()
                ts = t.column(TS_COL).cast(pa.int64()).to_numpy()
                cols = [t.column(n).to_pylist() for n in names]
                for i in range(t.num_rows):
                    vals = {}
                    for n, c in zip(names, cols):
                        v = c[i]
                        vals[n] = Value(bytes_val=v) if isinstance(v, bytes) else Value(int32_val=int(v))
                    blob = cols[0][i]
                    n_bytes += len(blob)
                    n_tokens += lengths_of(blob) if view != ITEM_VIEW else 0
                    batch.append((_entity_key(key, ks[i]), vals,
                                  EPOCH + timedelta(microseconds=int(ts[i])), None))
                    size += len(blob)
                    if len(batch) >= batch_rows or size >= batch_bytes:
                        flush()
                n_rows += t.num_rows
        flush()
        bar.close()
        store.registry.apply_materialization(fv, store.project, _dt(start_ms), _dt(end_ms), commit=True)
        out["views"][view] = {"entities": n_rows, "tokens": n_tokens, "bytes": n_bytes,
                              "seconds": round(time.perf_counter() - tv, 3)}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
