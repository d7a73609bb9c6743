"""The total order of events, and exact per-user searches in it (the feature contract).

Sequences must be a pure function of the *set* of events -- never of row order,
partitioning or engine. Events of one user often share a timestamp (every impression
of one request does), so sorting by (user, ts) alone leaves ties to storage order. Every
place that orders events uses :func:`event_order`, a total order over *all* columns:

    actions:     (user_id, ts, item_id, action, surface)
    impressions: (user_id, ts, request_id, position, item_id, surface)

Rows equal in every column are indistinguishable, so any order of them gives the same
sequences. Within a request, a lower position sorts as older; newest-first sequences
then hold the request's last position first.

Searches are exact at any id and count the schema allows (int64 ids, any number of
users): groups are dense ranks found by sorting, never bits packed into one int64 key
(42 bits of time left 21 for the user, and past ~2M users one user's events appeared in
another's sequence). :func:`search_in_groups` is a binary search run for every query at
once inside its own group's slice.
"""
from __future__ import annotations

import numpy as np

#: Tie-break columns after (user_id, ts), most significant first.
ACTION_TIES: tuple[str, ...] = ("item_id", "action", "surface")
IMPRESSION_TIES: tuple[str, ...] = ("request_id", "position", "item_id", "surface")


def event_order(user: np.ndarray, ts: np.ndarray, *ties: np.ndarray) -> np.ndarray:
    """The permutation sorting events by (user, ts, *ties), each ascending."""
    # np.lexsort takes its keys least significant first
    return np.lexsort((*reversed([np.asarray(t) for t in ties]), np.asarray(ts), np.asarray(user)))


def group_offsets(sorted_group: np.ndarray, n_groups: int) -> np.ndarray:
    """int64 [n_groups + 1]: rows of group g are ``[off[g], off[g + 1])`` of an array
    sorted by the dense group id ``sorted_group`` (values in ``[0, n_groups)``)."""
    off = np.zeros(n_groups + 1, dtype=np.int64)
    if len(sorted_group):
        np.cumsum(np.bincount(sorted_group, minlength=n_groups), out=off[1:])
    return off


def search_in_groups(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, x: np.ndarray,
                     side: str = "left") -> np.ndarray:
    """For each query i, ``np.searchsorted(values[lo[i]:hi[i]], x[i], side) + lo[i]``.

    ``values`` must be ascending within each slice. All queries bisect together:
    ceil(log2(longest slice)) + 1 vectorised steps, exact for any int64 values.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    lo = np.asarray(lo, dtype=np.int64).copy()
    hi = np.asarray(hi, dtype=np.int64).copy()
    x = np.asarray(x)
    active = np.flatnonzero(lo < hi)
    while len(active):
        a_lo, a_hi = lo[active], hi[active]
        mid = (a_lo + a_hi) >> 1
        v, q = values[mid], x[active]
        right = (v < q) if side == "left" else (v <= q)
        lo[active] = np.where(right, mid + 1, a_lo)
        hi[active] = np.where(right, a_hi, mid)
        active = active[lo[active] < hi[active]]
    return lo


def dense_rank(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rank, known): the position of each value in the sorted unique ``keys``, and
    whether it is there (unknown values get rank 0, ``known`` False)."""
    values = np.asarray(values, dtype=keys.dtype if len(keys) else np.int64)
    if not len(keys):
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    rank = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return rank.astype(np.int64), keys[rank] == values


def pair_ids(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Dense ids of the (x, y) pairs of two tables (equal pairs, equal ids), exact for any
    int64 x, y: ``(ids of a, ids of b, number of distinct pairs)``."""
    x = np.concatenate([a[0], b[0]]).astype(np.int64)
    y = np.concatenate([a[1], b[1]]).astype(np.int64)
    o = np.lexsort((y, x))
    new = np.ones(len(o), dtype=bool)
    if len(o) > 1:
        new[1:] = (x[o][1:] != x[o][:-1]) | (y[o][1:] != y[o][:-1])
    ids = np.empty(len(o), dtype=np.int64)
    ids[o] = np.cumsum(new) - 1
    n_a = len(a[0])
    return ids[:n_a], ids[n_a:], int(new.sum())
