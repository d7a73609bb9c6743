"""Point-in-time sequences: equal to a brute-force definition, and nothing at or after t leaks."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from helpers import make_events, make_items
from transact.data.io import SchemaError
from transact.features.config import DAY_MS, FeatureConfig
from transact.features.event_order import ACTION_TIES, IMPRESSION_TIES
from transact.features.nn_features import build_s_all
from transact.features.sequences import IMP_LOOKBACK, EventStore
from transact.kernels import dispatch

T0 = 1_700_000_000_000


def brute_force(items, actions, impressions, cfg: FeatureConfig, user: int, t: int):
    """Row-by-row definition of (S_LL, S_RT, S_imp) as (item_id, ts) lists, newest first
    (events of one ts in the total order of every column, never table order)."""
    a = actions.to_pandas()
    a = a[a.user_id == user].sort_values(["ts", *ACTION_TIES], kind="stable")
    before = a[a.ts < t]
    rt = before.iloc[::-1].iloc[: cfg.rt_cap]
    t_ll = (t // cfg.ll_refresh_ms) * cfg.ll_refresh_ms if cfg.ll_refresh_ms else t
    ll = a[a.ts < t_ll].iloc[::-1].iloc[: cfg.ll_cap]
    im = impressions.to_pandas()
    im = im[(im.user_id == user) & (im.ts < t)].sort_values(["ts", *IMPRESSION_TIES], kind="stable").iloc[::-1]
    im = im.iloc[: IMP_LOOKBACK * cfg.imp_cap]
    keep = []
    for row in im.itertuples():
        engaged = ((before.item_id == row.item_id) & (before.ts >= row.ts)).any()
        if not engaged:
            keep.append((row.item_id, row.ts))
    as_list = lambda df: list(zip(df.item_id.tolist(), df.ts.tolist()))  # noqa: E731
    return as_list(ll), as_list(rt), keep[: cfg.imp_cap]


def as_pairs(store: EventStore, seq, u: int):
    lo, hi = int(seq.offsets[u]), int(seq.offsets[u + 1])
    rows = [np.flatnonzero((store.item_emb_q == seq.emb_q[i].numpy()).all(1)) for i in range(lo, hi)]
    return rows, seq.ts[lo:hi].tolist()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ll_cap=st.integers(1, 30), rt_cap=st.integers(1, 12),
       imp_cap=st.integers(1, 8), refresh=st.sampled_from([0, DAY_MS, 3_600_000]))
def test_sequences_match_brute_force_and_never_leak(seed, ll_cap, rt_cap, imp_cap, refresh):
    rng = np.random.default_rng(seed)
    items = make_items(40, rng)
    actions, impressions = make_events(items, n_users=4, n_actions=150, n_imps=200, rng=rng)
    cfg = FeatureConfig(ll_cap=ll_cap, rt_cap=rt_cap, imp_cap=imp_cap, r=min(2, rt_cap),
                        k_ll=3, k_rt=2, k_imp=2, ll_refresh_ms=refresh)
    store = EventStore(items, actions, impressions, cfg)
    # Requests at random times, some exactly at an event's timestamp, one unknown user.
    users = np.array([0, 11, 22, 33, 999], dtype=np.int64)
    ts = T0 + rng.integers(0, 10 * 86_400_000, len(users))
    ts[1] = actions.column("ts").to_numpy()[0]
    ts[2] = impressions.column("ts").to_numpy()[0]
    ll, rt, imp = store.sequences(users, ts)
    item_ids = items.column("item_id").to_numpy()
    for u, (user, t) in enumerate(zip(users, ts)):
        exp_ll, exp_rt, exp_imp = brute_force(items, actions, impressions, cfg, int(user), int(t))
        for seq, exp in ((ll, exp_ll), (rt, exp_rt), (imp, exp_imp)):
            lo, hi = int(seq.offsets[u]), int(seq.offsets[u + 1])
            got_ts = seq.ts[lo:hi].numpy()
            assert (got_ts < t).all(), "an event at or after the request time leaked in"
            assert list(got_ts) == [e[1] for e in exp]
            # Embeddings are the items' own.
            exp_rows = np.searchsorted(item_ids, [e[0] for e in exp])
            np.testing.assert_array_equal(seq.emb_q[lo:hi].numpy(), store.item_emb_q[exp_rows])
        if refresh:
            lo, hi = int(ll.offsets[u]), int(ll.offsets[u + 1])
            assert (ll.ts[lo:hi].numpy() < (t // refresh) * refresh).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ll_cap=st.integers(1, 40), rt_cap=st.integers(0, 12),
       refresh=st.sampled_from([0, DAY_MS, 3_600_000]), dense_ids=st.booleans())
def test_lifelong_cut_before_the_realtime_tokens_is_build_s_all_s_cut(seed, ll_cap, rt_cap, refresh, dense_ids):
    """``sequences(..., ll_before_rt=True)``'s S_LL holds exactly the tokens build_s_all
    keeps of the whole S_LL (those older than the oldest S_RT token, ties of one ts
    included), so logging can hand it over uncut; the other two sequences are unchanged.
    Item ids dense or not (the store's two item lookups)."""
    import torch

    rng = np.random.default_rng(seed)
    items = make_items(40, rng)
    if dense_ids:  # 0, 1, 2, ... (make_items' ids are sparse)
        items = items.set_column(0, "item_id", pa.array(np.arange(items.num_rows, dtype=np.int64)))
    actions, impressions = make_events(items, n_users=4, n_actions=150, n_imps=200, rng=rng)
    a_ts = actions.column("ts").to_numpy().copy()
    a_ts[rng.random(len(a_ts)) < 0.3] = a_ts[0]  # many events share one ts
    actions = actions.set_column(actions.schema.get_field_index("ts"), "ts", pa.array(a_ts))
    cfg = FeatureConfig(ll_cap=ll_cap, rt_cap=rt_cap, imp_cap=4, r=min(2, rt_cap), k_ll=3, k_rt=2, k_imp=2,
                        ll_refresh_ms=refresh)
    store = EventStore(items, actions, impressions, cfg)
    users = np.array([0, 11, 22, 33, 999, 0], dtype=np.int64)
    ts = T0 + rng.integers(0, 10 * 86_400_000, len(users))
    ts[1] = a_ts[0] + 1
    ll, rt, imp = store.sequences(users, ts)
    cut, rt2, imp2 = store.sequences(users, ts, ll_before_rt=True)
    oldest_rt = torch.full((len(users),), torch.iinfo(torch.int64).max)
    has_rt = rt.lengths > 0
    oldest_rt[has_rt] = rt.ts[rt.offsets[1:][has_rt] - 1]
    exp = ll.select(ll.ts < torch.repeat_interleave(oldest_rt, ll.lengths))  # build_s_all's cut
    for a, b in ((cut, exp), (rt2, rt), (imp2, imp)):
        for f in ("emb_q", "action", "surface", "ts", "offsets", "norm"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        # the store's per-item norms are the NN search's own, token by token (select keeps them aligned)
        assert torch.equal(a.norm, dispatch.token_norms(a.emb_q))
    # build_s_all cuts a whole S_LL and passes a cut one as it is: the same S_all either way
    cand = torch.from_numpy(store.item_emb_q[rng.integers(0, items.num_rows, 3 * len(users))])  # [N, D]
    cand_off = torch.arange(0, 3 * len(users) + 1, 3)
    whole = build_s_all(ll, rt, imp, cand, cand_off, torch.from_numpy(ts), cfg)
    pre_cut = build_s_all(cut, rt2, imp2, cand, cand_off, torch.from_numpy(ts), cfg)
    for f in ("emb_q", "action", "surface", "age_s", "seg_len"):
        assert torch.equal(getattr(whole, f), getattr(pre_cut, f)), f


def test_newest_first_and_caps():
    rng = np.random.default_rng(0)
    items = make_items(10, rng)
    actions, impressions = make_events(items, 1, 50, 50, rng)
    cfg = FeatureConfig(ll_cap=20, rt_cap=5, imp_cap=4, r=2, k_ll=2, k_rt=2, k_imp=2, ll_refresh_ms=0)
    store = EventStore(items, actions, impressions, cfg)
    ll, rt, imp = store.sequences(np.array([0]), np.array([T0 + 20 * 86_400_000]))
    assert ll.lengths.tolist() == [20] and rt.lengths.tolist() == [5] and int(imp.lengths[0]) <= 4
    for seq in (ll, rt, imp):
        assert (seq.ts[1:] <= seq.ts[:-1]).all()


def test_unknown_item_is_named():
    rng = np.random.default_rng(0)
    items = make_items(10, rng)
    actions, impressions = make_events(items, 2, 10, 10, rng)
    bad = actions.set_column(1, "item_id", pa.array(np.full(actions.num_rows, 123456), pa.int64()))
    with pytest.raises(SchemaError, match="item_id.*123456"):
        EventStore(items, bad, impressions)
