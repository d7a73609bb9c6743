"""The three user sequences, built point-in-time (paper §3.2.1, docs/design.md §2.4).

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

Events are kept in the total order of :mod:`transact.features.event_order` (ties of one
timestamp decided by the other columns, never by storage order), so the sequences are a
pure function of the set of events. Everything is vectorised over a batch of requests:
per-user time ranges are found by one bisection of every request in its user's slice
(exact for any ids and any number of users), and tokens are gathered with one fancy
index per field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from transact.data import schema as S
from transact.data.io import SchemaError, read_table, table_path
from transact.features.config import FeatureConfig
from transact.features.event_order import (
    ACTION_TIES,
    IMPRESSION_TIES,
    dense_rank,
    event_order,
    group_offsets,
    pair_ids,
    pair_order,
    search_in_groups,
)
from transact.features.nn_features import JaggedSequences
from transact.kernels import dispatch

IMP_LOOKBACK: int = 3
_NEVER: int = np.iinfo(np.int64).max


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated *reversed* ranges [end-1, ..., start] and the offsets of each range."""
    lens = np.maximum(ends - starts, 0)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lens)
    return np.repeat(ends - 1, lens) - within, offsets


@dataclass
class _EventArrays:
    """One event table's columns in :func:`event_order` (user, ts, ties), with the row
    range of each user."""

    offsets: np.ndarray  # int64 [U + 1] rows of user rank u: [offsets[u], offsets[u + 1])
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
        # each item's norm once: the NN search would otherwise compute a token's norm again
        # for every request that holds it (a user's requests share almost all S_LL tokens)
        self.item_norm = dispatch.token_norms(torch.from_numpy(self.item_emb_q)).numpy()  # float32 [I]

        a_user = actions.column("user_id").to_numpy()
        i_user = impressions.column("user_id").to_numpy()
        self._users = np.unique(np.concatenate([a_user, i_user]))
        self.actions = self._arrays(actions, "actions", with_action=True)
        self.impressions = self._arrays(impressions, "impressions", with_action=False)
        self._imp_next_action = self._next_action_ts()

    @classmethod
    def from_dir(cls, world: str | Path, cfg: FeatureConfig | None = None) -> EventStore:
        """Loads ``items``, ``actions`` and ``impressions`` parquet tables of a world folder."""
        from transact.data.world import check_world

        check_world(world, ("items", "actions", "impressions"))  # a sealed world, never a mix
        # the store reads an item's id and int8 codes only
        cols = {"items": ("item_id", "emb_q"), "actions": None, "impressions": None}
        tables = {n: read_table(table_path(world, n), S.TABLES[n], columns=c, what=n) for n, c in cols.items()}
        return cls(tables["items"], tables["actions"], tables["impressions"], cfg)

    # --- construction --------------------------------------------------------------------

    def _item_rows(self, item_id: np.ndarray, what: str) -> np.ndarray:
        ids = self._item_ids
        if len(ids) and int(ids[-1]) - int(ids[0]) == len(ids) - 1:
            # Dense ids (first, first + 1, ...): the row is the id's offset -- what the
            # binary search finds, without its cache misses (0.5 s for 1.8M lookups).
            unknown = (item_id < ids[0]) | (item_id > ids[-1])
            rows = np.where(unknown, 0, item_id - ids[0])
        else:
            rows = np.searchsorted(ids, item_id)
            rows = np.minimum(rows, max(len(ids) - 1, 0))
            unknown = (ids[rows] != item_id) if len(ids) else np.ones(len(item_id), bool)
        if unknown.any():
            raise SchemaError(f"{what}: {int(unknown.sum())} rows reference item_id values missing "
                              f"from items, e.g. {np.unique(item_id[unknown])[:5].tolist()}")
        return rows

    def _arrays(self, t: pa.Table, what: str, with_action: bool) -> _EventArrays:
        user = t.column("user_id").to_numpy()
        ts = t.column("ts").to_numpy()
        rank, _ = dense_rank(self._users, user)  # every user is known: _users is their union
        ties = ACTION_TIES if with_action else IMPRESSION_TIES
        order = event_order(rank, ts, *(t.column(c).to_numpy() for c in ties))  # a total order
        item_row = self._item_rows(t.column("item_id").to_numpy(), what)
        n = len(order)
        action = (t.column("action").to_numpy()[order] if with_action
                  else np.full(n, S.ACTION_BIT["impression"], dtype=np.uint8))
        return _EventArrays(group_offsets(rank[order], max(len(self._users), 1)), rank[order], item_row[order],
                            ts[order], action, t.column("surface").to_numpy()[order])

    def _next_action_ts(self) -> np.ndarray:
        """For each impression: ts of the user's first action on that item at or after it."""
        a, imp = self.actions, self.impressions
        if len(imp.ts) == 0:
            return np.zeros(0, dtype=np.int64)
        if len(a.ts) == 0:
            return np.full(len(imp.ts), _NEVER, dtype=np.int64)
        # Dense id of each (user, item) pair seen in either table; actions by (pair, ts).
        a_pair, i_pair, n_pairs = pair_ids((a.user_rank, a.item_row), (imp.user_rank, imp.item_row))
        order = pair_order(a_pair, a.ts)  # by (pair, ts); equal pairs of times: the same a_ts
        a_ts = a.ts[order]
        off = group_offsets(a_pair[order], n_pairs)
        j = search_in_groups(a_ts, off[i_pair], off[i_pair + 1], imp.ts, side="left")
        return np.where(j < off[i_pair + 1], a_ts[np.minimum(j, len(a_ts) - 1)], _NEVER)

    # --- point-in-time sequences -----------------------------------------------------------

    def _bounds(self, ev: _EventArrays, rank: np.ndarray, known: np.ndarray, t: np.ndarray):
        """Index range [lo, hi) of the user's events with ts < t (empty for unknown users)."""
        lo, end = ev.offsets[rank], ev.offsets[rank + 1]
        hi = search_in_groups(ev.ts, lo, end, t, side="left")
        return lo, np.where(known, hi, lo)

    def _jagged(self, ev: _EventArrays, idx: np.ndarray, offsets: np.ndarray) -> JaggedSequences:
        rows = np.take(ev.item_row, idx)  # [T] item of each token
        # np.take: along axis 0 it copies 32-byte rows ~2.5x faster than fancy indexing
        return JaggedSequences(
            emb_q=torch.from_numpy(np.take(self.item_emb_q, rows, axis=0)),  # [T, D]
            action=torch.from_numpy(np.take(ev.action, idx)),  # [T]
            surface=torch.from_numpy(np.take(ev.surface, idx)),  # [T]
            ts=torch.from_numpy(np.take(ev.ts, idx)),  # [T]
            offsets=torch.from_numpy(offsets),  # [U + 1]
            norm=torch.from_numpy(np.take(self.item_norm, rows)),  # [T]
        )

    def sequences(self, user_ids: np.ndarray, ts: np.ndarray, ll_before_rt: bool = False
                  ) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
        """(S_LL, S_RT, S_imp) for requests (user_ids[i], ts[i]), newest first.

        Unknown (cold) users get empty sequences. ``ll_before_rt``: S_LL without its tokens
        at or after the oldest S_RT token -- the part of it that
        :func:`transact.features.nn_features.build_s_all` searches (it cuts the same tokens
        itself, and keeps such a sequence whole, without a copy). The cut here is one
        binary search per request instead of a pass over every lifelong token.
        """
        cfg = self.cfg
        user_ids = np.asarray(user_ids, dtype=np.int64)
        t = np.asarray(ts, dtype=np.int64)
        rank, known = dense_rank(self._users, user_ids)

        a = self.actions
        lo, hi = self._bounds(a, rank, known, t)
        rt_idx, rt_off = _ranges(np.maximum(lo, hi - cfg.rt_cap), hi)
        t_ll = (t // cfg.ll_refresh_ms) * cfg.ll_refresh_ms if cfg.ll_refresh_ms else t
        _, hi_ll = self._bounds(a, rank, known, t_ll)
        ll_lo = np.maximum(lo, hi_ll - cfg.ll_cap)
        if ll_before_rt and len(a.ts):
            # S_RT's oldest event is rt_lo; lifelong events from the first one at its ts on
            # are left to the realtime segments (a user's events are in ts order).
            rt_lo = np.maximum(lo, hi - cfg.rt_cap)  # [U]
            oldest_rt_ts = a.ts[np.minimum(rt_lo, len(a.ts) - 1)]  # [U] (unused without S_RT)
            first_at = search_in_groups(a.ts, lo, hi, oldest_rt_ts, side="left")  # [U]
            hi_ll = np.where(rt_lo < hi, np.minimum(hi_ll, first_at), hi_ll)
        ll_idx, ll_off = _ranges(ll_lo, hi_ll)

        win_idx, win_off, engaged = self._imp_window(rank, known, t, IMP_LOOKBACK * cfg.imp_cap)
        req_of_tok = np.repeat(np.arange(len(t)), np.diff(win_off))
        unengaged = ~engaged
        # Keep each request's first imp_cap unengaged tokens (the window is newest first).
        rank_in_req = np.cumsum(unengaged) - 1
        first = np.concatenate([[0], np.cumsum(unengaged)])[win_off[:-1]]
        keep = unengaged & ((rank_in_req - np.repeat(first, np.diff(win_off))) < cfg.imp_cap)
        imp_idx = win_idx[keep]
        imp_off = np.zeros(len(t) + 1, dtype=np.int64)
        np.cumsum(np.bincount(req_of_tok[keep], minlength=len(t)), out=imp_off[1:])

        return (self._jagged(a, ll_idx, ll_off), self._jagged(a, rt_idx, rt_off),
                self._jagged(self.impressions, imp_idx, imp_off))

    def _imp_window(self, rank: np.ndarray, known: np.ndarray, t: np.ndarray, size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, offsets, engaged): each request's last ``size`` impressions before t,
        newest first; engaged = the user acted on the item after the impression, before t."""
        ilo, ihi = self._bounds(self.impressions, rank, known, t)
        idx, off = _ranges(np.maximum(ilo, ihi - size), ihi)
        engaged = self._imp_next_action[idx] < np.repeat(t, np.diff(off))
        return idx, off, engaged

    def impression_window(self, user_ids: np.ndarray, ts: np.ndarray, size: int
                          ) -> tuple[JaggedSequences, np.ndarray, np.ndarray]:
        """The last ``size`` impressions before each request, newest first, engaged or not
        (the window S_imp is cut from): ``(tokens, item_id [T], engaged [T] bool)``."""
        rank, known = dense_rank(self._users, np.asarray(user_ids, dtype=np.int64))
        idx, off, engaged = self._imp_window(rank, known, np.asarray(ts, dtype=np.int64), size)
        ev = self.impressions
        return self._jagged(ev, idx, off), self._item_ids[ev.item_row[idx]], engaged

    def item_emb_q_of(self, item_ids: np.ndarray) -> np.ndarray:
        """int8 [N, D] embeddings of the given items (clear error on unknown ids)."""
        return self.item_emb_q[self._item_rows(np.asarray(item_ids, dtype=np.int64), "candidates")]
