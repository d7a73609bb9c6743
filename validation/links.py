"""Cross-table facts of a world, per row, for validation's named expectations.

A world's tables describe one log: each labelled request row is an impression of a
candidate, and each positive label is an engagement the actions table holds too. The
faults a real pipeline produces break these links while every table on its own still
looks fine:

* a label no engagement backs: none in ``actions`` within ``label_window_ms`` after the
  request, or only one that belongs to a later showing of the item (labels joined from
  the wrong source or onto the wrong impression, or a clock / time-zone shift between
  the request log and the action log);
* the same engagement found only *before* the request, owned by no earlier showing
  (what a shift of the request clock produces): the label leaks into the realtime
  sequence S_RT of its own request;
* an engagement that belongs to the row and that no label counts (labels dropped);
* impressions that match no request row, and request rows without their impression.

Which row an engagement belongs to is the production join of :mod:`transact.data.labels`
(the most recent showing of the item to the user at or before it, within the label
window), so an item re-shown in a later request and engaged there counts for the later
request only.

Everything is exact and vectorised: ``pandas.merge_asof`` by (user_id, item_id) over
``ts`` -- no packed integer keys, so any int64 id works.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from transact.data import schema as S
from transact.data.labels import attribute

_KEY = ("user_id", "item_id")


def _frame(table: pa.Table, columns: tuple[str, ...]) -> pd.DataFrame | None:
    """The columns as a pandas frame of int64 with an ``row`` index column, or None when a
    column is absent or not an integer column (the type checks report those)."""
    for c in columns:
        if c not in table.column_names or not pa.types.is_integer(table.column(c).type):
            return None
    df = pd.DataFrame({c: table.column(c).to_pandas() for c in columns})
    df["row"] = np.arange(len(df))
    return df.dropna()  # rows with null keys are the not-null checks' business


def _as_int(df: pd.DataFrame, columns) -> pd.DataFrame:
    return df.astype({c: np.int64 for c in columns})


def label_links(requests: pa.Table, actions: pa.Table, window_ms: int,
                leak_window_ms: int) -> dict[str, np.ndarray] | None:
    """Per request row (bool [N]), or None when the keys cannot be read. Actions are
    attributed to request rows by the production join (:mod:`transact.data.labels`: an
    action belongs to the most recent showing of its item to its user at or before it,
    within ``window_ms``), and each row's labels are held against what belongs to it:

    * ``label_unbacked``: a positive label of a type no action that belongs to the row
      carries (none logged in the window, or it came after a later showing of the item);
    * ``label_before_only``: an unbacked positive label whose engagement is logged in
      ``[ts - leak_window_ms, ts)`` instead, and belongs to no earlier showing (a clock
      shift; an earlier showing's own engagement is not one);
    * ``label_missed``: an action that belongs to the row carries a type its label does
      not count.
    """
    cols = ("user_id", "item_id", "ts")
    req = _frame(requests, cols)
    act = _frame(actions, cols + ("action",))
    if req is None or act is None:
        return None
    n = requests.num_rows
    out = {k: np.zeros(n, dtype=bool) for k in ("label_unbacked", "label_before_only", "label_missed")}
    if not len(req):
        return out
    req = _as_int(req, cols)
    act = _as_int(act, cols + ("action",))
    rows = req["row"].to_numpy()
    owned = attribute(req["user_id"], req["item_id"], req["ts"], act["user_id"], act["item_id"], act["ts"],
                      act["action"].to_numpy() & S.EXPLICIT_MASK, window_ms)
    orphans = act[owned.owner < 0]  # actions no showing owns: where a shifted clock puts engagements
    for a in S.EXPLICIT_ACTIONS:
        label = f"label_{a}"
        if label not in requests.column_names:
            continue
        lab = requests.column(label).to_numpy(zero_copy_only=False)[rows] == 1  # [n_req] in req's order
        has = (owned.bits & S.ACTION_BIT[a]) > 0
        unbacked = lab & ~has
        out["label_unbacked"][rows] |= unbacked
        if unbacked.any():
            out["label_before_only"][rows] |= unbacked & _orphan_before(req, orphans, a, leak_window_ms)
        out["label_missed"][rows] |= ~lab & has
    return out


def _orphan_before(req: pd.DataFrame, orphans: pd.DataFrame, action: str, leak_window_ms: int) -> np.ndarray:
    """bool [len(req)]: an action of type ``action`` that no showing owns is logged on the
    row's (user_id, item_id) in ``[ts - leak_window_ms, ts)``."""
    cols = ["user_id", "item_id", "ts"]
    ev = orphans.loc[(orphans["action"].to_numpy() & S.ACTION_BIT[action]) > 0, cols]
    ev = ev.assign(found=ev["ts"]).sort_values("ts", kind="stable")
    left = req[cols].assign(i=np.arange(len(req))).sort_values("ts", kind="stable")
    hit = pd.merge_asof(left, ev, on="ts", by=list(_KEY), direction="backward", allow_exact_matches=False,
                        tolerance=int(leak_window_ms))
    out = np.zeros(len(req), dtype=bool)
    out[hit["i"].to_numpy()] = hit["found"].notna().to_numpy()
    return out


def impression_links(impressions: pa.Table, requests: pa.Table) -> dict[str, np.ndarray] | None:
    """``impression_matched`` (bool [impressions]): a request row has the same
    (request_id, item_id); ``request_impressed`` (bool [requests]): the reverse. None when
    the keys cannot be read. Rows with null keys count as matched (the not-null checks
    report them)."""
    cols = ("request_id", "item_id")
    imp, req = _frame(impressions, cols), _frame(requests, cols)
    if imp is None or req is None:
        return None
    imp_ix = pd.MultiIndex.from_frame(_as_int(imp, cols)[list(cols)])
    req_ix = pd.MultiIndex.from_frame(_as_int(req, cols)[list(cols)])
    out = {"impression_matched": np.ones(impressions.num_rows, dtype=bool),
           "request_impressed": np.ones(requests.num_rows, dtype=bool)}
    out["impression_matched"][imp["row"].to_numpy()] = imp_ix.isin(req_ix)
    out["request_impressed"][req["row"].to_numpy()] = req_ix.isin(imp_ix)
    return out
