"""HIT@3 (V2 §4.2.1) on hand-worked examples, AUC against brute force, bootstrap."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transact.model import metrics as M


def test_paper_example_repins_p1_and_p4_give_gamma_1():
    # chunk [p1..p6] already in score order; the user repins p1 and p4 -> gamma = 1
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    repin = np.array([1, 0, 0, 1, 0, 0])
    assert M.hit_at_k(np.zeros(6), np.zeros(6), score, repin[:, None]).tolist() == [1.0]


def test_hit_at_3_users_with_several_chunks_and_ties():
    # user 1: chunk 10 (5 items, ties), chunk 11 (2 items); user 2: chunk 10 (same request id,
    # other user -> its own chunk); user 3: one chunk without any label.
    user = np.array([1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    req = np.array([10, 10, 10, 10, 10, 11, 11, 10, 10, 10, 10, 12, 12, 12, 12])
    score = np.array([0.5, 0.9, 0.5, 0.5, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.4, 1, 1, 1, 1])
    # columns: repin, hide
    lab = np.zeros((15, 2))
    # chunk (1,10): ranking by score, ties by row: rows 1 (.9), 0, 2 | 3, 4
    lab[[0, 3], 0] = 1  # repins on row 0 (top 3) and row 3 (4th: tie lost by row order)
    lab[4, 1] = 1  # hide on the last item -> not in top 3
    # chunk (1,11): two items, both in the top 3
    lab[[5, 6], 0] = 1
    # chunk (2,10): order rows 10, 9, 8 | 7
    lab[7, 0] = 1  # 4th -> no hit
    lab[10, 1] = 1  # hide at the top
    top = M.topk_mask(user, req, score, 3)
    assert np.flatnonzero(top).tolist() == [0, 1, 2, 5, 6, 8, 9, 10, 11, 12, 13]
    users, totals = M.hits_per_user(user, req, score, lab, 3)
    assert users.tolist() == [1, 2, 3]
    assert totals.tolist() == [[3, 0], [0, 1], [0, 0]]  # user 1: 1 + 2 repins
    # HIT@3/h = sum_u sum_c gamma / |U|
    assert M.hit_at_k(user, req, score, lab).tolist() == pytest.approx([3 / 3, 1 / 3])


def test_ties_follow_input_row_order():
    score = np.ones(5)
    lab = np.array([0, 0, 0, 1, 1])[:, None]
    assert M.hit_at_k(np.zeros(5), np.zeros(5), score, lab).tolist() == [0.0]
    assert M.hit_at_k(np.zeros(5), np.zeros(5), score, lab[::-1]).tolist() == [2.0]


def test_ranking_score_uses_head_weights():
    probs = np.array([[0.2, 0.1, 0.9], [0.3, 0.3, 0.0]])
    s = M.ranking_score(probs, ("click", "repin", "hide"))  # click + repin - hide
    assert s.tolist() == pytest.approx([-0.6, 0.6])
    assert M.ranking_score(probs, ("click", "repin", "hide"), {"repin": 2.0}).tolist() == pytest.approx([0.2, 0.6])
    with pytest.raises(ValueError, match=r"heads the model lacks: \['save'\]"):
        M.ranking_score(probs, ("click", "repin", "hide"), {"save": 1.0})
    assert M.parse_score_weights("click=1, repin=2,hide=-0.5") == {"click": 1, "repin": 2, "hide": -0.5}


def brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    tot = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return tot / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40), levels=st.integers(1, 6))
def test_auc_matches_brute_force_pairs(seed, n, levels):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.integers(0, levels, n).astype(float)  # many ties
    if y.min() == y.max():
        assert np.isnan(M.auc(y, s))
    else:
        assert M.auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_log_loss():
    assert M.log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert np.isfinite(M.log_loss([1, 0], [0.0, 1.0]))


def test_bootstrap_ci_covers_the_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    totals = rng.poisson(2.0, (500, 2)).astype(float)
    lo, hi = M.bootstrap_mean_ci(totals, 400, seed=3)
    mean = totals.mean(0)
    assert (lo < mean).all() and (mean < hi).all()
    assert (hi - lo < 0.5).all()
    lo2, hi2 = M.bootstrap_mean_ci(totals, 400, seed=3)
    assert np.array_equal(lo, lo2) and np.array_equal(hi, hi2)


def test_paired_relative_change():
    rng = np.random.default_rng(0)
    base = rng.poisson(3.0, (400, 2)).astype(float) + 1
    better = base * 1.1  # +10% for every user: a paired bootstrap has (almost) no spread
    r = M.paired_relative_change(better, base, n_boot=200, seed=0)
    assert r["rel"] == pytest.approx([0.1, 0.1])
    assert r["lo"] == pytest.approx([0.1, 0.1]) and r["hi"] == pytest.approx([0.1, 0.1])
    noisy = base + rng.normal(0, 1, base.shape)
    r = M.paired_relative_change(noisy, base, n_boot=300, seed=0)
    assert (r["lo"] <= r["rel"]).all() and (r["rel"] <= r["hi"]).all()


def test_impression_diversity_is_the_top_k_intra_list_distance_summed_per_user():
    """Top 3 of each request by score: identical items add 0, orthogonal ones 1, a request of one
    item 0; a user's total is the sum over their requests, every user listed (as HIT@3)."""
    from transact.model.metrics import diversity_per_user

    e1, e2, e3 = np.eye(3, 32)[0] * 100, np.eye(3, 32)[1] * 100, np.eye(3, 32)[2] * 100
    rows = [  # (user, request, score, emb)
        (1, 10, 0.9, e1), (1, 10, 0.8, e2), (1, 10, 0.7, e3), (1, 10, 0.1, e1),  # orthogonal top 3: 1
        (1, 11, 0.9, e1), (1, 11, 0.8, e1), (1, 11, 0.7, e1), (1, 11, 0.6, e2),  # the same item 3 times: 0
        (2, 20, 0.5, e2),  # one item: 0
        (3, 30, 0.9, e1), (3, 30, 0.8, e1), (3, 30, 0.1, e2),  # top 3 = e1, e1, e2: (0 + 1 + 1) / 3
    ]
    u, r, s, e = (np.array(x) for x in zip(*rows))
    users, totals = diversity_per_user(u, r, s, e.astype(np.float64), k=3)
    np.testing.assert_array_equal(users, [1, 2, 3])
    np.testing.assert_allclose(totals, [1.0, 0.0, 2 / 3], atol=1e-12)
    perm = np.random.default_rng(0).permutation(len(rows))  # row order does not matter (no ties here)
    np.testing.assert_allclose(diversity_per_user(u[perm], r[perm], s[perm], e[perm], k=3)[1], totals, atol=1e-12)
    q = np.clip(np.round(e / 100 * 127), -127, 127).astype(np.int8)  # int8 codes: the cosine is scale-free
    np.testing.assert_allclose(diversity_per_user(u, r, s, q, k=3)[1], totals, atol=1e-12)
