"""A large, clean, schema-conform world built with numpy in seconds (no behaviour model):
the validation benchmark's input (:func:`synthetic_world`)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from transact.data import schema as S
from transact.data.io import table_path
from transact.data.world import publishing
from transact.validation.corruption import DAY_MS, _fixed_list, _write


def synthetic_world(out: str | os.PathLike, n_items: int = 200_000, n_actions: int = 1_000_000,
                    n_request_rows: int = 200_000, chunk: int = 8, n_users: int = 20_000,
                    seed: int = 0, t0_ms: int = 1_704_067_200_000, days: int = 30) -> Path:
    """A large, clean, schema-conform world built with numpy in seconds (no behaviour
    model): the validation benchmark's input. Impressions mirror the requests."""
    from transact.data.quantization import quantize

    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    span = days * DAY_MS
    emb = (rng.normal(size=(n_items, S.EMB_DIM)) * 0.12).astype(np.float16)
    q = quantize(emb.astype(np.float32))
    item_ids = np.arange(n_items, dtype=np.int64)
    items = pa.table({"item_id": item_ids, "topic": np.zeros(n_items, np.int32),
                      "emb": _fixed_list(emb, pa.float16()), "emb_q": _fixed_list(q, pa.int8())},
                     schema=S.ITEMS)
    n_req = n_request_rows // chunk
    n = n_req * chunk
    req_user = rng.integers(0, n_users, n_req)
    req_ts = t0_ms + rng.integers(0, span, n_req)
    cand = (rng.integers(0, n_items, n_req)[:, None] + np.arange(chunk)[None, :] * 7) % n_items
    common = {"request_id": np.repeat(np.arange(n_req, dtype=np.int64), chunk),
              "user_id": np.repeat(req_user, chunk), "item_id": cand.reshape(-1),
              "ts": np.repeat(req_ts, chunk),
              "surface": np.repeat(rng.integers(0, len(S.SURFACES), n_req), chunk).astype(np.int8),
              "position": np.tile(np.arange(chunk, dtype=np.int16), n_req)}
    labels = {c: (rng.random(n) < p).astype(np.uint8)
              for c, p in zip(S.LABEL_COLUMNS, (0.1, 0.07, 0.015, 0.09))}
    hide = labels["label_hide"] == 1
    for a in S.CONTRADICTS_HIDE:  # a hidden item is not also clicked or repinned
        labels[f"label_{a}"][hide] = 0
    requests = pa.table({**common, **labels}, schema=S.REQUESTS)
    # Every label's engagement is in the action log, a second after its request; the rest
    # of the log is background activity.
    bits = sum((labels[f"label_{a}"].astype(np.uint8) * np.uint8(S.ACTION_BIT[a]) for a in S.EXPLICIT_ACTIONS),
               np.zeros(n, np.uint8))
    eng = np.flatnonzero(bits)
    n_bg = max(0, n_actions - len(eng))
    actions = pa.table({
        "user_id": np.concatenate([rng.integers(0, n_users, n_bg), common["user_id"][eng]]),
        "item_id": np.concatenate([rng.integers(0, n_items, n_bg), common["item_id"][eng]]),
        "ts": np.concatenate([t0_ms + np.sort(rng.integers(0, span, n_bg)), common["ts"][eng] + 1_000]),
        "action": np.concatenate([rng.choice(np.array([1, 2, 4, 8, 9, 3], np.uint8), n_bg,
                                             p=[0.45, 0.2, 0.08, 0.17, 0.06, 0.04]), bits[eng]]),
        "surface": np.concatenate([rng.integers(0, len(S.SURFACES), n_bg).astype(np.int8),
                                   common["surface"][eng]])}, schema=S.ACTIONS_TABLE)
    impressions = pa.table({k: common[k] for k in S.IMPRESSIONS.names}, schema=S.IMPRESSIONS)
    with publishing(out) as stage:  # sealed and swapped in whole, like every world
        for name, t in (("items", items), ("actions", actions), ("impressions", impressions),
                        ("requests", requests)):
            _write(table_path(stage, name), t)
    return out
