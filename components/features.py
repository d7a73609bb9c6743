"""Feast feature store integration: offline sources, apply, materialise, push, online and
point-in-time reads of the three user sequences (DESIGN.md §2, §3, §8).

The Feast definitions live in ``feature_repo/definitions.py`` (entities user and item,
feature views ``user_lifelong`` (batch), ``user_realtime`` and ``user_impressions``
(push sources), ``item_embedding``, feature services ``ranking_v2`` and
``ranking_v2_items``). This module is the step logic around them.

Token blobs
-----------
A sequence is one Feast ``Bytes`` value (measured: ~4x smaller than Feast int arrays,
and one proto conversion per user instead of ~35 per token)::

    offset 0  b"TQ", version u8 (=1), flags u8 (bit0 item_id, bit1 engaged), T u32 LE
    8         ts int64[T] | item_id int64[T] (flag) | emb_q int8[T*32] | action u8[T]
              | surface i8[T] | engaged u8[T] (flag)

newest token first, all little-endian; 42 bytes per token (+9 with both flags). An empty
sequence is the 8-byte header, never an empty value (Feast mishandles empty arrays/None).

Time semantics
--------------
A row's ``event_timestamp`` is the first instant it is the user's state; it holds only
events strictly before it. Feast's point-in-time join is inclusive (row ts <= entity ts),
so querying at the request time t returns exactly the events before t -- the contract
of :class:`transact.model.sequences.EventStore`:

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
import importlib.util
import json
import math
import os
import shutil
import struct
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from transact.data import schema as S
from transact.data.io import SchemaError, read_table, table_path
from transact.model.config import FeatureConfig
from transact.model.event_order import (ACTION_TIES, IMPRESSION_TIES, dense_rank, event_order,
                                        group_offsets, search_in_groups)
from transact.model.nn_features import JaggedSequences
from transact.model.sequences import IMP_LOOKBACK, EventStore

# --- names shared with feature_repo/definitions.py (a test checks them against the registry)

LL_VIEW, RT_VIEW, IMP_VIEW, ITEM_VIEW = "user_lifelong", "user_realtime", "user_impressions", "item_embedding"
RT_PUSH, IMP_PUSH = "user_realtime_push", "user_impressions_push"
SERVICE, ITEM_SERVICE, TRAIN_SERVICE = "ranking_v2", "ranking_v2_items", "training_v2"
USER_KEY, ITEM_KEY, TS_COL = "user_id", "item_id", "event_timestamp"
#: view -> (blob feature, length feature)
VIEW_FEATURES: dict[str, tuple[str, str]] = {
    LL_VIEW: ("ll_tokens", "ll_len"),
    RT_VIEW: ("rt_tokens", "rt_len"),
    IMP_VIEW: ("imp_window", "imp_len"),
}
ITEM_FEATURE = "emb_q"
#: sequence view -> (its training-only index view, the index's "row time" feature)
INDEX_VIEWS: dict[str, tuple[str, str]] = {
    LL_VIEW: ("user_lifelong_index", "ll_asof_ms"),
    RT_VIEW: ("user_realtime_index", "rt_asof_ms"),
    IMP_VIEW: ("user_impressions_index", "imp_asof_ms"),
}
#: offline source folder (relative to the repo) of each view
OFFLINE_DIRS: dict[str, str] = {ITEM_VIEW: "data/offline/items", LL_VIEW: "data/offline/user_lifelong",
                                RT_VIEW: "data/offline/user_realtime",
                                IMP_VIEW: "data/offline/user_impressions",
                                **{iv: f"data/offline/{iv}" for iv, _ in INDEX_VIEWS.values()}}
MANIFEST = "data/offline/manifest.json"
REPO_TEMPLATE = Path(__file__).resolve().parents[1] / "feature_repo"
REDIS_ENV = "TRANSACT_REDIS"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ITEMS_TS_MS = 0  # items are static: one row each at the epoch

# --- token blobs -------------------------------------------------------------------------

MAGIC = b"TQ"
VERSION = 1
F_ITEM, F_ENGAGED = 1, 2
_HEADER = struct.Struct("<2sBBI")
HEADER_BYTES = _HEADER.size  # 8
TOKEN_BYTES = 8 + S.EMB_DIM + 1 + 1  # 42


@dataclass
class Tokens:
    """Decoded tokens of one or many sequences (newest first within each), numpy arrays.

    ts int64 [T], emb_q int8 [T, D], action uint8 [T], surface int8 [T], offsets int64 [U+1];
    item_id int64 [T] and engaged uint8 [T] where the blobs carry them.
    """

    ts: np.ndarray
    emb_q: np.ndarray
    action: np.ndarray
    surface: np.ndarray
    offsets: np.ndarray
    item_id: np.ndarray | None = None
    engaged: np.ndarray | None = None

    def to_jagged(self) -> JaggedSequences:
        return JaggedSequences(emb_q=torch.from_numpy(np.ascontiguousarray(self.emb_q)),
                               action=torch.from_numpy(np.ascontiguousarray(self.action)),
                               surface=torch.from_numpy(np.ascontiguousarray(self.surface)),
                               ts=torch.from_numpy(np.ascontiguousarray(self.ts)),
                               offsets=torch.from_numpy(self.offsets.astype(np.int64)))


def encode_tokens(ts, emb_q, action, surface, item_id=None, engaged=None) -> bytes:
    """One sequence (newest first) -> token blob."""
    ts = np.asarray(ts, dtype="<i8")
    T = len(ts)
    flags = (F_ITEM if item_id is not None else 0) | (F_ENGAGED if engaged is not None else 0)
    parts = [_HEADER.pack(MAGIC, VERSION, flags, T), ts.tobytes()]
    if item_id is not None:
        parts.append(np.asarray(item_id, dtype="<i8").tobytes())
    parts += [np.asarray(emb_q, dtype=np.int8).reshape(T, S.EMB_DIM).tobytes(),
              np.asarray(action, dtype=np.uint8).tobytes(), np.asarray(surface, dtype=np.int8).tobytes()]
    if engaged is not None:
        parts.append(np.asarray(engaged, dtype=np.uint8).tobytes())
    return b"".join(parts)


def _split_blob(blob: bytes) -> dict[str, np.ndarray]:
    magic, version, flags, T = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a version-{VERSION} token blob (header {bytes(blob[:4])!r})")
    per = TOKEN_BYTES + (8 if flags & F_ITEM else 0) + (1 if flags & F_ENGAGED else 0)
    if len(blob) != HEADER_BYTES + per * T:
        raise ValueError(f"token blob of {len(blob)} bytes does not hold {T} tokens")
    out, o = {}, HEADER_BYTES

    def take(name, dtype, n, shape=None):
        nonlocal o
        a = np.frombuffer(blob, dtype=dtype, count=n, offset=o)
        o += a.nbytes
        out[name] = a.reshape(shape) if shape else a

    take("ts", "<i8", T)
    if flags & F_ITEM:
        take("item_id", "<i8", T)
    take("emb_q", np.int8, T * S.EMB_DIM, (T, S.EMB_DIM))
    take("action", np.uint8, T)
    take("surface", np.int8, T)
    if flags & F_ENGAGED:
        take("engaged", np.uint8, T)
    return out


def decode_tokens(blobs: Sequence[bytes | None], cap: int | None = None) -> Tokens:
    """Token blobs (None = no row: an empty sequence) -> concatenated :class:`Tokens`,
    keeping at most the ``cap`` newest tokens of each."""
    parts = [_split_blob(b) if b is not None else None for b in blobs]
    lens = np.array([0 if p is None else len(p["ts"]) for p in parts], dtype=np.int64)
    if cap is not None:
        lens = np.minimum(lens, cap)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    fields = {"ts": (np.int64, ()), "emb_q": (np.int8, (S.EMB_DIM,)), "action": (np.uint8, ()),
              "surface": (np.int8, ()), "item_id": (np.int64, ()), "engaged": (np.uint8, ())}
    got = {k for p in parts if p is not None for k in p}
    cols = {}
    for name, (dtype, shape) in fields.items():
        if name not in got and name in ("item_id", "engaged"):
            cols[name] = None
            continue
        chunks = []
        for p, n in zip(parts, lens):
            if n:
                if name not in p:
                    raise ValueError(f"token blobs mix layouts: some lack {name}")
                chunks.append(p[name][:n])
        cols[name] = (np.concatenate(chunks) if chunks else np.zeros((0, *shape), dtype=dtype))
    return Tokens(offsets=offsets, **cols)


def _encode_rows(tok: Tokens) -> list[bytes]:
    """Every row of a jagged :class:`Tokens` -> one blob each."""
    o = tok.offsets
    out = []
    for i in range(len(o) - 1):
        s = slice(int(o[i]), int(o[i + 1]))
        out.append(encode_tokens(tok.ts[s], tok.emb_q[s], tok.action[s], tok.surface[s],
                                 None if tok.item_id is None else tok.item_id[s],
                                 None if tok.engaged is None else tok.engaged[s]))
    return out


def derive_imp(window: Tokens, imp_cap: int) -> Tokens:
    """S_imp from impression windows: per user, the first ``imp_cap`` not-engaged tokens
    among the newest ``IMP_LOOKBACK * imp_cap`` of the window (EventStore's rule)."""
    n = len(window.offsets) - 1
    lens = np.diff(window.offsets)
    pos = np.arange(len(window.ts)) - np.repeat(window.offsets[:-1], lens)
    user = np.repeat(np.arange(n), lens)
    free = (window.engaged == 0) & (pos < IMP_LOOKBACK * imp_cap)
    rank = np.cumsum(free) - 1
    first = np.concatenate([[0], np.cumsum(free)])[window.offsets[:-1]]
    keep = free & ((rank - np.repeat(first, lens)) < imp_cap)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(user[keep], minlength=n), out=offsets[1:])
    return Tokens(ts=window.ts[keep], emb_q=window.emb_q[keep], action=window.action[keep],
                  surface=window.surface[keep], offsets=offsets)


def _lengths_of(blob: bytes | None) -> int:
    return 0 if blob is None else _HEADER.unpack_from(blob, 0)[3]


# --- repository -----------------------------------------------------------------------------

def init_repo(dest: str | Path, online: str = "sqlite", redis: str | None = None,
              template: str | Path | None = None) -> Path:
    """Creates a Feast repo at ``dest`` from the project's ``feature_repo`` definitions.

    ``online``: "sqlite" (embedded default) or "redis" (``redis``: "host:port[,opts]"; if
    None the yaml reads ``${TRANSACT_REDIS}`` at load time). Existing data under
    ``dest/data`` is kept.
    """
    template = Path(template or REPO_TEMPLATE)
    if not (template / "definitions.py").exists():
        raise FileNotFoundError(f"Feast definitions not found in {template} (run from a checkout of "
                                f"the project or pass template=)")
    dest = Path(dest)
    (dest / "data").mkdir(parents=True, exist_ok=True)
    for f in template.glob("*.py"):
        shutil.copy2(f, dest / f.name)
    shutil.copy2(template / "feature_store.yaml", dest / "feature_store.yaml")
    shutil.copy2(template / "feature_store.redis.yaml", dest / "feature_store.redis.yaml")
    if online == "redis":
        text = (template / "feature_store.redis.yaml").read_text()
        if redis:
            text = text.replace("${" + REDIS_ENV + "}", redis)
        (dest / "feature_store.yaml").write_text(text)
    elif online != "sqlite":
        raise ValueError(f"online store must be 'sqlite' or 'redis', got {online!r}")
    return dest


def open_store(repo: str | Path, yaml_file: str | Path | None = None):
    """``feast.FeatureStore`` of a repo (``yaml_file`` e.g. ``feature_store.redis.yaml``)."""
    from feast import FeatureStore

    repo = Path(repo).resolve()
    if not (repo / "feature_store.yaml").exists() and yaml_file is None:
        raise FileNotFoundError(f"{repo} is not a Feast repo (no feature_store.yaml)")
    kw = {"fs_yaml_file": (repo / yaml_file) if yaml_file else None}
    return FeatureStore(repo_path=str(repo), **{k: v for k, v in kw.items() if v is not None})


def _as_store(store_or_repo):
    return open_store(store_or_repo) if isinstance(store_or_repo, (str, Path)) else store_or_repo


def load_definitions(repo: str | Path) -> list:
    """The Feast objects defined in the repo's modules (what ``feast apply`` collects)."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    objs: list = []
    for path in sorted(Path(repo).glob("*.py")):
        name = f"_transact_feast_repo_{abs(hash(str(path.resolve())))}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, (Entity, FeatureView, FeatureService, DataSource)) and \
                    not any(value is o for o in objs):
                objs.append(value)
    return objs


def apply(store_or_repo) -> dict:
    """``feast apply``: registers the definitions and creates the online tables."""
    store = _as_store(store_or_repo)
    objs = load_definitions(store.repo_path)
    store.apply(objs)
    store.refresh_registry()
    return {"applied": sorted(f"{type(o).__name__}:{o.name}" for o in objs),
            "online_store": store.config.online_store.type}


# --- offline sources ---------------------------------------------------------------------

def _ts_array(ms: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(ms, dtype=np.int64) * 1000, pa.timestamp("us", tz="UTC"))


def view_schema(view: str) -> pa.Schema:
    """Parquet schema of a view's offline source (and of its push DataFrames)."""
    if view == ITEM_VIEW:
        return pa.schema([(ITEM_KEY, pa.int64()), (TS_COL, pa.timestamp("us", tz="UTC")),
                          (ITEM_FEATURE, pa.binary())])
    for iv, feat in INDEX_VIEWS.values():
        if view == iv:
            return pa.schema([(USER_KEY, pa.int64()), (TS_COL, pa.timestamp("us", tz="UTC")),
                              (feat, pa.int64())])
    blob, length = VIEW_FEATURES[view]
    return pa.schema([(USER_KEY, pa.int64()), (TS_COL, pa.timestamp("us", tz="UTC")),
                      (blob, pa.binary()), (length, pa.int32())])


class _PartWriter:
    """Writes a view's rows into ``<dir>/part-XXXXX.parquet`` files, each published by rename
    (readers ignore dot-files, so a half-written part is never read)."""

    def __init__(self, folder: Path, view: str, row_group_size: int, rows_per_file: int = 1 << 30):
        self.folder, self.view = folder, view
        self.schema = view_schema(view)
        self.row_group_size, self.rows_per_file = row_group_size, rows_per_file
        folder.mkdir(parents=True, exist_ok=True)
        self._n = len(list(folder.glob("part-*.parquet")))
        self._w = None
        self._rows_in_file = 0
        self.rows = 0
        self.bytes = 0

    def _open(self):
        self._tmp = self.folder / f".part-{self._n:05d}.parquet.tmp-{os.getpid()}"
        self._w = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._rows_in_file = 0

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
        if self._w is None:
            self._open()
        self._w.write_table(table.cast(self.schema), row_group_size=self.row_group_size)
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
    lens = [_lengths_of(b) for b in blobs] if lens is None else np.asarray(lens, np.int32)
    return pa.table([pa.array(users, pa.int64()), _ts_array(ts_ms), pa.array(blobs, pa.binary()),
                     pa.array(lens, pa.int32())], schema=view_schema(view))


def _write_user_rows(writers: dict, view: str, users, ts_ms, blobs: list[bytes], lens=None) -> None:
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
    tok = _jagged_tokens(seq)
    tok.item_id, tok.engaged = item_id, engaged.astype(np.uint8)
    return tok


def _jagged_tokens(seq: JaggedSequences) -> Tokens:
    return Tokens(ts=seq.ts.numpy(), emb_q=seq.emb_q.numpy(), action=seq.action.numpy(),
                  surface=seq.surface.numpy(), offsets=seq.offsets.numpy())


@contextlib.contextmanager
def _caps(store: EventStore, **caps):
    old = store.cfg
    store.cfg = replace(old, **caps)
    try:
        yield store
    finally:
        store.cfg = old


def _load_world(world: str | Path) -> dict[str, pa.Table]:
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
            arrive by :func:`push_events`.
        batch_users: users per block (bounds memory: block x L_LL tokens).
    Returns: a summary (rows and bytes per view), also written to ``data/offline/manifest.json``.
    """
    cfg = cfg or FeatureConfig()
    if cfg.ll_refresh_ms <= 0:
        raise ValueError("the Feast path needs a batch lifelong feature: ll_refresh_ms > 0")
    t_start = time.perf_counter()
    repo = Path(repo)
    tables = _load_world(world)
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
        req_ts = pq.read_table(req, columns=["ts"]).column("ts").to_numpy() if req.exists() else []
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
    writers = {v: _PartWriter(tmp / Path(OFFLINE_DIRS[v]).name, v, rg)
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
                    _write_user_rows(writers, LL_VIEW, q_u[s:s + 64], q_t[s:s + 64],
                                     _encode_rows(_jagged_tokens(ll)))
            # realtime: base row at `since`, then at each action time + 1 ms
            q_u, q_t = _change_queries(block, [(bu_a, bt_a)], since)
            with _caps(store, ll_cap=0, imp_cap=0):
                for s in range(0, len(q_u), 4096):
                    _, rt, _ = store.sequences(q_u[s:s + 4096], q_t[s:s + 4096])
                    _write_user_rows(writers, RT_VIEW, q_u[s:s + 4096], q_t[s:s + 4096],
                                     _encode_rows(_jagged_tokens(rt)))
            # impressions: base row at `since`, then at each impression or action time + 1 ms
            # that changed the window
            q_u, q_t = _change_queries(block, [(bu_a, bt_a), (bu_i, bt_i)], since)
            prev_u, prev_b = None, None
            for s in range(0, len(q_u), 1024):
                u, t = q_u[s:s + 1024], q_t[s:s + 1024]
                win = _imp_windows(store, u, t, win_size)
                lens = np.diff(derive_imp(win, cfg.imp_cap).offsets)
                blobs = _encode_rows(win)
                keep = np.ones(len(u), bool)
                for k in range(len(u)):  # drop rows equal to the user's previous row
                    if u[k] == prev_u and blobs[k] == prev_b:
                        keep[k] = False
                    prev_u, prev_b = u[k], blobs[k]
                _write_user_rows(writers, IMP_VIEW, u[keep], t[keep],
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


def read_manifest(repo: str | Path) -> dict:
    p = Path(repo) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: run `transact features apply --world ...` first")
    return json.loads(p.read_text())


# --- materialisation ---------------------------------------------------------------------

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
        keys.append(k), tss.append(ts), fids.append(np.full(len(k), f_id)), rows.append(np.arange(len(k)))
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

    store = _as_store(store_or_repo)
    repo = Path(store.repo_path)
    manifest = read_manifest(repo)
    end_ms = int(manifest["until_ms"] if end_ms is None else end_ms)
    start_ms = int(ITEMS_TS_MS if start_ms is None else start_ms)
    views = list(views or (ITEM_VIEW, LL_VIEW, RT_VIEW, IMP_VIEW))
    t0 = time.perf_counter()
    out = {"engine": engine, "end_ms": end_ms, "views": {}}
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
        batch, size = [], 0

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
                    n_tokens += _lengths_of(blob) if view != ITEM_VIEW else 0
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


# --- online reads (serving) ----------------------------------------------------------------

class OnlineSequences:
    """Reads users' three sequences and candidates' embeddings from the online store.

    Built once per process (resolves the feature service); :meth:`sequences` is what the
    ranking service calls per request. ``cfg`` caps the sequences (its caps may be
    smaller than those the store was built with).
    """

    def __init__(self, store_or_repo, cfg: FeatureConfig | None = None):
        self.store = _as_store(store_or_repo)
        self.cfg = cfg or FeatureConfig()
        self.service = self.store.get_feature_service(SERVICE)
        self.item_service = self.store.get_feature_service(ITEM_SERVICE)

    def raw(self, user_ids: Sequence[int], views: Sequence[str] | None = None) -> dict[str, list]:
        """Feature name -> one value per user (None where the user has no row); all of the
        ``ranking_v2`` service, or only the given user views."""
        rows = [{USER_KEY: int(u)} for u in user_ids]
        features = self.service if views is None else \
            [f"{v}:{name}" for v in views for name in VIEW_FEATURES[v]]
        return self.store.get_online_features(features=features, entity_rows=rows).to_dict()

    def sequences(self, user_ids: Sequence[int]) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
        """(S_LL, S_RT, S_imp) of each user, newest first; unknown users get empty sequences."""
        cfg = self.cfg
        d = self.raw(user_ids)
        ll = decode_tokens(d[VIEW_FEATURES[LL_VIEW][0]], cap=cfg.ll_cap)
        rt = decode_tokens(d[VIEW_FEATURES[RT_VIEW][0]], cap=cfg.rt_cap)
        win = decode_tokens(d[VIEW_FEATURES[IMP_VIEW][0]])
        imp = derive_imp(win, cfg.imp_cap) if win.engaged is not None else _empty_tokens(len(user_ids))
        return ll.to_jagged(), rt.to_jagged(), imp.to_jagged()

    def item_emb_q(self, item_ids: Sequence[int], unknown: str = "raise") -> np.ndarray:
        """int8 [N, D] embeddings of candidates. ``unknown``: "raise" (SchemaError) or "zero"."""
        rows = [{ITEM_KEY: int(i)} for i in item_ids]
        vals = self.store.get_online_features(features=self.item_service, entity_rows=rows).to_dict()[ITEM_FEATURE]
        missing = [int(i) for i, v in zip(item_ids, vals) if v is None]
        if missing and unknown == "raise":
            raise SchemaError(f"{len(missing)} item ids are not in the online store, e.g. {missing[:5]}")
        out = np.zeros((len(vals), S.EMB_DIM), dtype=np.int8)
        for i, v in enumerate(vals):
            if v is not None:
                out[i] = np.frombuffer(v, dtype=np.int8)
        return out


def _empty_tokens(n: int) -> Tokens:
    return Tokens(ts=np.zeros(0, np.int64), emb_q=np.zeros((0, S.EMB_DIM), np.int8),
                  action=np.zeros(0, np.uint8), surface=np.zeros(0, np.int8),
                  offsets=np.zeros(n + 1, np.int64))


def online_sequences(store, user_ids: Sequence[int], cfg: FeatureConfig | None = None
                     ) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
    """(S_LL, S_RT, S_imp) of ``user_ids`` from the online store (cold users: empty)."""
    return OnlineSequences(store, cfg).sequences(user_ids)


def online_item_emb_q(store, item_ids: Sequence[int], unknown: str = "raise") -> np.ndarray:
    """int8 [N, D] candidate embeddings from the online store."""
    return OnlineSequences(store).item_emb_q(item_ids, unknown)


# --- streaming updates (push) --------------------------------------------------------------

def _manifest_cfg(repo: Path, cfg: FeatureConfig | None) -> FeatureConfig:
    if cfg is not None:
        return cfg
    try:
        return FeatureConfig.from_dict(read_manifest(repo)["feature_config"])
    except FileNotFoundError:
        return FeatureConfig()


def _tokens_of(blob: bytes | None, with_extras: bool) -> dict[str, np.ndarray]:
    if blob is None:
        d = {"ts": np.zeros(0, np.int64), "emb_q": np.zeros((0, S.EMB_DIM), np.int8),
             "action": np.zeros(0, np.uint8), "surface": np.zeros(0, np.int8)}
        if with_extras:
            d |= {"item_id": np.zeros(0, np.int64), "engaged": np.zeros(0, np.uint8)}
        return d
    return {k: v.copy() for k, v in _split_blob(blob).items()}


def _prepend(state: dict, new: dict, cap: int) -> dict:
    """Adds events (in :func:`event_order`, one ts) to a newest-first state, keeping ``cap``
    tokens. Events newer than every token go first; an out-of-order event is placed by
    its ts (ties with older tokens of that ts: the new event first)."""
    rev = {k: v[::-1] for k, v in new.items()}
    t = rev["ts"][0]
    pos = int(np.searchsorted(-state["ts"], -t, side="left"))
    return {k: np.concatenate([state[k][:pos], rev[k], state[k][pos:]])[:cap] for k in state}


def push_events(store_or_repo, actions: pa.Table | None = None, impressions: pa.Table | None = None,
                cfg: FeatureConfig | None = None, to: str = "online", items: pa.Table | None = None,
                progress: bool = False) -> dict:
    """Streams new events into the realtime and impression features.

    For each user in the events: reads the current online state, applies the events in
    time order (the realtime sequence gains actions; the impression window gains
    impressions and marks impressions acted on as engaged), and pushes the final state
    with ``FeatureStore.push(..., to=PushMode.ONLINE)``. Event embeddings come from the
    online ``item_embedding`` view (or ``items`` when given).

    ``to="online_and_offline"`` also appends every intermediate state (one row per user
    and event time, as ``write_offline`` writes them) to the offline sources, as a new
    part file: Feast's own offline push for file sources rewrites the whole source, and
    does not support the part-folder layout.

    Events must reach a user in time order; an event older than the user's state is
    placed by its timestamp (exact for the realtime sequence, approximate for impression
    engagement). The lifelong sequence is a daily batch feature: pushes do not change it.
    """
    from feast.data_source import PushMode
    from transact.data.io import conform

    import pandas as pd

    if to not in ("online", "online_and_offline"):
        raise ValueError(f"to must be 'online' or 'online_and_offline', got {to!r}")
    store = _as_store(store_or_repo)
    repo = Path(store.repo_path)
    cfg = _manifest_cfg(repo, cfg)
    win_size = IMP_LOOKBACK * cfg.imp_cap
    t0 = time.perf_counter()
    acts = conform(actions, S.ACTIONS_TABLE, "actions") if actions is not None else S.ACTIONS_TABLE.empty_table()
    imps = conform(impressions, S.IMPRESSIONS, "impressions") if impressions is not None else S.IMPRESSIONS.empty_table()
    a = {c: acts.column(c).to_numpy() for c in ("user_id", "item_id", "ts", "action", "surface")}
    i = {c: imps.column(c).to_numpy() for c in ("user_id", "item_id", "ts", "surface", "request_id", "position")}
    users = np.unique(np.concatenate([a["user_id"], i["user_id"]]))
    if len(users) == 0:
        return {"users": 0, "actions": 0, "impressions": 0, "seconds": 0.0}
    reader = OnlineSequences(store, cfg)
    all_items = np.unique(np.concatenate([a["item_id"], i["item_id"]]))
    if items is not None:
        es_items = items.column("item_id").to_numpy()
        o = np.argsort(es_items)
        emb = items.column("emb_q").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, S.EMB_DIM)[o]
        rows = np.searchsorted(es_items[o], all_items)
        rows_c = np.minimum(rows, len(o) - 1)
        if len(o) == 0 or np.any(es_items[o][rows_c] != all_items):
            raise SchemaError("pushed events reference item ids missing from items")
        item_emb = emb[rows_c]
    else:
        item_emb = reader.item_emb_q(all_items)
    emb_of = lambda ids: item_emb[np.searchsorted(all_items, ids)]  # noqa: E731

    state = reader.raw(users, views=(RT_VIEW, IMP_VIEW))
    rt_blob_name, imp_blob_name = VIEW_FEATURES[RT_VIEW][0], VIEW_FEATURES[IMP_VIEW][0]
    # EventStore's total order: events of one ts reach the state in the same order as offline
    a_order = event_order(a["user_id"], a["ts"], *(a[c] for c in ACTION_TIES))
    i_order = event_order(i["user_id"], i["ts"], *(i[c] for c in IMPRESSION_TIES))
    out = {RT_VIEW: ([], [], [], []), IMP_VIEW: ([], [], [], [])}  # users, taus, blobs, lens
    final = {RT_VIEW: {}, IMP_VIEW: {}}
    for n, u in enumerate(tqdm(users, desc="push", unit="user", disable=not progress)):
        al, ah = np.searchsorted(a["user_id"][a_order], u), np.searchsorted(a["user_id"][a_order], u, "right")
        il, ih = np.searchsorted(i["user_id"][i_order], u), np.searchsorted(i["user_id"][i_order], u, "right")
        ua, ui = a_order[al:ah], i_order[il:ih]
        rt = _tokens_of(state[rt_blob_name][n], False)
        win = _tokens_of(state[imp_blob_name][n], True)
        if "item_id" not in win:
            raise ValueError("online impression rows lack item ids: rebuild with this version")
        times = np.unique(np.concatenate([a["ts"][ua], i["ts"][ui]]))
        for t in times:
            ga = ua[a["ts"][ua] == t]
            gi = ui[i["ts"][ui] == t]
            if len(ga):
                rt = _prepend(rt, {"ts": a["ts"][ga], "emb_q": emb_of(a["item_id"][ga]),
                                   "action": a["action"][ga], "surface": a["surface"][ga]}, cfg.rt_cap)
                out[RT_VIEW][0].append(u), out[RT_VIEW][1].append(t + 1)
                out[RT_VIEW][2].append(encode_tokens(**rt)), out[RT_VIEW][3].append(len(rt["ts"]))
            before = encode_tokens(**win)
            if len(gi):
                win = _prepend(win, {"ts": i["ts"][gi], "emb_q": emb_of(i["item_id"][gi]),
                                     "action": np.full(len(gi), S.ACTION_BIT["impression"], np.uint8),
                                     "surface": i["surface"][gi], "item_id": i["item_id"][gi],
                                     "engaged": np.zeros(len(gi), np.uint8)}, win_size)
            if len(ga):
                hit = np.isin(win["item_id"], a["item_id"][ga]) & (win["ts"] <= t)
                win["engaged"][hit] = 1
            blob = encode_tokens(**win)
            if blob != before:
                tok = Tokens(offsets=np.array([0, len(win["ts"])]), **win)
                out[IMP_VIEW][0].append(u), out[IMP_VIEW][1].append(t + 1)
                out[IMP_VIEW][2].append(blob), out[IMP_VIEW][3].append(int(derive_imp(tok, cfg.imp_cap).offsets[-1]))
        for view in (RT_VIEW, IMP_VIEW):
            us = out[view][0]
            if us and us[-1] == u:
                final[view][int(u)] = len(us) - 1

    summary = {"users": int(len(users)), "actions": int(acts.num_rows), "impressions": int(imps.num_rows),
               "rows": {}, "to": to}
    for view, push_name in ((RT_VIEW, RT_PUSH), (IMP_VIEW, IMP_PUSH)):
        us, taus, blobs, lens = out[view]
        summary["rows"][view] = len(us)
        if not us:
            continue
        last = sorted(final[view].values())
        blob_name, len_name = VIEW_FEATURES[view]
        df = pd.DataFrame({USER_KEY: np.asarray(us, np.int64)[last],
                           TS_COL: pd.to_datetime(np.asarray(taus, np.int64)[last], unit="ms", utc=True),
                           blob_name: [blobs[k] for k in last],
                           len_name: np.asarray(lens, np.int32)[last]})
        store.push(push_name, df, to=PushMode.ONLINE)
        if to == "online_and_offline":
            ws = {v: _PartWriter(repo / OFFLINE_DIRS[v], v, 1024) for v in (view, INDEX_VIEWS[view][0])}
            try:
                _write_user_rows(ws, view, us, taus, blobs, lens)
                for w in ws.values():
                    w.close(ensure_one=False)
            except BaseException:
                for w in ws.values():
                    w.abort()
                raise
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


# --- point-in-time reads (training) ------------------------------------------------------------

class _Payload:
    """Keyed reads of a sequence view's offline rows: (user, row time) -> blob."""

    def __init__(self, repo: Path, view: str):
        self.files = sorted((repo / OFFLINE_DIRS[view]).glob("part-*.parquet"))
        self.blob = VIEW_FEATURES[view][0]
        us, ts, fid, row = [], [], [], []
        self.rg_starts = []
        for f_id, f in enumerate(self.files):
            pf = pq.ParquetFile(f)
            t = pf.read(columns=[USER_KEY, TS_COL])
            us.append(t.column(USER_KEY).to_numpy())
            ts.append(t.column(TS_COL).cast(pa.int64()).to_numpy() // 1000)
            fid.append(np.full(t.num_rows, f_id)), row.append(np.arange(t.num_rows))
            self.rg_starts.append(np.cumsum([0] + [pf.metadata.row_group(i).num_rows
                                                   for i in range(pf.num_row_groups)]))
        u, t, self.fid, self.row = (np.concatenate(x) if x else np.zeros(0, np.int64)
                                    for x in (us, ts, fid, row))
        self.users = np.unique(u)
        rank = np.searchsorted(self.users, u)
        o = np.lexsort((self.row, self.fid, t, rank))  # equal (user, ts) keep file order: the last one wins
        self.ts, self.fid, self.row = t[o], self.fid[o], self.row[o]
        self.offsets = group_offsets(rank[o], max(len(self.users), 1))  # rows of each user

    def get(self, users: np.ndarray, asof_ms: Sequence[int | None]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(users)
        have = [k for k, a in enumerate(asof_ms) if a is not None]
        if not have or not len(self.ts):
            return out
        u = np.asarray(users, np.int64)[have]
        a = np.asarray([asof_ms[k] for k in have], np.int64)
        rank, known = dense_rank(self.users, u)
        lo = self.offsets[rank]
        pos = search_in_groups(self.ts, lo, self.offsets[rank + 1], a, side="right") - 1
        ok = known & (pos >= lo) & (self.ts[np.maximum(pos, 0)] == a)
        if not ok.all():
            raise ValueError(f"{int((~ok).sum())} rows named by the index are missing from {self.blob}'s source")
        fid, row = self.fid[pos], self.row[pos]
        for f in np.unique(fid):
            sel = np.flatnonzero(fid == f)
            starts = self.rg_starts[f]
            rg_of = np.searchsorted(starts, row[sel], side="right") - 1  # row group of each row
            pf = pq.ParquetFile(self.files[f])
            all_rgs = np.unique(rg_of)
            for g in range(0, len(all_rgs), 32):  # a few row groups at a time: bounded memory
                rgs = all_rgs[g: g + 32]
                part = np.flatnonzero(np.isin(rg_of, rgs))
                t = pf.read_row_groups(rgs.tolist(), columns=[self.blob]).column(self.blob)
                base = np.concatenate([[0], np.cumsum(np.diff(starts)[rgs])])  # where each rg starts in t
                local = base[np.searchsorted(rgs, rg_of[part])] + row[sel][part] - starts[rg_of[part]]
                for k, v in zip(sel[part], t.take(pa.array(local)).to_pylist()):
                    out[have[k]] = v
        return out


class HistoricalSequences:
    """Point-in-time sequences from Feast's offline store: a drop-in for
    :class:`~transact.model.sequences.EventStore` in
    :func:`transact.components.nn_logging.log_nn_features` (``.sequences`` and
    ``.item_emb_q_of``).

    Every lookup is a ``FeatureStore.get_historical_features`` point-in-time join:
    lifelong rows are asked at the snapshot instant ``floor(t / refresh) * refresh`` (the
    same row as at t, since snapshots exist only at those instants, and requests of a
    day share it), realtime and impression rows at t itself.

    payload="index" (default): the join runs over the narrow ``*_index`` views (each
    row's own time), then the payload row is read by (user, row time) from the same
    offline source. payload="feast": the join returns the token blobs itself -- the same
    answer, but Feast's file offline store then loads every blob of the source into
    pandas on each call (demo world: ~45 s and ~4 GB per call vs ~8 s and a few
    hundred MB); fine for small data and tests.

    Feast's file store reads whole sources on every call, so give ``plan`` (every
    (user_ids, ts) that will be asked, e.g. a requests table): lookups are then fetched
    ``chunk`` requests at a time in plan order and cached until the next fetch.

    Args:
        store_or_repo: the Feast repo (offline sources written by :func:`write_offline`).
        cfg: caps; must not exceed those the sources were written with; same refresh.
    """

    def __init__(self, store_or_repo, cfg: FeatureConfig | None = None,
                 plan: tuple[np.ndarray, np.ndarray] | None = None, chunk: int = 16_384,
                 item_plan: np.ndarray | None = None, payload: str = "index"):
        if payload not in ("index", "feast"):
            raise ValueError(f"payload must be 'index' or 'feast', got {payload!r}")
        self.store = _as_store(store_or_repo)
        self.repo = Path(self.store.repo_path)
        self.manifest = read_manifest(self.repo)
        written = FeatureConfig.from_dict(self.manifest["feature_config"])
        self.cfg = cfg or written
        for cap in ("ll_cap", "rt_cap", "imp_cap"):
            if getattr(self.cfg, cap) > getattr(written, cap):
                raise ValueError(f"{cap}={getattr(self.cfg, cap)} exceeds the {getattr(written, cap)} "
                                 f"the offline sources were written with")
        if self.cfg.ll_refresh_ms != written.ll_refresh_ms:
            raise ValueError("ll_refresh_ms differs from the one the offline sources were written with")
        self.payload = payload
        self._payload = ({v: _Payload(self.repo, v) for v in (LL_VIEW, RT_VIEW, IMP_VIEW)}
                         if payload == "index" else None)
        self.chunk = chunk
        self._plan = None
        if plan is not None:
            u, t = (np.asarray(x, np.int64) for x in plan)
            keys = np.unique(np.stack([t, u], 1), axis=0)  # ordered by time
            self._plan = (keys[:, 1], keys[:, 0])
        self._item_plan = None if item_plan is None else np.unique(np.asarray(item_plan, np.int64))
        self._ll: dict[tuple[int, int], bytes | None] = {}
        self._now: dict[tuple[int, int], tuple[bytes | None, bytes | None]] = {}
        self._items: dict[int, bytes] = {}
        self.fetches = 0
        self.fetch_seconds = 0.0

    # -- Feast calls
    def _historical(self, key: str, ids: np.ndarray, ts_ms: np.ndarray, features: list[str]) -> list[list]:
        """One point-in-time join; per feature, the value for each (ids[i], ts_ms[i]) (None: no row)."""
        import pandas as pd

        ids, ts_ms = np.asarray(ids, np.int64), np.asarray(ts_ms, np.int64)
        entity_df = pd.DataFrame({key: ids, TS_COL: pd.to_datetime(ts_ms, unit="ms", utc=True)})
        t0 = time.perf_counter()
        df = self.store.get_historical_features(entity_df=entity_df, features=features).to_df()
        self.fetches += 1
        self.fetch_seconds += time.perf_counter() - t0
        got_ts = ((df[TS_COL] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).to_numpy(np.int64)
        pos = {(int(a), int(b)): n for n, (a, b) in enumerate(zip(df[key].to_numpy(np.int64), got_ts))}
        # Feast drops an entity row whose entity has rows only after its time: no row = None
        rows = [pos.get((int(a), int(b))) for a, b in zip(ids, ts_ms)]
        out = []
        for f in features:
            col = df[f.split(":")[1]].tolist()
            out.append([None if n is None or _missing(col[n]) else col[n] for n in rows])
        return out

    def _lookup_many(self, views: list[str], users: np.ndarray, ts_ms: np.ndarray) -> list[list]:
        if self.payload == "feast":
            vals = self._historical(USER_KEY, users, ts_ms, [f"{v}:{VIEW_FEATURES[v][0]}" for v in views])
            return [[None if x is None else bytes(x) for x in col] for col in vals]
        asofs = self._historical(USER_KEY, users, ts_ms,
                                 [f"{INDEX_VIEWS[v][0]}:{INDEX_VIEWS[v][1]}" for v in views])
        return [self._payload[v].get(users, [None if a is None else int(a) for a in col])
                for v, col in zip(views, asofs)]

    def _fetch(self, users: np.ndarray, ts: np.ndarray) -> None:
        r = self.cfg.ll_refresh_ms
        ll_keys = np.unique(np.stack([users, (ts // r) * r], 1), axis=0)
        now_keys = np.unique(np.stack([users, ts], 1), axis=0)
        if len(ll_keys):
            (blobs,) = self._lookup_many([LL_VIEW], ll_keys[:, 0], ll_keys[:, 1])
            self._ll.update({(int(a), int(b)): c for (a, b), c in zip(ll_keys, blobs)})
        if len(now_keys):
            # one view per call: Feast's file store drops an entity row from the whole result
            # when one view has rows for the entity but all after its time
            (rt,) = self._lookup_many([RT_VIEW], now_keys[:, 0], now_keys[:, 1])
            (win,) = self._lookup_many([IMP_VIEW], now_keys[:, 0], now_keys[:, 1])
            self._now.update({(int(a), int(b)): (c, d) for (a, b), c, d in zip(now_keys, rt, win)})

    def _check_range(self, ts: np.ndarray) -> None:
        lo, hi = self.manifest["since_ms"], self.manifest["until_ms"]
        if len(ts) and (ts.min() < lo or ts.max() > hi):
            raise ValueError(f"request times must lie in [{lo}, {hi}] (the offline sources' range); "
                             f"got [{int(ts.min())}, {int(ts.max())}]")

    def sequences(self, user_ids, ts) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
        """(S_LL, S_RT, S_imp) for requests (user_ids[i], ts[i]), newest first."""
        users = np.asarray(user_ids, np.int64)
        ts = np.asarray(ts, np.int64)
        self._check_range(ts)
        r = self.cfg.ll_refresh_ms
        need = [(int(u), int(t)) for u, t in zip(users, ts)]
        missing = [k for k in need if k not in self._now or (k[0], (k[1] // r) * r) not in self._ll]
        if missing:
            mu = np.array([k[0] for k in missing], np.int64)
            mt = np.array([k[1] for k in missing], np.int64)
            self._now = {k: self._now[k] for k in need if k in self._now}
            self._ll = {(u, (t // r) * r): self._ll[(u, (t // r) * r)] for u, t in need
                        if (u, (t // r) * r) in self._ll}
            if self._plan is not None:  # fetch ahead along the plan
                pu, pt = self._plan
                start = int(np.searchsorted(pt, mt.min()))
                mu = np.concatenate([mu, pu[start: start + self.chunk]])
                mt = np.concatenate([mt, pt[start: start + self.chunk]])
            self._fetch(mu, mt)
        ll = decode_tokens([self._ll[(u, (t // r) * r)] for u, t in need], cap=self.cfg.ll_cap)
        rt = decode_tokens([self._now[k][0] for k in need], cap=self.cfg.rt_cap)
        win = decode_tokens([self._now[k][1] for k in need])
        imp = derive_imp(win, self.cfg.imp_cap) if win.engaged is not None else _empty_tokens(len(need))
        return ll.to_jagged(), rt.to_jagged(), imp.to_jagged()

    def item_emb_q_of(self, item_ids) -> np.ndarray:
        """int8 [N, D] embeddings of the given items (SchemaError on unknown ids)."""
        ids = np.asarray(item_ids, np.int64)
        missing = np.unique(ids[[int(i) not in self._items for i in ids]]) if len(ids) else ids
        if len(missing):
            fetch = missing if self._item_plan is None else np.union1d(missing, self._item_plan)
            self._item_plan = None
            (emb,) = self._historical(ITEM_KEY, fetch, np.full(len(fetch), self.manifest["until_ms"]),
                                      [f"{ITEM_VIEW}:{ITEM_FEATURE}"])
            self._items.update({int(a): bytes(b) for a, b in zip(fetch, emb) if b is not None})
        unknown = [int(i) for i in ids if int(i) not in self._items]
        if unknown:
            raise SchemaError(f"candidates: {len(unknown)} rows reference item_id values missing "
                              f"from the item_embedding view, e.g. {sorted(set(unknown))[:5]}")
        out = np.empty((len(ids), S.EMB_DIM), dtype=np.int8)
        for n, i in enumerate(ids):
            out[n] = np.frombuffer(self._items[int(i)], dtype=np.int8)
        return out


def _missing(v) -> bool:
    """None, NaN or pandas.NA (how a join without a row shows up in the DataFrame)."""
    import pandas as pd

    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def historical_for_requests(store_or_repo, world: str | Path, cfg: FeatureConfig | None = None,
                            chunk: int = 16_384, payload: str = "index") -> HistoricalSequences:
    """A :class:`HistoricalSequences` planned over a world's requests (for log_nn_features)."""
    req = pq.read_table(table_path(world, "requests"), columns=["user_id", "ts", "item_id"])
    return HistoricalSequences(store_or_repo, cfg, plan=(req.column("user_id").to_numpy(),
                                                         req.column("ts").to_numpy()),
                               chunk=chunk, item_plan=req.column("item_id").to_numpy(), payload=payload)


# --- the pipeline step ----------------------------------------------------------------------

def build_feature_store(world: str | Path, repo: str | Path, cfg: FeatureConfig | None = None,
                        online: str = "sqlite", redis: str | None = None, engine: str = "direct",
                        since_ms: int | None = None, until_ms: int | None = None,
                        progress: bool = True) -> dict:
    """Pipeline step "materialise features": creates the Feast repo ``repo`` (from the
    project's definitions), writes the world's events into its offline sources, applies
    the definitions and materialises the online store. Returns the summaries."""
    repo = Path(repo)
    if not (repo / "feature_store.yaml").exists() or online == "redis":
        init_repo(repo, online=online, redis=redis)
    offline = write_offline(world, repo, cfg, since_ms=since_ms, until_ms=until_ms, progress=progress)
    store = open_store(repo)
    applied = apply(store)
    mat = materialize(store, engine=engine, progress=progress)
    return {"repo": str(repo), "offline": offline, "apply": applied, "materialize": mat}


# --- local redis (tests, benchmark) -----------------------------------------------------------

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
        except Exception:
            proc.kill()
            proc.wait()


# --- benchmark --------------------------------------------------------------------------------

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
    from transact.machine import peak_rss_mib

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
    tables = _load_world(world)
    au = tables["actions"].column("user_id").to_numpy()
    ids, counts = np.unique(au, return_counts=True)
    keep = ids[np.argsort(-counts, kind="stable")[:max_users]]
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(tables["items"], dest / "items.parquet")
    for name in ("actions", "impressions"):
        t = tables[name]
        pq.write_table(t.filter(pa.array(np.isin(t.column("user_id").to_numpy(), keep))), dest / f"{name}.parquet")
    from transact.data.world import seal_world

    seal_world(dest)  # _load_world reads only sealed worlds
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
        result = {"world": str(world), "max_users": max_users, "feature_config": cfg.to_dict(),
                  "offline": offline, "stores": {}}
        items = _load_world(world)["items"]
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
    from transact.machine import machine_info

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
        total += sum(_lengths_of(b) for v in (LL_VIEW, RT_VIEW, IMP_VIEW) for b in d[VIEW_FEATURES[v][0]])
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
    lines.append("(peak MiB: RSS of the materialising process, ~"
                 + f"{min((m['rss_base_mib'] for res in r['stores'].values() if 'materialize' in res for m in res['materialize'].values()), default=0):,.0f}"
                 + " MiB of it imports before any work; reads: one user's three sequences)")
    return "\n".join(lines)


def write_bench_json(out: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return path
