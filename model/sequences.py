"""The three user sequences, built point-in-time (paper §3.2.1, DESIGN §2).

For a request of user u at time t, built only from events strictly before t and
stored newest first:

- S_LL, lifelong: the last ``ll_cap`` explicit actions before the batch snapshot
  ``floor(t / ll_refresh_ms) * ll_refresh_ms`` -- S_LL is a daily batch feature, so
  a request sees yesterday's materialisation, never an action of the last hours
  (those reach the model through S_RT). ``ll_refresh_ms = 0`` snapshots at t itself.
- S_RT, realtime: the last ``rt_cap`` explicit actions before t.
- S_imp, impressions: the last ``imp_cap`` impressions before t that the user had not
  engaged with *before t* (no explicit action on the same item between the impression
  and t). Only the last ``IMP_LOOKBACK * imp_cap`` impressions are scanned, which
  bounds the work per request; with typical engagement rates that window holds far
  more than ``imp_cap`` unengaged impressions.

Everything is vectorised over a batch of requests: per-user time ranges are found
with one ``searchsorted`` on a composite (user, time) key, and tokens are gathered
with one fancy index per field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from transact.data import schema as S
from transact.data.io import SchemaError, read_table, table_path
from transact.model.config import FeatureConfig
from transact.model.nn_features import JaggedSequences

IMP_LOOKBACK: int = 3
_TS_BITS: int = 42  # ms since the earliest event fit in 42 bits for ~139 years
_NEVER: int = np.iinfo(np.int64).max


def _composite(group: np.ndarray, ts_rel: np.ndarray) -> np.ndarray:
    """Sortable int64 key of (group rank, relative time)."""
    return (group.astype(np.int64) << _TS_BITS) | ts_rel.astype(np.int64)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated *reversed* ranges [end-1, ..., start] and the offsets of each range."""
    lens = np.maximum(ends - starts, 0)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lens)
    return np.repeat(ends - 1, lens) - within, offsets


@dataclass
class _EventArrays:
    """One event table's columns, sorted by (user, ts), with per-user key for search."""

    key: np.ndarray  # int64 [E] composite (user rank, ts - t0)
    user_rank: np.ndarray  # int64 [E]
    item_row: np.ndarray  # int64 [E] row of the item in the item matrix
    ts: np.ndarray  # int64 [E]
    action: np.ndarray  # uint8 [E]
    surface: np.ndarray  # int8 [E]


class EventStore:
    """Per-user, time-sorted event arrays from which point-in-time sequences are cut.

    Args:
        items, actions, impressions: tables following :mod:`transact.data.schema`.
        cfg: sequence caps.
    """

    def __init__(self, items: pa.Table, actions: pa.Table, impressions: pa.Table,
                 cfg: FeatureConfig | None = None) -> None:
        self.cfg = cfg or FeatureConfig()
        item_ids = items.column("item_id").to_numpy()
        order = np.argsort(item_ids, kind="stable")
        self._item_ids = item_ids[order]
        if len(self._item_ids) > 1 and np.any(self._item_ids[1:] == self._item_ids[:-1]):
            dup = self._item_ids[1:][self._item_ids[1:] == self._item_ids[:-1]][:5]
            raise SchemaError(f"items: duplicate item_id values, e.g. {dup.tolist()}")
        emb_q = items.column("emb_q").combine_chunks().values.to_numpy(zero_copy_only=False)
        self.item_emb_q = emb_q.reshape(-1, S.EMB_DIM)[order]  # int8 [I, D]

        a_user = actions.column("user_id").to_numpy()
        i_user = impressions.column("user_id").to_numpy()
        self._users = np.unique(np.concatenate([a_user, i_user]))
        ts_all = [actions.column("ts").to_numpy(), impressions.column("ts").to_numpy()]
        self._t0 = int(min((t.min() for t in ts_all if len(t)), default=0))
        self.actions = self._arrays(actions, "actions", with_action=True)
        self.impressions = self._arrays(impressions, "impressions", with_action=False)
        self._imp_next_action = self._next_action_ts()

    @classmethod
    def from_dir(cls, world: str | Path, cfg: FeatureConfig | None = None) -> "EventStore":
        """Loads ``items``, ``actions`` and ``impressions`` parquet tables of a world folder."""
        tables = {n: read_table(table_path(world, n), S.TABLES[n], what=n)
                  for n in ("items", "actions", "impressions")}
        return cls(tables["items"], tables["actions"], tables["impressions"], cfg)

    # --- construction --------------------------------------------------------------------

    def _item_rows(self, item_id: np.ndarray, what: str) -> np.ndarray:
        rows = np.searchsorted(self._item_ids, item_id)
        rows = np.minimum(rows, max(len(self._item_ids) - 1, 0))
        unknown = (self._item_ids[rows] != item_id) if len(self._item_ids) else np.ones(len(item_id), bool)
        if unknown.any():
            raise SchemaError(f"{what}: {int(unknown.sum())} rows reference item_id values missing "
                              f"from items, e.g. {np.unique(item_id[unknown])[:5].tolist()}")
        return rows

    def _arrays(self, t: pa.Table, what: str, with_action: bool) -> _EventArrays:
        user = t.column("user_id").to_numpy()
        ts = t.column("ts").to_numpy()
        rank = np.searchsorted(self._users, user)
        key = _composite(rank, ts - self._t0)
        order = np.argsort(key, kind="stable")
        item_row = self._item_rows(t.column("item_id").to_numpy(), what)
        n = len(order)
        action = (t.column("action").to_numpy()[order] if with_action
                  else np.full(n, S.ACTION_BIT["impression"], dtype=np.uint8))
        return _EventArrays(key[order], rank[order], item_row[order], ts[order], action,
                            t.column("surface").to_numpy()[order])

    def _next_action_ts(self) -> np.ndarray:
        """For each impression: ts of the user's first action on that item at or after it."""
        a, imp = self.actions, self.impressions
        if len(imp.ts) == 0:
            return np.zeros(0, dtype=np.int64)
        # Dense id of each (user, item) pair seen in either table.
        pairs = np.concatenate([(a.user_rank << 32) | a.item_row, (imp.user_rank << 32) | imp.item_row])
        pair_ids, inverse = np.unique(pairs, return_inverse=True)
        a_key = _composite(inverse[: len(a.ts)], a.ts - self._t0)
        i_key = _composite(inverse[len(a.ts):], imp.ts - self._t0)
        order = np.argsort(a_key, kind="stable")
        a_key_sorted = a_key[order]
        j = np.searchsorted(a_key_sorted, i_key, side="left")
        j_clip = np.minimum(j, max(len(a_key_sorted) - 1, 0))
        if len(a_key_sorted) == 0:
            return np.full(len(imp.ts), _NEVER, dtype=np.int64)
        same_pair = (j < len(a_key_sorted)) & ((a_key_sorted[j_clip] >> _TS_BITS) == (i_key >> _TS_BITS))
        nxt = (a_key_sorted[j_clip] & ((1 << _TS_BITS) - 1)) + self._t0
        return np.where(same_pair, nxt, _NEVER)

    # --- point-in-time sequences -----------------------------------------------------------

    def _bounds(self, ev: _EventArrays, rank: np.ndarray, known: np.ndarray, t: np.ndarray):
        """Index range [lo, hi) of the user's events with ts < t (empty for unknown users)."""
        t_rel = np.clip(t - self._t0, 0, (1 << _TS_BITS) - 1)
        lo = np.searchsorted(ev.key, _composite(rank, np.zeros_like(t_rel)), side="left")
        hi = np.searchsorted(ev.key, _composite(rank, t_rel), side="left")
        hi = np.where(known & (t > self._t0), hi, lo)
        return lo, hi

    def _jagged(self, ev: _EventArrays, idx: np.ndarray, offsets: np.ndarray) -> JaggedSequences:
        return JaggedSequences(
            emb_q=torch.from_numpy(self.item_emb_q[ev.item_row[idx]]),  # [T, D]
            action=torch.from_numpy(ev.action[idx]),  # [T]
            surface=torch.from_numpy(ev.surface[idx]),  # [T]
            ts=torch.from_numpy(ev.ts[idx]),  # [T]
            offsets=torch.from_numpy(offsets),  # [U + 1]
        )

    def sequences(self, user_ids: np.ndarray, ts: np.ndarray
                  ) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
        """(S_LL, S_RT, S_imp) for requests (user_ids[i], ts[i]), newest first.

        Unknown (cold) users get empty sequences.
        """
        cfg = self.cfg
        user_ids = np.asarray(user_ids, dtype=np.int64)
        t = np.asarray(ts, dtype=np.int64)
        rank = np.minimum(np.searchsorted(self._users, user_ids), max(len(self._users) - 1, 0))
        known = (self._users[rank] == user_ids) if len(self._users) else np.zeros(len(user_ids), bool)

        a = self.actions
        lo, hi = self._bounds(a, rank, known, t)
        rt_idx, rt_off = _ranges(np.maximum(lo, hi - cfg.rt_cap), hi)
        t_ll = (t // cfg.ll_refresh_ms) * cfg.ll_refresh_ms if cfg.ll_refresh_ms else t
        _, hi_ll = self._bounds(a, rank, known, t_ll)
        ll_idx, ll_off = _ranges(np.maximum(lo, hi_ll - cfg.ll_cap), hi_ll)

        imp = self.impressions
        ilo, ihi = self._bounds(imp, rank, known, t)
        win_idx, win_off = _ranges(np.maximum(ilo, ihi - IMP_LOOKBACK * cfg.imp_cap), ihi)
        req_of_tok = np.repeat(np.arange(len(t)), np.diff(win_off))
        unengaged = self._imp_next_action[win_idx] >= t[req_of_tok]
        # Keep each request's first imp_cap unengaged tokens (the window is newest first).
        rank_in_req = np.cumsum(unengaged) - 1
        first = np.concatenate([[0], np.cumsum(unengaged)])[win_off[:-1]]
        keep = unengaged & ((rank_in_req - np.repeat(first, np.diff(win_off))) < cfg.imp_cap)
        imp_idx = win_idx[keep]
        imp_off = np.zeros(len(t) + 1, dtype=np.int64)
        np.cumsum(np.bincount(req_of_tok[keep], minlength=len(t)), out=imp_off[1:])

        return (self._jagged(a, ll_idx, ll_off), self._jagged(a, rt_idx, rt_off),
                self._jagged(imp, imp_idx, imp_off))

    def item_emb_q_of(self, item_ids: np.ndarray) -> np.ndarray:
        """int8 [N, D] embeddings of the given items (clear error on unknown ids)."""
        return self.item_emb_q[self._item_rows(np.asarray(item_ids, dtype=np.int64), "candidates")]
