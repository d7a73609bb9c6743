"""Point-in-time reads for training: :class:`HistoricalSequences`, an EventStore drop-in
over Feast's offline store (``get_historical_features`` joins)."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transact.data import schema as S
from transact.data.io import SchemaError, table_path
from transact.features.config import FeatureConfig
from transact.features.event_order import dense_rank, group_offsets, search_in_groups
from transact.features.feast.codec import decode_tokens, derive_imp, empty_tokens
from transact.features.feast.store import (
    IMP_VIEW,
    INDEX_VIEWS,
    ITEM_FEATURE,
    ITEM_KEY,
    ITEM_VIEW,
    LL_VIEW,
    OFFLINE_DIRS,
    RT_VIEW,
    TS_COL,
    USER_KEY,
    VIEW_FEATURES,
    as_store,
    read_manifest,
)
from transact.features.nn_features import JaggedSequences


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
            fid.append(np.full(t.num_rows, f_id))
            row.append(np.arange(t.num_rows))
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
    :class:`~transact.features.sequences.EventStore` in
    :func:`transact.features.nn_logging.log_nn_features` (``.sequences`` and
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
        store_or_repo: the Feast repo (offline sources written by
            :func:`transact.features.feast.offline.write_offline`).
        cfg: caps; must not exceed those the sources were written with; same refresh.
    """

    def __init__(self, store_or_repo, cfg: FeatureConfig | None = None,
                 plan: tuple[np.ndarray, np.ndarray] | None = None, chunk: int = 16_384,
                 item_plan: np.ndarray | None = None, payload: str = "index"):
        if payload not in ("index", "feast"):
            raise ValueError(f"payload must be 'index' or 'feast', got {payload!r}")
        self.store = as_store(store_or_repo)
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
        payloads = self._payload
        assert payloads is not None  # payload="index" reads its payload files
        return [payloads[v].get(users, [None if a is None else int(a) for a in col])
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
        imp = derive_imp(win, self.cfg.imp_cap) if win.engaged is not None else empty_tokens(len(need))
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
