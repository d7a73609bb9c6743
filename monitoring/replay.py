"""Served logs without HTTP: replay a world's requests through the serving Ranker.

:func:`serve_world` ranks the requests of a world folder (optionally a time range and a
deterministic sample of them) with :class:`transact.serving.ranker.Ranker` -- the same
code path as the ``/rank`` service, sequences cut point-in-time from the world's events
-- and writes what the service writes: a served-log folder
(:mod:`transact.serving.served_log`). With a drifted world (``simulate(..., drift=...)``)
this is "serving under drift"; with the same world without drift it is the stationary
control (both worlds are identical before the drift start).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from transact.data.io import read_table, table_path


def sample_requests(request_ids: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """bool mask: a deterministic ``fraction`` of the requests (all rows of a request together)."""
    if fraction >= 1.0:
        return np.ones(len(request_ids), dtype=bool)
    uniq, inv = np.unique(request_ids, return_inverse=True)
    u = np.random.default_rng([int(seed), 0x5E4D]).random(len(uniq))
    return (u < fraction)[inv.reshape(-1)]


def select_requests(world: str | Path, start_ts: int | None = None, end_ts: int | None = None,
                    fraction: float = 1.0, sample_seed: int = 0):
    """The world's request rows with ts in [start_ts, end_ts), sampled by :func:`sample_requests`."""
    import pyarrow as pa

    from transact.data import schema as S

    req = read_table(table_path(world, "requests"), S.REQUESTS, what="requests")
    ts = req.column("ts").to_numpy()
    keep = np.ones(len(ts), dtype=bool)
    if start_ts is not None:
        keep &= ts >= start_ts
    if end_ts is not None:
        keep &= ts < end_ts
    keep &= sample_requests(req.column("request_id").to_numpy(), fraction, sample_seed)
    return req.filter(pa.array(keep))


def serve_world(world: str | Path, model_dir: str | Path, out_dir: str | Path, *,
                start_ts: int | None = None, end_ts: int | None = None, fraction: float = 1.0,
                sample_seed: int = 0, batch_requests: int = 64, model_version: str | None = None,
                num_threads: int | None = 1) -> dict:
    """Ranks the world's requests with ts in [start_ts, end_ts) and logs them to ``out_dir``.

    Returns {"rows", "requests", "seconds", "out_dir", "model_version"}.
    """
    import torch

    from transact.features.sequences import EventStore
    from transact.model.checkpoint import load_model
    from transact.serving.ranker import Ranker, RankQuery
    from transact.serving.served_log import ServedLogWriter

    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        model = load_model(model_dir, "cpu")
        if model_version is None:
            from transact.model.checkpoint import model_digest

            model_version = model_digest(model_dir)[:16]
        req = select_requests(world, start_ts, end_ts, fraction, sample_seed)
        req = req.sort_by([("ts", "ascending"), ("request_id", "ascending"), ("position", "ascending")])
        rid = req.column("request_id").to_numpy()
        starts = np.flatnonzero(np.concatenate([[True], rid[1:] != rid[:-1]])) if len(rid) else np.zeros(0, int)
        ends = np.append(starts[1:], len(rid))
        users, rts = req.column("user_id").to_numpy(), req.column("ts").to_numpy()
        items, surf = req.column("item_id").to_numpy(), req.column("surface").to_numpy()
        store = EventStore.from_dir(world, model.fcfg)
        writer = ServedLogWriter(out_dir, model.fcfg, tuple(model.cfg.heads), max_queue_rows=1 << 30,
                                 flush_rows=1 << 20, flush_s=3600.0)
        ranker = Ranker(model, store, "cpu", model_version=model_version, log_writer=writer, cpu_forward="eager")
        try:
            queries = [RankQuery(user_id=int(users[s]), item_ids=items[s:e].astype(np.int64), item_emb_q=None,
                                 surface=int(surf[s]), ts=int(rts[s]), request_id=int(rid[s]),
                                 weights=ranker.weights)
                       for s, e in zip(starts, ends)]
            for b in range(0, len(queries), batch_requests):
                results, _ = ranker.rank(queries[b:b + batch_requests])
                bad = [r for r in results if isinstance(r, Exception)]
                if bad:
                    raise ValueError(f"replay: {len(bad)} requests failed, e.g. {bad[0]}")
            writer.flush()
        finally:
            writer.close()
        if writer.dropped_rows:
            raise RuntimeError(f"replay: the served log dropped {writer.dropped_rows} rows")
    finally:
        torch.set_num_threads(threads_before)
    return {"rows": int(len(rid)), "requests": int(len(starts)), "seconds": round(time.perf_counter() - t0, 2),
            "out_dir": str(out_dir), "model_version": model_version}


def log_rows(world: str | Path, out: str | Path, *, start_ts: int | None = None, end_ts: int | None = None,
             fraction: float = 1.0, sample_seed: int = 0) -> dict:
    """NN-feature training rows (:func:`transact.features.nn_logging.log_nn_features`) of the
    world's requests with ts in [start_ts, end_ts), optionally a deterministic sample of them.

    The selected requests go into a side folder ``<out>.world/`` beside ``out`` that links the
    world's item and event tables, so the offline logging step runs unchanged.
    """
    import os
    import shutil

    import pyarrow.parquet as pq

    from transact.features.nn_logging import log_nn_features

    world, out = Path(world), Path(out)
    side = out.parent / f"{out.stem}.world"
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir(parents=True)
    for name in ("items", "actions", "impressions"):
        src = table_path(world, name).resolve()
        try:
            os.symlink(src, table_path(side, name))
        except OSError:  # no symlinks here: copy
            shutil.copy2(src, table_path(side, name))
    pq.write_table(select_requests(world, start_ts, end_ts, fraction, sample_seed), table_path(side, "requests"))
    if (world / "world.json").exists():
        shutil.copy2(world / "world.json", side / "world.json")
    from transact.data.world import check_world, seal_world

    check_world(world)  # the source is a sealed world; its side view is sealed in turn
    seal_world(side)
    return log_nn_features(side, out, progress=False)
