"""The TransAct V2 module: shapes, masks through the model, baselines, fusion, options."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from transact.data.schema import ACTION_BIT
from transact.features.config import SEGMENTS, FeatureConfig
from transact.features.nn_features import SAll, valid_mask
from transact.model.dataset import synthetic_rows, table_to_batch
from transact.model.transact import (
    BASELINES,
    Batch,
    ModelConfig,
    TransActModel,
    build_model,
    model_config,
)

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)


def make_batch(n_requests=4, per_request=4, seed=0, fill=1.0, cfg=FCFG) -> Batch:
    return table_to_batch(synthetic_rows(n_requests, cfg, per_request=per_request, seed=seed, fill=fill), cfg)


def full_batch(B=3, seed=0) -> Batch:
    """Every segment full except row 1 (half full) and row 2 (empty: cold start)."""
    b = make_batch(1, B, seed)
    sizes = torch.tensor(FCFG.segment_sizes, dtype=torch.int16)
    b.seg_len = torch.stack([sizes, sizes // 2, torch.zeros_like(sizes)])[:B]
    v = valid_mask(b.seg_len, FCFG)
    g = torch.Generator().manual_seed(seed)
    b.emb_q = torch.randint(-127, 128, b.emb_q.shape, generator=g, dtype=torch.int8)
    b.emb_q[~v] = 0
    b.action = torch.randint(1, 16, b.action.shape, generator=g, dtype=torch.uint8) * v
    b.age_s = torch.where(v, b.age_s.clamp(min=0), torch.full_like(b.age_s, -1))
    return b


class Capture:
    """Records the encoder output U of the model's forward (a hook on the layer after the
    encoder: whichever encoder path the dispatcher ran, U is seq_proj's input)."""

    def __init__(self, model: TransActModel):
        self.U = None
        model.seq_proj.register_forward_hook(lambda m, i, o: setattr(self, "U", i[0].detach().clone()))


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_builds_and_runs(name):
    torch.manual_seed(0)
    b = make_batch()
    m = build_model(name, FCFG)
    out = m(b)
    assert out.logits.shape == (len(b), 3) and torch.isfinite(out.logits).all()
    if m.cfg.nal != "none":
        assert out.nal_user.shape == (len(b), FCFG.r, 32)
        assert out.nal_query_valid.shape == (len(b), FCFG.r)
    else:
        assert out.nal_user is None
    p = m.predict_proba(b)
    assert ((p > 0) & (p < 1)).all()


def test_registry_names_and_overrides():
    assert list(BASELINES) == ["wdl", "bst", "transact", "transact_nal_inbatch", "transact_nal_imp", "v2"]
    assert model_config("v2").segments == SEGMENTS and model_config("v2").nal == "impression"
    assert model_config("transact").segments == ("rt_nn", "rt_recent")
    assert model_config("transact_nal_imp").nal == "impression"
    assert "imp_nn" not in model_config("transact_nal_imp").segments
    assert model_config("wdl").segments == ()
    assert model_config("v2", heads=("click", "closeup")).heads == ("click", "closeup")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_config("nope")
    with pytest.raises(ValueError, match="head 'like' has no label column"):
        ModelConfig(heads=("like",))
    with pytest.raises(ValueError, match="Next Action Loss needs the rt_recent segment"):
        ModelConfig(segments=("ll_nn",), nal="impression")  # NAL needs rt_recent
    cfg = model_config("bst")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["v2", "transact", "bst"])
def test_later_and_padding_tokens_do_not_change_earlier_outputs(name):
    torch.manual_seed(0)
    m = build_model(name, FCFG).eval()
    cap = Capture(m)
    b = full_batch()
    with torch.no_grad():
        logits = m(b).logits
        U0 = cap.U
        slots = m.slots
        valid = valid_mask(b.seg_len, FCFG)[:, slots]  # [B, L]
        # 1. perturb one later valid token of row 0: earlier outputs stay, later change
        t = len(slots) - 3
        b2 = dataclasses.replace(b, emb_q=b.emb_q.clone(), action=b.action.clone())
        b2.emb_q[0, slots[t]] = -b2.emb_q[0, slots[t]] + 3
        b2.action[0, slots[t]] ^= 0b11
        m(b2)
        U1 = cap.U
        assert torch.allclose(U1[0, :t], U0[0, :t], atol=1e-6)
        assert not torch.allclose(U1[0, t:len(slots)], U0[0, t:len(slots)], atol=1e-4)
        assert torch.allclose(U1[1:], U0[1:], atol=1e-6)  # other rows untouched
        # 2. perturb every padding slot (and every unselected segment): valid outputs,
        #    the pooled representation and the logits stay the same
        pad = ~valid_mask(b.seg_len, FCFG)  # [B, S]
        unselected = torch.ones(FCFG.seq_len, dtype=torch.bool)
        unselected[slots] = False
        noise = pad | unselected[None]
        b3 = dataclasses.replace(b, emb_q=b.emb_q.clone(), action=b.action.clone(),
                                 tok_surface=b.tok_surface.clone(), age_s=b.age_s.clone())
        b3.emb_q[noise] = torch.randint(-127, 128, (int(noise.sum()), 32), dtype=torch.int8)
        b3.action[noise] = 7
        b3.tok_surface[noise] = 3
        logits3 = m(b3).logits
        U3 = cap.U
        L = len(slots)
        assert torch.allclose(U3[:, :L][valid], U0[:, :L][valid], atol=1e-6)
        assert torch.allclose(logits3, logits, atol=1e-6)


def test_impression_tokens_do_not_leak_into_nal_user_embeddings():
    """Under the causal mask u(t) over S_RT[:r] never sees the later NN(S_imp) slots."""
    torch.manual_seed(0)
    m = build_model("v2", FCFG).eval()
    b = full_batch()
    with torch.no_grad():
        u0 = m(b).nal_user
        imp0 = FCFG.segment_starts[3]
        b2 = dataclasses.replace(b, emb_q=b.emb_q.clone())
        b2.emb_q[:, imp0:] = 100
        out2 = m(b2)
    assert torch.allclose(out2.nal_user, u0, atol=1e-6)


def test_segment_slicing_equals_masking():
    """Feeding only the selected slots == feeding all slots with the others masked."""
    torch.manual_seed(0)
    m = build_model("transact", FCFG).eval()
    b = full_batch()
    cap = Capture(m)
    with torch.no_grad():
        m(b)
        U_sliced = cap.U
        full = torch.arange(FCFG.seq_len)
        x, valid = m.tokens(b)  # selected slots
        # the same tokens built on all slots, then masked by segment
        m.slots = full
        x_all, valid_all = m.tokens(b)
        sel = torch.zeros(FCFG.seq_len, dtype=torch.bool)
        sel[FCFG.segment_starts[1]:FCFG.segment_starts[3]] = True
        from transact.kernels.dispatch import encoder_forward

        U_masked = encoder_forward(m.encoder, x_all, valid_all & sel)
    rows = sel.nonzero().flatten()
    assert torch.allclose(U_masked[:, rows][valid], U_sliced[valid], atol=1e-5)


def test_cold_start_row_pools_to_zero_and_is_finite():
    torch.manual_seed(0)
    m = build_model("v2", FCFG).eval()
    b = full_batch()  # row 2 has no token
    seen = {}
    m.seq_proj.register_forward_hook(lambda mod, i, o: seen.setdefault("z", o))
    pooled = {}
    m.cross.register_forward_hook(lambda mod, i, o: pooled.setdefault("x0", i[0]))
    with torch.no_grad():
        out = m(b)
    assert torch.isfinite(out.logits).all()
    assert torch.equal(pooled["x0"][2, :m.cfg.seq_out_dim], torch.zeros(m.cfg.seq_out_dim))
    assert not torch.equal(pooled["x0"][0, :m.cfg.seq_out_dim], torch.zeros(m.cfg.seq_out_dim))


def test_max_pool_is_over_valid_tokens_only():
    torch.manual_seed(0)
    m = build_model("transact", FCFG).eval()
    cap = Capture(m)
    x0 = {}
    m.cross.register_forward_hook(lambda mod, i, o: x0.setdefault("x", i[0]))
    b = full_batch()
    with torch.no_grad():
        m(b)
    valid = valid_mask(b.seg_len, FCFG)[:, m.slots]
    z = m.seq_proj(cap.U)
    for i in range(2):
        exp = z[i][valid[i]].amax(0)
        assert torch.allclose(x0["x"][i, :m.cfg.seq_out_dim], exp, atol=1e-6)


def test_first_k_takes_the_k_most_recent_action_tokens_newest_first():
    torch.manual_seed(0)
    cfg = dataclasses.replace(model_config("v2"), first_k=3)
    m = TransActModel(cfg, FCFG).eval()
    b = full_batch()
    b.seg_len[1] = torch.tensor([3, 0, 2, 4], dtype=torch.int16)  # rt_recent has 2, rt_nn none
    z = torch.randn(3, FCFG.seq_len, cfg.seq_out_dim)
    valid = valid_mask(b.seg_len, FCFG)
    got = m._first_k(z, valid).reshape(3, 3, -1)
    s_rt = FCFG.segment_starts[3]  # end of rt_recent
    assert torch.equal(got[0], torch.stack([z[0, s_rt - 1], z[0, s_rt - 2], z[0, s_rt - 3]]))
    # row 1: the two rt_recent tokens, then the newest lifelong token (never impressions)
    ll_end = FCFG.segment_starts[1]
    assert torch.equal(got[1], torch.stack([z[1, s_rt - 1], z[1, s_rt - 2], z[1, ll_end - 1]]))
    assert torch.equal(got[2], torch.zeros(3, cfg.seq_out_dim))  # cold start: zeros
    out = m(b)
    assert out.logits.shape == (3, 3)


def test_append_fusion_adds_one_candidate_token():
    torch.manual_seed(0)
    m = build_model("bst", FCFG)
    b = full_batch()
    x, valid = m.tokens(b)
    L = FCFG.k_rt + FCFG.r
    assert x.shape == (3, L + 1, 64) and valid[:, -1].all()
    # the candidate token carries e_c in its first half and no action embedding
    from transact.data.quantization import dequantize

    assert torch.allclose(x[:, -1, :32] - m.pos_emb[-1, :32], dequantize(b.cand_emb_q), atol=1e-6)
    assert m.act_emb is None and m.surf_emb is None


def test_concat_fusion_and_multi_hot_action_embedding():
    torch.manual_seed(0)
    cfg = dataclasses.replace(model_config("v2"), surface_emb=False, pos_emb=False)
    m = TransActModel(cfg, FCFG)
    b = full_batch()
    b.action[0, 0] = ACTION_BIT["click"] | ACTION_BIT["repin"]
    x, _ = m.tokens(b)
    from transact.data.quantization import dequantize

    exp = torch.cat([dequantize(b.emb_q[0, 0]), dequantize(b.cand_emb_q[0])]) + m.act_emb[0] + m.act_emb[1]
    assert torch.allclose(x[0, 0], exp, atol=1e-6)


def test_time_window_mask_only_in_training_and_masks_recent_tokens():
    torch.manual_seed(0)
    cfg = dataclasses.replace(model_config("v2"), time_window_mask=True)
    m = TransActModel(cfg, FCFG)
    b = full_batch()
    b.age_s = torch.where(b.age_s >= 0, torch.arange(FCFG.seq_len, dtype=torch.int32).flip(0)[None] * 5000,
                          b.age_s)
    g = torch.Generator().manual_seed(1)
    _, v_train = m.tokens(b, time_window=True, generator=g)
    _, v_eval = m.tokens(b)
    assert (v_train <= v_eval).all() and v_train.sum() < v_eval.sum()
    # masked tokens are exactly the ones younger than the row's T
    T = torch.rand(3, 1, generator=torch.Generator().manual_seed(1)) * 86_400
    assert torch.equal(v_train, v_eval & (b.age_s[:, m.slots].float() >= T))
    m.eval()
    with torch.no_grad():
        a, c = m(b).logits, m(b).logits
    assert torch.equal(a, c)  # no randomness at eval


def test_batch_from_s_all_matches_rows():
    b = make_batch()
    s = SAll(b.emb_q, b.action, b.tok_surface, b.age_s, b.seg_len)
    b2 = Batch.from_s_all(s, b.cand_emb_q, b.surface)
    torch.manual_seed(0)
    m = build_model("v2", FCFG).eval()
    with torch.no_grad():
        assert torch.equal(m(b).logits, m(b2).logits)


def test_nal_variants_share_the_initial_weights_of_their_base_model():
    """For one seed, adding the NAL changes nothing but the NAL head (paired ablations)."""
    models = {}
    for name in ("transact", "transact_nal_inbatch", "transact_nal_imp", "v2"):
        torch.manual_seed(0)
        models[name] = build_model(name, FCFG).state_dict()
    base = models["transact"]
    for name in ("transact_nal_inbatch", "transact_nal_imp", "v2"):
        sd = models[name]
        assert set(sd) - set(base) == {"nal_proj.weight", "nal_proj.bias"}
        assert all(torch.equal(sd[k], base[k]) for k in base)


def test_nal_without_projection_is_the_token_half_of_the_encoder_output():
    """nal_projection=False: u(t) = U_t[:32], no parameters; the same as a projection fixed at [I | 0]."""
    b = full_batch()
    torch.manual_seed(0)
    plain = build_model(model_config("transact_nal_imp", nal_projection=False), FCFG).eval()
    torch.manual_seed(0)
    proj = build_model("transact_nal_imp", FCFG).eval()
    assert plain.nal_proj is None and not any(k.startswith("nal_proj") for k in plain.state_dict())
    with torch.no_grad():
        proj.nal_proj.weight.copy_(torch.cat([torch.eye(32), torch.zeros(32, 32)], dim=1))
        proj.nal_proj.bias.zero_()
        a, c = plain(b), proj(b)
    assert a.nal_user.shape == (len(b), FCFG.r, 32)
    assert torch.equal(a.logits, c.logits) and torch.allclose(a.nal_user, c.nal_user, atol=1e-6)


def test_nal_settings_are_checked():
    with pytest.raises(ValueError, match="nal_negatives must be >= 0"):
        ModelConfig(nal_negatives=-1)
    with pytest.raises(ValueError, match="nal_dim must be 32"):
        ModelConfig(nal_projection=False, nal_dim=64)
    assert ModelConfig(nal="none", nal_dim=64).nal_dim == 64  # no NAL: not used
    assert ModelConfig(nal_negatives=8, nal_projection=False).nal_negatives == 8
