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
    keys = [np.asarray(user), np.asarray(ts), *(np.asarray(t) for t in ties)]  # most significant first
    if _sorted_lex(keys):
        # Tables are usually written in this order already: checking costs a few vectorised
        # comparisons, a lexsort of 1.5M actions 0.4 s. The identity is what the (stable)
        # lexsort would return for sorted rows, equal rows included.
        return np.arange(len(keys[0]), dtype=np.int64)
    # np.lexsort takes its keys least significant first
    return np.lexsort(keys[::-1])


def _sorted_lex(keys: list[np.ndarray]) -> bool:
    """Whether consecutive rows are non-decreasing in the lexicographic order of ``keys``
    (most significant first)."""
    n = len(keys[0])
    if n < 2:
        return True
    undecided = np.ones(n - 1, dtype=bool)  # [n - 1] rows i, i + 1 equal on the keys so far
    for k in keys:
        a, b = k[:-1], k[1:]
        if np.any(undecided & (a > b)):
            return False
        undecided &= a == b
    return True


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
    o = pair_order(x, y)
    new = np.ones(len(o), dtype=bool)
    if len(o) > 1:
        new[1:] = (x[o][1:] != x[o][:-1]) | (y[o][1:] != y[o][:-1])
    ids = np.empty(len(o), dtype=np.int64)
    ids[o] = np.cumsum(new) - 1
    n_a = len(a[0])
    return ids[:n_a], ids[n_a:], int(new.sum())


def pair_order(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A permutation sorting (x, y) int pairs ascending (equal pairs in any order). Where the
    two ranges fit together in 63 bits, the pairs sort as one int64 key
    ``(x - min x) * span_y + (y - min y)`` -- the same order, at a third of a two-key
    lexsort's time; anything else goes through ``np.lexsort``."""
    if len(x):
        x0, y0 = int(x.min()), int(y.min())
        span_x, span_y = int(x.max()) - x0 + 1, int(y.max()) - y0 + 1
        if span_x * span_y < 2**63:
            return np.argsort((x - x0) * span_y + (y - y0))
    return np.lexsort((y, x))
