"""Label-weighted CE (V1 Eq. 1-2, Table 7) and the Next Action Loss (V2 Eq. 5-6) by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transact.data.quantization import dequantize
from transact.data.schema import ACTION_BIT, LABEL_COLUMNS
from transact.features.config import FeatureConfig
from transact.model.losses import (
    default_label_weights,
    head_weights,
    label_weight_matrix,
    nal_targets,
    next_action_stats,
    sampled_softmax_nal,
    total_loss,
    weighted_bce,
)
from transact.model.transact import Batch, ModelConfig, ModelOutput, model_config

CFG = model_config("v2")  # heads click, repin, hide; actions click, repin, hide (+ none)


def w_of(click=0, repin=0, hide=0):
    M = label_weight_matrix(CFG)
    return head_weights(torch.tensor([[click, repin, hide]], dtype=torch.float32), M)[0].tolist()


def test_matrix_is_table7_plus_none_column():
    M = label_weight_matrix(CFG)
    assert M.tolist() == [[100, 0, 100, 1], [0, 100, 100, 1], [1, 5, 10, 1]]
    # heads outside Table 7: own action 1, none 1
    assert default_label_weights(("closeup",), ("click", "closeup")) == {"closeup": {"click": 0.0, "closeup": 1.0, "none": 1.0}}


def test_table7_worked_examples_from_v1_appendix_a():
    # only hides: repin and click predictions are penalised with weight 100
    w_click, w_repin, w_hide = w_of(hide=1)
    assert (w_click, w_repin) == (100, 100) and w_hide == 10
    # only repins: hide weight 5, click weight 0 (a user may repin and click the same pin)
    w_click, w_repin, w_hide = w_of(repin=1)
    assert (w_click, w_repin, w_hide) == (0, 100, 5)
    # click + repin: rows add up (Eq. 2 is a sum over actions)
    assert w_of(click=1, repin=1) == [100, 100, 6]
    # no action: the "none" pseudo-action gives weight 1 to every head
    assert w_of() == [1, 1, 1]


def test_weighted_bce_matches_hand_computation():
    logits = torch.tensor([[0.3, -1.0, 2.0], [-0.5, 0.7, -2.0]])
    y = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # row 0 hides, row 1 repins
    w = torch.tensor([w_of(hide=1), w_of(repin=1)])  # [[100,100,10],[0,100,5]]

    def bce(z, t):
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    losses = [[bce(float(logits[b, h]), float(y[b, h])) for h in range(3)] for b in range(2)]
    mean = sum(float(w[b, h]) * losses[b][h] for b in range(2) for h in range(3)) / 2
    wmean = sum(sum(float(w[b, h]) * losses[b][h] for b in range(2)) / float(w[:, h].sum()) for h in range(3))
    assert weighted_bce(logits, y, w, "mean").item() == pytest.approx(mean, rel=1e-5)
    assert weighted_bce(logits, y, w, "weighted_mean").item() == pytest.approx(wmean, rel=1e-5)


def numpy_nal(u, qv, pos, pos_ok, neg, neg_ok):
    """Eq. 5 summed over valid (b, t) pairs, divided by their count -- plain loops."""
    total, n = 0.0, 0
    B, r, _ = u.shape
    for b in range(B):
        for t in range(r - 1):
            if not (qv[b, t] and pos_ok[b, t + 1]):
                continue
            sp = math.exp(float(u[b, t] @ pos[b, t + 1]))
            sn = sum(math.exp(float(u[b, t] @ neg[b, m])) for m in range(neg.shape[1]) if neg_ok[b, m])
            total += -math.log(sp / (sp + sn))
            n += 1
    return total / max(n, 1), n


def test_nal_equals_hand_computed_value_on_a_tiny_case():
    u = np.array([[[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]],
                  [[0.2, -0.1], [1.0, 1.0], [0.3, 0.3]]])  # [B=2, r=3, D=2]
    pos = np.array([[[9.0, 9.0], [0.5, 1.0], [1.0, -1.0]],
                    [[0.0, 0.0], [2.0, 0.0], [0.1, 0.4]]])
    pos_ok = np.array([[False, True, True], [False, False, True]])
    qv = np.array([[True, True, False], [True, True, True]])
    neg = np.array([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.5], [7.0, 7.0]]])  # [B, M=2, D]
    neg_ok = np.array([[True, True], [True, False]])
    # by hand, row 0 t=0: u=(1,0), p=(0.5,1): <u,p>=0.5; negs <u,n> = 1, 0
    l00 = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(1) + math.exp(0)))
    # row 0 t=1: u=(.5,.5), p=(1,-1): 0; negs .5, .5
    l01 = -math.log(1 / (1 + 2 * math.exp(0.5)))
    # row 1 t=1: u=(1,1), p=(.1,.4): .5; neg (-1,.5): -.5 (the second negative is invalid)
    l11 = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5)))
    hand = (l00 + l01 + l11) / 3
    ref, n = numpy_nal(u, qv, pos, pos_ok, neg, neg_ok)
    assert n == 3 and ref == pytest.approx(hand, rel=1e-12)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = sampled_softmax_nal(t(u), torch.tensor(qv), t(pos), torch.tensor(pos_ok), t(neg), torch.tensor(neg_ok))
    assert got.item() == pytest.approx(hand, rel=1e-9)


def test_nal_random_cases_match_numpy_and_zero_without_pairs():
    rng = np.random.default_rng(0)
    for _ in range(5):
        B, r, D, M = 3, 5, 4, 3
        args = (rng.normal(size=(B, r, D)), rng.random((B, r)) < 0.7, rng.normal(size=(B, r, D)),
                rng.random((B, r)) < 0.6, rng.normal(size=(B, M, D)), rng.random((B, M)) < 0.7)
        ref, _ = numpy_nal(*args)
        tt = [torch.tensor(a) for a in args]
        assert sampled_softmax_nal(*tt).item() == pytest.approx(ref, rel=1e-9)
    u = torch.randn(2, 4, 3, requires_grad=True)
    none = torch.zeros(2, 4, dtype=torch.bool)
    z = sampled_softmax_nal(u, none, torch.randn(2, 4, 3), none, torch.randn(2, 2, 3), torch.ones(2, 2, dtype=torch.bool))
    z.backward()
    assert z.item() == 0.0 and torch.equal(u.grad, torch.zeros_like(u))


def _batch(fcfg, seg_len, actions, user_id):
    B, S = len(seg_len), fcfg.seq_len
    g = torch.Generator().manual_seed(0)
    return Batch(emb_q=torch.randint(-127, 128, (B, S, 32), generator=g, dtype=torch.int8),
                 action=torch.tensor(actions, dtype=torch.uint8), tok_surface=torch.zeros(B, S, dtype=torch.int8),
                 age_s=torch.zeros(B, S, dtype=torch.int32), seg_len=torch.tensor(seg_len, dtype=torch.int16),
                 cand_emb_q=torch.zeros(B, 32, dtype=torch.int8), surface=torch.zeros(B, dtype=torch.int64),
                 labels=torch.zeros(B, len(LABEL_COLUMNS)), user_id=torch.tensor(user_id))


def test_nal_targets_positives_and_both_negative_samplers():
    fcfg = FeatureConfig(k_ll=2, k_rt=2, r=4, k_imp=3)  # S = 11; rt_recent slots 4..7, imp 8..10
    c, h, i = ACTION_BIT["click"], ACTION_BIT["hide"], ACTION_BIT["impression"]
    rep = ACTION_BIT["repin"] | ACTION_BIT["closeup"]
    actions = [[0, 0, 0, 0, 0, c, h, rep, 0, i, i],
               [0, 0, 0, 0, c, c, c, c, i, i, i],
               [0, 0, 0, 0, c, c, c, c, i, i, i]]
    b = _batch(fcfg, [[0, 0, 3, 2], [0, 0, 4, 3], [0, 0, 4, 3]], actions, [5, 5, 9])
    pos, pos_ok, neg, neg_ok = nal_targets(b, fcfg, "impression")
    assert torch.equal(pos, dequantize(b.emb_q[:, 4:8]))
    assert pos_ok.tolist()[0] == [False, True, False, True]  # padding, click, hide, repin
    assert neg_ok.tolist() == [[False, True, True], [True, True, True], [True, True, True]]
    assert torch.equal(neg, dequantize(b.emb_q[:, 8:11]))
    pos, pos_ok, neg, neg_ok = nal_targets(b, fcfg, "inbatch")
    assert torch.equal(neg[1], dequantize(b.emb_q[0, 4:8]))  # row 1 gets row 0's S_RT[:r]
    assert neg_ok[1].tolist() == [False, False, False, False]  # same user 5: dropped
    assert neg_ok[2].tolist() == [True, True, True, True]  # row 1 (user 5) for user 9
    assert neg_ok[0].tolist() == [True, True, True, True]  # wraps around: row 2


def test_total_loss_adds_weighted_nal():
    fcfg = FeatureConfig(k_ll=2, k_rt=2, r=4, k_imp=3)
    c, i = ACTION_BIT["click"], ACTION_BIT["impression"]
    b = _batch(fcfg, [[2, 2, 4, 3]] * 2, [[c] * 8 + [i] * 3] * 2, [1, 2])
    cfg = ModelConfig(nal_weight=0.5)
    g = torch.Generator().manual_seed(1)
    out = ModelOutput(logits=torch.randn(2, 3, generator=g), nal_user=torch.randn(2, 4, 32, generator=g),
                      nal_query_valid=torch.ones(2, 4, dtype=torch.bool))
    loss, parts = total_loss(out, b, cfg, fcfg, label_weight_matrix(cfg))
    assert parts["nal"] > 0
    assert loss.item() == pytest.approx(parts["ce"].item() + 0.5 * parts["nal"].item(), rel=1e-6)
    no_nal = ModelConfig(segments=("rt_recent",), nal="none")
    loss2, parts2 = total_loss(out, b, no_nal, fcfg, label_weight_matrix(no_nal))
    assert "nal" not in parts2 and loss2.item() == pytest.approx(parts["ce"].item(), rel=1e-6)


def test_nal_negatives_keep_the_newest_slots_of_either_sampler():
    fcfg = FeatureConfig(k_ll=2, k_rt=2, r=4, k_imp=3)
    c, i = ACTION_BIT["click"], ACTION_BIT["impression"]
    b = _batch(fcfg, [[0, 0, 4, 3], [0, 0, 4, 2]], [[c] * 8 + [i] * 3] * 2, [1, 2])
    _, _, neg_all, ok_all = nal_targets(b, fcfg, "impression")
    _, _, neg, ok = nal_targets(b, fcfg, "impression", max_negatives=2)
    assert torch.equal(neg, neg_all[:, -2:]) and torch.equal(ok, ok_all[:, -2:])  # newest sit last
    assert torch.equal(neg, dequantize(b.emb_q[:, 9:11]))
    _, _, neg_in, ok_in = nal_targets(b, fcfg, "inbatch", max_negatives=3)
    assert torch.equal(neg_in[0], dequantize(b.emb_q[1, 5:8]))  # row 0 gets row 1's newest 3 of S_RT[:r]
    assert neg_in.shape == (2, 3, 32) and ok_in.shape == (2, 3)
    assert nal_targets(b, fcfg, "impression", max_negatives=99)[2].shape == neg_all.shape  # more than there are


def test_next_action_stats_agree_with_the_loss_and_count_top1_and_chance():
    fcfg = FeatureConfig(k_ll=2, k_rt=2, r=4, k_imp=3)
    c, i = ACTION_BIT["click"], ACTION_BIT["impression"]
    b = _batch(fcfg, [[2, 2, 4, 3], [2, 2, 3, 1]], [[c] * 8 + [i] * 3] * 2, [1, 2])
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 4, 32, generator=g, dtype=torch.float64)
    qv = torch.ones(2, 4, dtype=torch.bool)
    out = ModelOutput(logits=torch.zeros(2, 3), nal_user=u, nal_query_valid=qv)
    st = next_action_stats(out, b, fcfg)
    pos, pos_ok, neg, neg_ok = nal_targets(b, fcfg, "impression")
    # the mean the trainer minimises, recovered from the sums
    ref = sampled_softmax_nal(u, qv, pos.double(), pos_ok, neg.double(), neg_ok).item()
    assert st["pairs"] == 3 + 3 and st["loss"] / st["pairs"] == pytest.approx(ref, rel=1e-6)  # scored in fp32
    # top-1 by hand: the positive's dot beats every valid negative's
    hits = 0
    for r_ in range(2):
        for t in range(3):
            if pos_ok[r_, t + 1]:
                s_pos = float(u[r_, t] @ pos[r_, t + 1].double())
                s_neg = [float(u[r_, t] @ neg[r_, m].double()) for m in range(3) if neg_ok[r_, m]]
                hits += s_pos > max(s_neg)
    assert st["top1"] == hits
    assert st["chance"] == pytest.approx(3 / 4 + 3 / 2)  # row 0: 3 negatives, row 1: 1
    # u(t) that points at the next positive: every pair is a top-1 hit
    aligned = torch.zeros_like(u)
    aligned[:, :-1] = 1e3 * pos[:, 1:].double()
    st2 = next_action_stats(ModelOutput(logits=torch.zeros(2, 3), nal_user=aligned, nal_query_valid=qv), b, fcfg)
    assert st2["top1"] == st2["pairs"] == 6
