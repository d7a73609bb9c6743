"""The label attribution rule (``transact.data.labels``), case by case and against a
brute-force reading of it; the simulator's and the RecBole importer's labels are the
rule's, whatever window at least as long as theirs is used to check them."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from transact.data import schema as S
from transact.data.labels import attribute, label_requests

CLICK, REPIN, HIDE = S.ACTION_BIT["click"], S.ACTION_BIT["repin"], S.ACTION_BIT["hide"]
W = 1_000


def _attr(imps, acts, window=W):
    """imps: [(user, item, ts)], acts: [(user, item, ts, bits)]."""
    iu, ii, it = (np.array(c, dtype=np.int64) for c in zip(*imps)) if imps else [np.zeros(0, np.int64)] * 3
    au, ai, at, ab = (np.array(c, dtype=np.int64) for c in zip(*acts)) if acts else [np.zeros(0, np.int64)] * 4
    return attribute(iu, ii, it, au, ai, at, ab, window)


def test_an_engagement_after_a_reshow_belongs_to_the_later_showing():
    a = _attr([(1, 7, 0), (1, 7, 500), (1, 8, 0)], [(1, 7, 600, CLICK)])
    assert a.bits.tolist() == [0, CLICK, 0] and a.owner.tolist() == [1]


def test_own_ts_counts_the_window_end_counts_one_ms_later_does_not():
    a = _attr([(1, 7, 100), (2, 7, 100), (3, 7, 100)], [(1, 7, 100, CLICK), (2, 7, 100 + W, REPIN),
                                                        (3, 7, 101 + W, HIDE)])
    assert a.bits.tolist() == [CLICK, REPIN, 0] and a.owner.tolist() == [0, 1, -1]


def test_before_any_showing_and_other_users_items_belong_to_nothing():
    a = _attr([(1, 7, 100)], [(1, 7, 99, CLICK), (2, 7, 150, CLICK), (1, 8, 150, CLICK)])
    assert a.bits.tolist() == [0] and a.owner.tolist() == [-1, -1, -1]


def test_tied_showings_are_one_impression():
    """The same item shown to the same user at one ts (two rows): no row order decides."""
    a = _attr([(1, 7, 100), (1, 8, 100), (1, 7, 100)], [(1, 7, 150, CLICK), (1, 7, 160, REPIN)])
    assert a.bits.tolist() == [CLICK | REPIN, 0, CLICK | REPIN] and a.owner.tolist() == [0, 0]


def test_label_columns_and_window_must_be_positive():
    req = {"user_id": np.array([1, 1]), "item_id": np.array([7, 8]), "ts": np.array([0, 0])}
    act = {"user_id": np.array([1]), "item_id": np.array([8]), "ts": np.array([5]), "action": np.array([CLICK | REPIN])}
    labels = label_requests(req, act, W)
    assert list(labels) == list(S.LABEL_COLUMNS)
    assert labels["label_click"].tolist() == [0, 1] and labels["label_repin"].tolist() == [0, 1]
    assert labels["label_hide"].dtype == np.uint8 and labels["label_hide"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="label_window_ms must be > 0"):
        label_requests(req, act, 0)


def _brute(imps, acts, window):
    """The rule read literally: per action, the latest showing of (user, item) at or before it."""
    bits = [0] * len(imps)
    for u, i, t, b in acts:
        seen = [k for k, (iu, ii, it) in enumerate(imps) if (iu, ii) == (u, i) and it <= t]
        if not seen:
            continue
        latest = max(imps[k][2] for k in seen)
        if t - latest <= window:
            for k in seen:
                if imps[k][2] == latest:
                    bits[k] |= b
    return bits


event = st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 40))  # (user, item, ts)
action = st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 40),
                   st.sampled_from([CLICK, REPIN, HIDE, CLICK | REPIN]))


@settings(max_examples=200, deadline=None)
@given(imps=st.lists(event, max_size=12), acts=st.lists(action, max_size=12), window=st.integers(1, 20),
       seed=st.integers(0, 10))
def test_matches_the_rule_read_literally_in_any_row_order(imps, acts, window, seed):
    a = _attr(imps, acts, window)
    assert a.bits.tolist() == _brute(imps, acts, window)
    rng = np.random.default_rng(seed)
    p, q = rng.permutation(len(imps)), rng.permutation(len(acts))
    b = _attr([imps[k] for k in p], [acts[k] for k in q], window)
    assert b.bits.tolist() == [a.bits[k] for k in p]


@pytest.mark.parametrize("window", ["own", S.DEFAULT_LABEL_WINDOW_MS])
def test_simulated_labels_are_the_rules(tmp_path_factory, window):
    """Every engagement comes within the world's label window and before the user's next
    request, so the rule gives each row its own engagement at the world's window and at
    any longer one (the 1 h default a re-import without world.json uses)."""
    from transact.data.simulator import get_profile, simulate

    out = tmp_path_factory.mktemp("sim") / "w"
    summary = simulate(get_profile("tiny"), out, seed=3, progress=False)
    req = pq.read_table(out / "requests.parquet")
    act = pq.read_table(out / "actions.parquet")
    w = summary["label_window_ms"] if window == "own" else window
    got = label_requests({c: req.column(c).to_numpy() for c in ("user_id", "item_id", "ts")},
                         {c: act.column(c).to_numpy() for c in ("user_id", "item_id", "ts", "action")}, w)
    for c in S.LABEL_COLUMNS:
        assert np.array_equal(got[c], req.column(c).to_numpy()), c
    assert sum(int(got[c].sum()) for c in S.LABEL_COLUMNS) > 0
