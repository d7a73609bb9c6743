"""Streaming updates: new actions / impressions pushed into the realtime and impression
features (online store, optionally appended to the offline sources)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from transact.data import schema as S
from transact.data.io import SchemaError
from transact.features.config import FeatureConfig
from transact.features.event_order import ACTION_TIES, IMPRESSION_TIES, event_order
from transact.features.feast.codec import Tokens, derive_imp, encode_tokens, split_blob
from transact.features.feast.offline import PartWriter, write_user_rows
from transact.features.feast.online import OnlineSequences
from transact.features.feast.store import (
    IMP_PUSH,
    IMP_VIEW,
    INDEX_VIEWS,
    OFFLINE_DIRS,
    RT_PUSH,
    RT_VIEW,
    TS_COL,
    USER_KEY,
    VIEW_FEATURES,
    as_store,
    read_manifest,
)
from transact.features.sequences import IMP_LOOKBACK


def _manifest_cfg(repo: Path, cfg: FeatureConfig | None) -> FeatureConfig:
    if cfg is not None:
        return cfg
    try:
        return FeatureConfig.from_dict(read_manifest(repo)["feature_config"])
    except FileNotFoundError:
        return FeatureConfig()


def _tokens_of(blob: bytes | None, with_extras: bool) -> dict[str, np.ndarray]:
    if blob is None:
        d: dict[str, np.ndarray] = {"ts": np.zeros(0, np.int64), "emb_q": np.zeros((0, S.EMB_DIM), np.int8),
             "action": np.zeros(0, np.uint8), "surface": np.zeros(0, np.int8)}
        if with_extras:
            d |= {"item_id": np.zeros(0, np.int64), "engaged": np.zeros(0, np.uint8)}
        return d
    return {k: v.copy() for k, v in split_blob(blob).items()}


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
    import pandas as pd
    from feast.data_source import PushMode

    from transact.data.io import conform

    if to not in ("online", "online_and_offline"):
        raise ValueError(f"to must be 'online' or 'online_and_offline', got {to!r}")
    store = as_store(store_or_repo)
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
    # per view: users, taus, blobs, lens
    out: dict[str, tuple[list, list, list, list]] = {RT_VIEW: ([], [], [], []), IMP_VIEW: ([], [], [], [])}
    final: dict[str, dict[int, int]] = {RT_VIEW: {}, IMP_VIEW: {}}
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
                out[RT_VIEW][0].append(u)
                out[RT_VIEW][1].append(t + 1)
                out[RT_VIEW][2].append(encode_tokens(**rt))
                out[RT_VIEW][3].append(len(rt["ts"]))
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
                out[IMP_VIEW][0].append(u)
                out[IMP_VIEW][1].append(t + 1)
                out[IMP_VIEW][2].append(blob)
                out[IMP_VIEW][3].append(int(derive_imp(tok, cfg.imp_cap).offsets[-1]))
        for view in (RT_VIEW, IMP_VIEW):
            us = out[view][0]
            if us and us[-1] == u:
                final[view][int(u)] = len(us) - 1

    summary: dict[str, Any] = {"users": int(len(users)), "actions": int(acts.num_rows), "impressions": int(imps.num_rows),
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
            ws = {v: PartWriter(repo / OFFLINE_DIRS[v], v, 1024) for v in (view, INDEX_VIEWS[view][0])}
            try:
                write_user_rows(ws, view, us, taus, blobs, lens)
                for w in ws.values():
                    w.close(ensure_one=False)
            except BaseException:
                for w in ws.values():
                    w.abort()
                raise
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
