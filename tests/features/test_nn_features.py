"""The NN-feature contract (Eq. 2-3) against brute force, on de-duplicated inputs."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings, strategies as st

from transact.data.quantization import dequantize
from transact.data.schema import LABEL_COLUMNS
from transact.features.config import FeatureConfig
from transact.features.nn_features import (
    PAD_AGE,
    JaggedSequences,
    arrow_to_s_all,
    build_s_all,
    s_all_to_arrow,
    valid_mask,
)
from transact.kernels.pytorch.nn_search import nn_search


def random_jagged(rng, lens, dup=False, t_req=None):
    T = int(sum(lens))
    emb = rng.integers(-127, 128, (T, 32)).astype(np.int8)
    if dup and T > 2:
        emb[1::3] = emb[0]  # exact ties
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ts = np.concatenate([np.sort(rng.integers(0, 10**6, n))[::-1] for n in lens]) if T else np.zeros(0)
    return JaggedSequences(
        torch.from_numpy(emb), torch.from_numpy(rng.integers(1, 32, T).astype(np.uint8)),
        torch.from_numpy(rng.integers(0, 4, T).astype(np.int8)), torch.from_numpy(ts.astype(np.int64)),
        torch.from_numpy(offsets),
    )


def brute_nn(seq_q: np.ndarray, cand: np.ndarray, k: int):
    """Sorted (score desc, index asc) list of the k best (index, score)."""
    s = seq_q.astype(np.float64) * (0.65 / 127)
    s = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    c = cand / max(np.linalg.norm(cand), 1e-12)
    scores = s @ c
    order = sorted(range(len(scores)), key=lambda i: (-round(scores[i], 5), i))
    return [(i, scores[i]) for i in order[:k]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_users=st.integers(1, 4), k=st.integers(1, 9),
       dup=st.booleans())
def test_nn_search_matches_brute_force(seed, n_users, k, dup):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 15, n_users)
    seq = random_jagged(rng, lens, dup)
    ncand = rng.integers(0, 4, n_users)
    cand = rng.normal(size=(int(ncand.sum()), 32)).astype(np.float32)
    cand_off = torch.from_numpy(np.concatenate([[0], np.cumsum(ncand)]).astype(np.int64))
    idx, score = nn_search(seq.emb_q, seq.offsets, torch.from_numpy(cand), cand_off, k)
    assert idx.shape == (len(cand), k) and score.dtype == torch.float32
    for u in range(n_users):
        sq = seq.emb_q[seq.offsets[u]:seq.offsets[u + 1]].numpy()
        for n in range(int(cand_off[u]), int(cand_off[u + 1])):
            exp = brute_nn(sq, cand[n], k)
            got_i = idx[n].tolist()
            assert got_i[len(exp):] == [-1] * (k - len(exp))
            assert torch.isinf(score[n, len(exp):]).all()
            np.testing.assert_allclose(score[n, : len(exp)].numpy(), [s for _, s in exp], atol=1e-5)
            # Indices agree wherever the score is not tied with a neighbour within tolerance.
            exp_i = [i for i, _ in exp]
            assert sorted(got_i[: len(exp)]) == sorted(exp_i) or np.allclose(
                sorted(score[n, : len(exp)].tolist()), sorted(s for _, s in exp), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_users=st.integers(1, 4), k=st.integers(1, 9), dup=st.booleans())
def test_int8_dot_path_equals_the_float_path(seed, n_users, k, dup):
    """Candidates given as int8 codes take the int8 GEMM: indices and scores are bit-equal
    to the fp32 product's (int8 dots are exact either way), ties included."""
    from unittest import mock

    import transact.kernels.pytorch.nn_search as nns

    rng = np.random.default_rng(seed)
    seq = random_jagged(rng, rng.integers(0, 40, n_users), dup)
    ncand = rng.integers(0, 5, n_users)
    cand = torch.from_numpy(rng.integers(-128, 128, (int(ncand.sum()), 32)).astype(np.float32))
    if dup and len(cand) and seq.emb_q.shape[0]:
        cand[0] = seq.emb_q[0].float()  # exact match with tied tokens
    cand_off = torch.from_numpy(np.concatenate([[0], np.cumsum(ncand)]).astype(np.int64))
    assert nns._is_int8_valued(cand) and nns._int8_dots_available(seq.emb_q)
    idx, score = nn_search(seq.emb_q, seq.offsets, cand, cand_off, k)
    with mock.patch.object(nns, "_int8_dots_available", return_value=False):
        idx_f, score_f = nn_search(seq.emb_q, seq.offsets, cand, cand_off, k)
    assert torch.equal(idx, idx_f) and torch.equal(score, score_f)
    assert not nns._is_int8_valued(torch.full((1, 32), 0.5)) and not nns._is_int8_valued(torch.full((1, 32), 128.0))


@pytest.mark.parametrize("int_codes", [True, False])
def test_zero_vectors_score_plus_zero_never_nan(int_codes):
    """A zero token or a zero candidate has cosine +0.0 on both dot paths (its norm is
    taken as +inf): no NaN, no -0.0, and the tie rule then orders the zeros by recency."""
    seq = torch.tensor([[3] * 32, [0] * 32, [-3] * 32, [0] * 32], dtype=torch.int8)  # newest first
    cand = torch.tensor([[0.0] * 32, [-1.0] * 32]) if int_codes else torch.tensor([[-0.0] * 32, [-0.5] * 32])
    idx, score = nn_search(seq, torch.tensor([0, 4]), cand, torch.tensor([0, 2]), 4)
    assert not torch.isnan(score).any() and not torch.signbit(score[score == 0]).any()
    assert idx[0].tolist() == [0, 1, 2, 3] and (score[0] == 0).all()  # all tie at +0: recency order
    assert idx[1].tolist() == [2, 1, 3, 0] and score[1, 1:3].eq(0).all()  # zeros tie between +-1


def test_ties_prefer_the_most_recent_token():
    q = torch.full((5, 32), 10, dtype=torch.int8)  # five identical tokens
    idx, _ = nn_search(q, torch.tensor([0, 5]), torch.ones(1, 32), torch.tensor([0, 1]), 3)
    assert idx.tolist() == [[0, 1, 2]]


def brute_s_all(ll, rt, imp, cand_q, cand_off, req_ts, cfg):
    """Per-candidate Python assembly of S_all as lists of (ts or None) per slot."""
    out = []
    for u in range(len(req_ts)):
        def user_seq(s):
            lo, hi = int(s.offsets[u]), int(s.offsets[u + 1])
            return s.emb_q[lo:hi].numpy(), s.ts[lo:hi].numpy()
        (lq, lt), (rq, rtt), (iq, it) = user_seq(ll), user_seq(rt), user_seq(imp)
        cutoff = rtt[-1] if len(rtt) else np.iinfo(np.int64).max
        keep = lt < cutoff
        lq, lt = lq[keep], lt[keep]
        for n in range(int(cand_off[u]), int(cand_off[u + 1])):
            c = dequantize(cand_q[n].numpy()).astype(np.float64)
            slots = []
            def seg(q, t, k):
                picked = sorted(i for i, _ in brute_nn(q, c, k))[::-1]  # oldest first
                return [None] * (k - len(picked)) + [int(t[i]) for i in picked]
            slots += seg(lq, lt, cfg.k_ll)
            slots += seg(rq[cfg.r:], rtt[cfg.r:], cfg.k_rt)
            recent = [int(x) for x in rtt[: cfg.r]][::-1]
            slots += [None] * (cfg.r - len(recent)) + recent
            slots += seg(iq, it, cfg.k_imp)
            out.append((slots, int(req_ts[u])))
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_users=st.integers(1, 3))
def test_build_s_all_matches_brute_force(seed, n_users):
    rng = np.random.default_rng(seed)
    cfg = FeatureConfig(ll_cap=40, rt_cap=9, imp_cap=6, k_ll=5, k_rt=3, r=4, k_imp=3)
    ll = random_jagged(rng, rng.integers(0, 30, n_users))
    rt = random_jagged(rng, rng.integers(0, 9, n_users))
    imp = random_jagged(rng, rng.integers(0, 6, n_users))
    ncand = rng.integers(1, 4, n_users)
    cand_q = torch.from_numpy(rng.integers(-127, 128, (int(ncand.sum()), 32)).astype(np.int8))
    cand_off = torch.from_numpy(np.concatenate([[0], np.cumsum(ncand)]).astype(np.int64))
    req_ts = torch.full((n_users,), 2 * 10**6, dtype=torch.int64)
    s = build_s_all(ll, rt, imp, cand_q, cand_off, req_ts, cfg)
    valid = valid_mask(s.seg_len, cfg)
    assert s.emb_q.shape == (len(cand_q), cfg.seq_len, 32)
    for n, (slots, t) in enumerate(brute_s_all(ll, rt, imp, cand_q, cand_off, req_ts, cfg)):
        exp_valid = [x is not None for x in slots]
        assert valid[n].tolist() == exp_valid
        exp_age = [PAD_AGE if x is None else (t - x) // 1000 for x in slots]
        assert s.age_s[n].tolist() == exp_age
        assert (s.emb_q[n][~valid[n]] == 0).all() and (s.action[n][~valid[n]] == 0).all()


def test_cold_user_gets_all_padding_and_round_trips_through_arrow():
    cfg = FeatureConfig(k_ll=4, k_rt=2, r=3, k_imp=2, rt_cap=5, imp_cap=4)
    empty = JaggedSequences.empty(1)
    cand = torch.randint(-127, 128, (3, 32), dtype=torch.int8)
    s = build_s_all(empty, empty, empty, cand, torch.tensor([0, 3]), torch.tensor([10**6]), cfg)
    assert s.seg_len.sum() == 0 and (s.age_s == PAD_AGE).all()
    meta = pa.table({"request_id": pa.array([1, 1, 1], pa.int64()), "user_id": pa.array([5] * 3, pa.int64()),
                     "item_id": pa.array([7, 8, 9], pa.int64()), "ts": pa.array([10**6] * 3, pa.int64()),
                     "surface": pa.array([0] * 3, pa.int8()), "position": pa.array([0, 1, 2], pa.int16()),
                     **{c: pa.array([0, 1, 0], pa.uint8()) for c in LABEL_COLUMNS}})
    table = s_all_to_arrow(s, cand, meta, cfg)
    s2, cand2 = arrow_to_s_all(table, cfg)
    for a, b in ((s.emb_q, s2.emb_q), (s.action, s2.action), (s.age_s, s2.age_s), (cand, cand2)):
        assert torch.equal(a, b)


def test_arrow_round_trip_of_a_sliced_multi_chunk_table():
    cfg = FeatureConfig(k_ll=3, k_rt=2, r=2, k_imp=1, rt_cap=4, imp_cap=2)
    rng = np.random.default_rng(1)
    seqs = [random_jagged(rng, [6, 3]) for _ in range(3)]
    cand = torch.from_numpy(rng.integers(-127, 128, (5, 32)).astype(np.int8))
    s = build_s_all(*seqs, cand, torch.tensor([0, 2, 5]), torch.tensor([2 * 10**6] * 2), cfg)
    meta = pa.table({"request_id": pa.array(range(5), pa.int64()), "user_id": pa.array([1] * 5, pa.int64()),
                     "item_id": pa.array(range(5), pa.int64()), "ts": pa.array([0] * 5, pa.int64()),
                     "surface": pa.array([0] * 5, pa.int8()), "position": pa.array(range(5), pa.int16()),
                     **{c: pa.array([0] * 5, pa.uint8()) for c in LABEL_COLUMNS}})
    table = s_all_to_arrow(s, cand, meta, cfg)
    two_chunks = pa.concat_tables([table.slice(0, 2), table.slice(2, 3)]).slice(1, 3)
    s2, cand2 = arrow_to_s_all(two_chunks, cfg)
    for f in ("emb_q", "action", "surface", "age_s", "seg_len"):
        assert torch.equal(getattr(s2, f), getattr(s, f)[1:4]), f
    assert torch.equal(cand2, cand[1:4])


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), m=st.integers(1, 5), n_groups=st.integers(1, 80),
       G=st.sampled_from([1, 2, 4, 8, 16]), k=st.integers(1, 60), levels=st.sampled_from([1, 2, 5, 50, 0]),
       with_cn=st.booleans())
def test_grouped_selection_equals_topk_of_the_full_key(seed, b, m, n_groups, G, k, levels, with_cn):
    """The NN search's exact top-k (kernels/pytorch/nn_search.py::_select_rows: top k groups
    of G tokens, then the top k of their tokens; and the tensor path's one ``topk``) equals
    ``topk`` over the (score desc, index asc) key of every score: ties everywhere (few
    distinct levels, many straddling the cut), users padded with -inf at the end of their
    rows, the score divided by a per-row norm or not."""
    from transact.kernels.pytorch import nn_search as nns

    rng = np.random.default_rng(seed)
    L = n_groups * G
    k = min(k, L)
    x = rng.integers(0, max(levels, 1), (b, L, m)) / max(levels, 1) - 0.5 if levels else rng.normal(size=(b, L, m))
    s1 = x.astype(np.float32) + np.float32(0.0)  # [b, L, m] token-major; + 0.0: no -0.0
    for u in range(b):  # padding ends the rows of some users
        s1[u, L - int(rng.integers(0, L)) if rng.random() < 0.5 else L :] = -np.inf
    cn = (rng.integers(1, 4, (b, m)) * np.float32(0.75)).astype(np.float32) if with_cn else None  # [b, m]
    final = torch.from_numpy(np.ascontiguousarray(s1.transpose(0, 2, 1)).reshape(b * m, L))  # [R, L]
    if cn is not None:
        final = final / torch.from_numpy(cn).reshape(b * m, 1)
    exp_cols = torch.topk(nns._tie_break_key(final), k, dim=1).indices  # [R, k]
    exp_vals = torch.gather(final, 1, exp_cols)
    cols, vals = nns._select_rows(s1, cn, k, G)
    assert np.array_equal(cols, exp_cols.numpy()) and np.array_equal(vals, exp_vals.numpy())
    cols_t, vals_t = nns._select_rows_torch(torch.from_numpy(s1), None if cn is None else torch.from_numpy(cn), k)
    assert torch.equal(cols_t, exp_cols) and torch.equal(vals_t, exp_vals)
