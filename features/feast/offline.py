"""The offline writer: a world's events -> the repo's parquet offline sources
(``data/offline/*``, one part folder per view) and their manifest.

Time semantics
--------------
A row's ``event_timestamp`` is the first instant it is the user's state; it holds only
events strictly before it. Feast's point-in-time join is inclusive (row ts <= entity ts),
so querying at the request time t returns exactly the events before t -- the contract
of :class:`transact.features.sequences.EventStore`:

- ``user_lifelong``: snapshots at multiples of ``ll_refresh_ms`` (a day), one row per
  user and snapshot at which the sequence changed;
- ``user_realtime``: one row per user and distinct action time ``ts``, at ``ts + 1 ms``;
- ``user_impressions``: the *window* S_imp is cut from -- the last ``IMP_LOOKBACK x
  imp_cap`` impressions with their item ids and whether each was engaged before the
  row time -- one row per change, at event ``ts + 1 ms``. S_imp is derived on read (the
  first ``imp_cap`` not-engaged tokens), so a push of new actions updates it exactly.

All views have ``ttl = 0`` (no look-back limit): sequences have no age limit and rows
are only written when a sequence changes. Offline rows cover ``[since, until]``
(recorded in ``data/offline/manifest.json``): every user of the world gets a base row
at ``since`` in every view (possibly empty), so any join at t >= since finds a row in
each view -- Feast 0.67's file offline store otherwise drops an entity row from the whole
result when one view has rows for it but all after t. Reads before ``since`` are refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from transact.data import schema as S
from transact.data.io import read_table, table_path
from transact.features.config import FeatureConfig
from transact.features.feast.codec import Tokens, derive_imp, encode_rows, jagged_tokens, lengths_of
from transact.features.feast.store import (
    IMP_VIEW,
    INDEX_VIEWS,
    ITEM_VIEW,
    ITEMS_TS_MS,
    LL_VIEW,
    OFFLINE_DIRS,
    RT_VIEW,
    VIEW_FEATURES,
    view_schema,
)
from transact.features.sequences import IMP_LOOKBACK, EventStore


def _ts_array(ms: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(ms, dtype=np.int64) * 1000, pa.timestamp("us", tz="UTC"))


class PartWriter:
    """Writes a view's rows into ``<dir>/part-XXXXX.parquet`` files, each published by rename
    (readers ignore dot-files, so a half-written part is never read)."""

    def __init__(self, folder: Path, view: str, row_group_size: int, rows_per_file: int = 1 << 30):
        self.folder, self.view = folder, view
        self.schema = view_schema(view)
        self.row_group_size, self.rows_per_file = row_group_size, rows_per_file
        folder.mkdir(parents=True, exist_ok=True)
        self._n = len(list(folder.glob("part-*.parquet")))
        self._w: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self.rows = 0
        self.bytes = 0

    def _open(self) -> pq.ParquetWriter:
        self._tmp = self.folder / f".part-{self._n:05d}.parquet.tmp-{os.getpid()}"
        self._w = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._rows_in_file = 0
        return self._w

    def _publish(self):
        if self._w is None:
            return
        self._w.close()
        dst = self.folder / f"part-{self._n:05d}.parquet"
        os.replace(self._tmp, dst)
        self.bytes += dst.stat().st_size
        self._n += 1
        self._w = None

    def write(self, table: pa.Table) -> None:
        w = self._w if self._w is not None else self._open()
        w.write_table(table.cast(self.schema), row_group_size=self.row_group_size)
        self.rows += table.num_rows
        self._rows_in_file += table.num_rows
        if self._rows_in_file >= self.rows_per_file:
            self._publish()

    def close(self, ensure_one: bool = True) -> None:
        if self._w is None and ensure_one and self._n == 0:
            self._open()  # an empty part: Feast's file source needs a readable folder
        self._publish()

    def abort(self) -> None:
        if self._w is not None:
            self._w.close()
            Path(self._tmp).unlink(missing_ok=True)


def _user_rows(view: str, users: np.ndarray, ts_ms: np.ndarray, blobs: list[bytes],
               lens: np.ndarray | None = None) -> pa.Table:
    """Offline / push rows of a user view (``lens``: the length feature; default T of each blob)."""
    blob, length = VIEW_FEATURES[view]
    n_tokens = [lengths_of(b) for b in blobs] if lens is None else np.asarray(lens, np.int32)
    return pa.table([pa.array(users, pa.int64()), _ts_array(ts_ms), pa.array(blobs, pa.binary()),
                     pa.array(n_tokens, pa.int32())], schema=view_schema(view))


def write_user_rows(writers: dict, view: str, users, ts_ms, blobs: list[bytes], lens=None) -> None:
    """Writes rows of a sequence view and the matching rows of its index view."""
    users, ts_ms = np.asarray(users, np.int64), np.asarray(ts_ms, np.int64)
    writers[view].write(_user_rows(view, users, ts_ms, blobs, lens))
    iv = INDEX_VIEWS[view][0]
    writers[iv].write(pa.table([pa.array(users, pa.int64()), _ts_array(ts_ms), pa.array(ts_ms, pa.int64())],
                               schema=view_schema(iv)))


def _imp_windows(store: EventStore, users: np.ndarray, tau: np.ndarray, size: int) -> Tokens:
    """Last ``size`` impressions before each tau (newest first), with item ids and whether
    the user engaged before tau: the window S_imp is cut from, in EventStore's order."""
    seq, item_id, engaged = store.impression_window(users, tau, size)
    tok = jagged_tokens(seq)
    tok.item_id, tok.engaged = item_id, engaged.astype(np.uint8)
    return tok


@contextlib.contextmanager
def _caps(store: EventStore, **caps):
    old = store.cfg
    store.cfg = replace(old, **caps)
    try:
        yield store
    finally:
        store.cfg = old


def load_world(world: str | Path) -> dict[str, pa.Table]:
    from transact.data.world import check_world

    check_world(world, ("items", "actions", "impressions"))  # a sealed world, never a mix
    return {n: read_table(table_path(world, n), S.TABLES[n], what=n)
            for n in ("items", "actions", "impressions")}


def write_offline(world: str | Path, repo: str | Path, cfg: FeatureConfig | None = None,
                  since_ms: int | None = None, until_ms: int | None = None,
                  batch_users: int = 64, progress: bool = True) -> dict:
    """Writes a world's events into the repo's offline sources (``data/offline/*``).

    Args:
        world: folder with items / actions / impressions (simulated or imported).
        since_ms: first instant point-in-time reads must serve (default: the first
            request of the world, else its first event), floored to the LL refresh period.
        until_ms: events at or after it are left out (default: all events); later events
            arrive by :func:`transact.features.feast.push.push_events`.
        batch_users: users per block (bounds memory: block x L_LL tokens).
    Returns: a summary (rows and bytes per view), also written to ``data/offline/manifest.json``.
    """
    cfg = cfg or FeatureConfig()
    if cfg.ll_refresh_ms <= 0:
        raise ValueError("the Feast path needs a batch lifelong feature: ll_refresh_ms > 0")
    t_start = time.perf_counter()
    repo = Path(repo)
    tables = load_world(world)
    actions, impressions = tables["actions"], tables["impressions"]
    if until_ms is not None:
        actions = actions.filter(pa.array(actions.column("ts").to_numpy() < until_ms))
        impressions = impressions.filter(pa.array(impressions.column("ts").to_numpy() < until_ms))
    a_user, a_ts = actions.column("user_id").to_numpy(), actions.column("ts").to_numpy()
    i_user, i_ts = impressions.column("user_id").to_numpy(), impressions.column("ts").to_numpy()
    last = max([int(t.max()) + 1 for t in (a_ts, i_ts) if len(t)], default=0)
    until = int(until_ms) if until_ms is not None else last
    if since_ms is None:
        req = Path(table_path(world, "requests"))
        req_ts = pq.read_table(req, columns=["ts"]).column("ts").to_numpy() if req.exists() else np.zeros(0, np.int64)
        since_ms = (int(req_ts.min()) if len(req_ts) else
                    min([int(t.min()) for t in (a_ts, i_ts) if len(t)], default=0))
    r = cfg.ll_refresh_ms
    since = (int(since_ms) // r) * r
    if since > until:
        raise ValueError(f"since ({since}) is after until ({until})")

    store = EventStore(tables["items"], actions, impressions, cfg)
    win_size = IMP_LOOKBACK * cfg.imp_cap
    users = np.unique(np.concatenate([a_user, i_user]))

    off = repo / "data" / "offline"
    tmp = repo / "data" / f".offline.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {v: PartWriter(tmp / Path(OFFLINE_DIRS[v]).name, v, rg)
               for v, rg in ((ITEM_VIEW, 65_536), (LL_VIEW, 16), (RT_VIEW, 1024), (IMP_VIEW, 512),
                             *((iv, 65_536) for iv, _ in INDEX_VIEWS.values()))}
    try:
        it = tables["items"].sort_by("item_id")  # rows in key order, whatever the input's
        emb = it.column("emb_q").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, S.EMB_DIM)
        writers[ITEM_VIEW].write(pa.table(
            [it.column("item_id"), _ts_array(np.full(it.num_rows, ITEMS_TS_MS)),
             pa.array([row.tobytes() for row in emb], pa.binary())], schema=view_schema(ITEM_VIEW)))

        # sort keys for per-block slicing
        ao = np.lexsort((a_ts, a_user))
        a_user_s, a_ts_s = a_user[ao], a_ts[ao]
        io = np.lexsort((i_ts, i_user))
        i_user_s, i_ts_s = i_user[io], i_ts[io]
        days = np.arange(since // r, until // r + 1, dtype=np.int64) * r  # snapshot instants
        bar = tqdm(total=len(users), desc="features: offline rows", unit="user", disable=not progress)
        for b in range(0, len(users), batch_users):
            block = users[b: b + batch_users]
            a_lo, a_hi = np.searchsorted(a_user_s, block[0]), np.searchsorted(a_user_s, block[-1], "right")
            i_lo, i_hi = np.searchsorted(i_user_s, block[0]), np.searchsorted(i_user_s, block[-1], "right")
            bu_a, bt_a = a_user_s[a_lo:a_hi], a_ts_s[a_lo:a_hi]
            bu_i, bt_i = i_user_s[i_lo:i_hi], i_ts_s[i_lo:i_hi]

            # lifelong: base row at the first snapshot, then each snapshot after a day with actions
            q_u, q_t = _ll_queries(block, bu_a, bt_a, days, r)
            with _caps(store, rt_cap=0, r=0, imp_cap=0):
                for s in range(0, len(q_u), 64):
                    ll, _, _ = store.sequences(q_u[s:s + 64], q_t[s:s + 64])
                    write_user_rows(writers, LL_VIEW, q_u[s:s + 64], q_t[s:s + 64],
                                     encode_rows(jagged_tokens(ll)))
            # realtime: base row at `since`, then at each action time + 1 ms
            q_u, q_t = _change_queries(block, [(bu_a, bt_a)], since)
            with _caps(store, ll_cap=0, imp_cap=0):
                for s in range(0, len(q_u), 4096):
                    _, rt, _ = store.sequences(q_u[s:s + 4096], q_t[s:s + 4096])
                    write_user_rows(writers, RT_VIEW, q_u[s:s + 4096], q_t[s:s + 4096],
                                     encode_rows(jagged_tokens(rt)))
            # impressions: base row at `since`, then at each impression or action time + 1 ms
            # that changed the window
            q_u, q_t = _change_queries(block, [(bu_a, bt_a), (bu_i, bt_i)], since)
            prev_u, prev_b = None, None
            for s in range(0, len(q_u), 1024):
                u, t = q_u[s:s + 1024], q_t[s:s + 1024]
                win = _imp_windows(store, u, t, win_size)
                lens = np.diff(derive_imp(win, cfg.imp_cap).offsets)
                blobs = encode_rows(win)
                keep = np.ones(len(u), bool)
                for k in range(len(u)):  # drop rows equal to the user's previous row
                    if u[k] == prev_u and blobs[k] == prev_b:
                        keep[k] = False
                    prev_u, prev_b = u[k], blobs[k]
                write_user_rows(writers, IMP_VIEW, u[keep], t[keep],
                                 [x for x, kk in zip(blobs, keep) if kk], lens[keep])
            bar.update(len(block))
        bar.close()
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {
        "world": str(world), "since_ms": since, "until_ms": until, "users": int(len(users)),
        "feature_config": cfg.to_dict(), "imp_window": win_size,
        "views": {v: {"rows": w.rows, "bytes": w.bytes} for v, w in writers.items()},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    (tmp / "manifest.json").write_text(json.dumps(summary, indent=2))
    old = repo / "data" / f".offline.old-{os.getpid()}"
    if off.exists():
        os.replace(off, old)
    os.replace(tmp, off)
    shutil.rmtree(old, ignore_errors=True)
    return summary


def _ll_queries(block, bu_a, bt_a, days, r):
    """(user, snapshot instant) pairs: every user at the first snapshot (its base row), then
    each snapshot at which the user's lifelong sequence changed."""
    qu, qt = [], []
    if len(days) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    for u in block:
        lo, hi = np.searchsorted(bu_a, u), np.searchsorted(bu_a, u, "right")
        t = bt_a[lo:hi]
        first = days[0]
        snaps = [first]
        # snapshot D changes when an action fell in [D - r, D)
        act_days = np.unique(t // r) * r + r
        snaps.extend(act_days[(act_days > first) & (act_days <= days[-1])].tolist())
        qu += [u] * len(snaps)
        qt += snaps
    return np.asarray(qu, np.int64), np.asarray(qt, np.int64)


def _change_queries(block, streams, since):
    """(user, instant) pairs: ``since`` for every user (its base row), then every distinct
    event time + 1 ms at or after ``since``."""
    qu, qt = [], []
    for u in block:
        times = []
        for bu, bt in streams:
            lo, hi = np.searchsorted(bu, u), np.searchsorted(bu, u, "right")
            t = bt[lo:hi]
            times.append(t[t >= since] + 1)
        t = np.unique(np.concatenate(times)) if times else np.zeros(0, np.int64)
        t = np.concatenate([[since], t[t != since]])
        qu += [u] * len(t)
        qt += t.tolist()
    return np.asarray(qu, np.int64), np.asarray(qt, np.int64)
