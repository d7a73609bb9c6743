"""Label attribution: which impression an action belongs to -- the production join, once.

The rule
--------
An action of user ``u`` on item ``i`` at time ``t`` belongs to the **most recent
impression of ``i`` to ``u`` at or before ``t``**, when that impression is at most
``label_window_ms`` older than the action (``t - ts_impression <= label_window_ms``);
otherwise it belongs to no impression. An impression's label of action type ``a`` is 1
exactly when an action carrying bit ``a`` belongs to it.

So the same item shown again in a later request and engaged after that is the later
request's label, never the earlier one's (real feeds re-show items all the time); an
engagement logged at the impression's own ts belongs to it (RecBole's labels, window
1 ms); impressions of one item to one user at one ts are one impression (an action
belongs to each of those rows: no storage order decides between them).

The impressions a label is attached to are the request rows (a world's ``impressions``
table holds exactly those rows; validation checks it). Every place that attaches or
checks labels goes through :func:`attribute`: the simulator and the RecBole importer
label their requests with it, and validation's label checks
(:func:`transact.validation.links.label_links`) hold a log's own labels against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from transact.data import schema as S

_KEY = ["user_id", "item_id"]


@dataclass(frozen=True)
class Attribution:
    """What :func:`attribute` found.

    ``bits`` (uint8 [n_impressions]): OR of the action bitmasks that belong to each
    impression row (0 = nothing belongs to it); ``owner`` (int64 [n_actions]): the index
    of one impression row each action belongs to, -1 for none (with tied impressions it
    belongs to all of them: ``bits`` says so, ``owner`` names the first).
    """

    bits: np.ndarray
    owner: np.ndarray

    def labels(self) -> dict[str, np.ndarray]:
        """One uint8 0/1 column per :data:`~transact.data.schema.LABEL_COLUMNS`."""
        return {f"label_{a}": ((self.bits & S.ACTION_BIT[a]) > 0).astype(np.uint8) for a in S.EXPLICIT_ACTIONS}


def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def attribute(imp_user, imp_item, imp_ts, act_user, act_item, act_ts, act_bits, window_ms: int) -> Attribution:
    """Applies the rule (module docstring) to impressions ``(imp_user, imp_item, imp_ts)``
    and actions ``(act_user, act_item, act_ts, act_bits)`` (1-D integer arrays; any row
    order); ``window_ms`` is the label window (> 0)."""
    if window_ms <= 0:
        raise ValueError(f"label_window_ms must be > 0, got {window_ms}")
    n, m = len(imp_ts), len(act_ts)
    bits = np.zeros(n, dtype=np.uint8)
    owner = np.full(m, -1, dtype=np.int64)
    if n == 0 or m == 0:
        return Attribution(bits, owner)
    rows = pd.DataFrame({"user_id": _i64(imp_user), "item_id": _i64(imp_item), "ts": _i64(imp_ts)})
    # Tied rows (same user, item, ts) are one impression: attribute to the key, then fan out.
    key_of_row = rows.groupby(["user_id", "item_id", "ts"], sort=False).ngroup().to_numpy()
    first_row = np.full(key_of_row.max() + 1, n, dtype=np.int64)
    np.minimum.at(first_row, key_of_row, np.arange(n))
    keys = rows.iloc[first_row].assign(key=np.arange(len(first_row))).sort_values("ts", kind="stable")
    acts = pd.DataFrame({"user_id": _i64(act_user), "item_id": _i64(act_item), "ts": _i64(act_ts),
                         "i": np.arange(m)}).sort_values("ts", kind="stable")
    # backward + exact matches: the latest impression at or before the action; tolerance: the window
    hit = pd.merge_asof(acts, keys[_KEY + ["ts", "key"]], on="ts", by=_KEY, direction="backward",
                        allow_exact_matches=True, tolerance=int(window_ms))
    found = hit["key"].notna().to_numpy()
    act_i = hit["i"].to_numpy()[found]
    key = hit["key"].to_numpy()[found].astype(np.int64)
    key_bits = np.zeros(len(first_row), dtype=np.uint8)
    np.bitwise_or.at(key_bits, key, np.asarray(act_bits, dtype=np.uint8)[act_i])
    owner[act_i] = first_row[key]
    return Attribution(key_bits[key_of_row], owner)


def label_requests(requests: dict[str, np.ndarray], actions: dict[str, np.ndarray],
                   window_ms: int) -> dict[str, np.ndarray]:
    """The ``label_*`` columns of request rows (``user_id``, ``item_id``, ``ts`` arrays)
    from an action log (``user_id``, ``item_id``, ``ts``, ``action``) by the rule."""
    return attribute(requests["user_id"], requests["item_id"], requests["ts"], actions["user_id"],
                     actions["item_id"], actions["ts"], actions["action"], window_ms).labels()
