"""The encoder's CPU inference path (kernels/pytorch/encoder_cpu.py) and its training path
(kernels/pytorch/encoder_train.py) against the stock module, and the dispatcher's choice
between them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import random_encoder, valid_pattern
from transact.features.config import FeatureConfig
from transact.kernels import dispatch
from transact.kernels.pytorch import encoder_cpu, encoder_train
from transact.kernels.pytorch.encoder import encoder_reference
from transact.kernels.pytorch.encoder_cpu import encoder_forward_cpu, unsupported_reason
from transact.kernels.pytorch.encoder_train import encoder_forward_train, train_unsupported_reason
from transact.model.encoder import make_encoder
from transact.model.transact import Batch, build_model


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), S=st.integers(1, 40), heads=st.sampled_from([1, 2, 4]),
       kind=st.sampled_from(["random", "suffix", "mixed"]), query_block=st.sampled_from([1, 3, 8, 32, 1000]))
def test_valid_positions_match_the_stock_encoder(seed, B, S, heads, kind, query_block):
    """Fresh random weights and inputs, padding patterns with empty and full rows, query
    blocks from 1 to more than S: every valid position equals the stock module's; padded
    positions are finite."""
    rng = np.random.default_rng(seed)
    enc = random_encoder(seed % 1000, n_heads=heads)
    x = torch.from_numpy(rng.normal(size=(B, S, 64)).astype(np.float32))
    valid = valid_pattern(rng, B, S, kind)
    with torch.inference_mode():
        out = encoder_forward_cpu(enc, x, valid, query_block=query_block)  # [B, S, 64]
        ref = encoder_reference(enc, x, valid)  # [B, S, 64]
    assert out.shape == ref.shape
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-5)
    assert torch.isfinite(out).all()


def test_padded_keys_get_exactly_zero_weight():
    """A valid query's output does not depend on padded tokens' values at all (the -1e9 key
    mask underflows to weight 0), however large those values are."""
    rng = np.random.default_rng(3)
    enc = random_encoder(3)
    x = torch.from_numpy(rng.normal(size=(3, 17, 64)).astype(np.float32))
    valid = valid_pattern(rng, 3, 17, "random")
    x2 = x.clone()
    x2[~valid] = torch.from_numpy(rng.normal(size=(int((~valid).sum()), 64)).astype(np.float32)) * 1e3
    with torch.inference_mode():
        a, b = encoder_forward_cpu(enc, x, valid), encoder_forward_cpu(enc, x2, valid)
    assert torch.equal(a[valid], b[valid])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_finite_and_close(dtype):
    """fp16 cannot hold -1e9 (the mask is clipped to its range): no NaN on empty rows."""
    rng = np.random.default_rng(5)
    enc = random_encoder(5).to(dtype)
    x = torch.from_numpy(rng.normal(size=(4, 9, 64))).to(dtype)
    valid = valid_pattern(rng, 4, 9, "mixed")
    with torch.inference_mode():
        out, ref = encoder_forward_cpu(enc, x, valid), encoder_reference(enc, x, valid)
    assert torch.isfinite(out).all()
    tol = {torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=tol)


def test_empty_batch_and_bad_block():
    enc = random_encoder(0)
    with torch.inference_mode():
        assert encoder_forward_cpu(enc, torch.randn(0, 5, 64), torch.zeros(0, 5, dtype=torch.bool)).shape == (0, 5, 64)
        with pytest.raises(ValueError, match="query_block"):
            encoder_forward_cpu(enc, torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.bool), query_block=0)


def test_unsupported_encoders_are_named():
    assert "training" in unsupported_reason(make_encoder())
    enc = make_encoder().eval()
    enc.layers[0].norm_first = True
    assert "pre-LN" in unsupported_reason(enc)
    enc = make_encoder().eval()
    enc.norm = torch.nn.LayerNorm(64)
    assert "final norm" in unsupported_reason(enc)
    assert unsupported_reason(make_encoder(n_heads=2).eval()) is None


def test_dispatcher_sends_inference_here_and_training_to_the_training_path(monkeypatch):
    calls, train_calls = [], []
    real, real_train = encoder_cpu.encoder_forward_cpu, encoder_train.encoder_forward_train
    monkeypatch.setattr(encoder_cpu, "encoder_forward_cpu", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(encoder_train, "encoder_forward_train", lambda *a: train_calls.append(1) or real_train(*a))
    enc = random_encoder(2)
    x, valid = torch.randn(2, 8, 64), torch.rand(2, 8) < 0.7
    with torch.inference_mode():
        dispatch.encoder_forward(enc, x, valid)
    assert calls == [1] and train_calls == []
    enc.train()  # autograd goes through the training path (packed), not the inference kernel
    out = dispatch.encoder_forward(enc, x.requires_grad_(), valid)
    assert calls == [1] and train_calls == [1] and out.requires_grad
    with dispatch.using(train_encoder="stock"):  # the old path, for the benchmark
        assert dispatch.encoder_forward(enc, x, valid).requires_grad
    assert train_calls == [1] and dispatch.config().train_encoder is dispatch.TrainEncoder.PACKED
    with pytest.raises(ValueError, match="train encoder must be one of"), dispatch.using(train_encoder="sdpa"):
        pass
    enc.layers[0].norm_first = True  # a layer the training path does not know: the stock module
    dispatch.encoder_forward(enc, x, valid)
    assert train_calls == [1] and "pre-LN" in train_unsupported_reason(enc)
    enc.layers[0].norm_first = False
    enc.eval()
    with torch.no_grad():  # an unsupported encoder falls back to the reference
        enc.norm = torch.nn.LayerNorm(64)
        dispatch.encoder_forward(enc, x, valid)
    assert calls == [1]


def test_model_logits_match_the_stock_encoder(monkeypatch):
    """The whole model in eval: logits with the CPU path equal those with the stock encoder
    (rows with short and empty segments included)."""
    fcfg = FeatureConfig(ll_cap=64, rt_cap=20, imp_cap=10, k_ll=8, k_rt=4, r=4, k_imp=4)
    torch.manual_seed(0)
    m = build_model("v2", fcfg).eval()
    B, S = 7, fcfg.seq_len
    g = torch.Generator().manual_seed(1)
    seg_len = torch.randint(0, 5, (B, 4), generator=g).to(torch.int16)
    seg_len[0] = 0  # cold start
    b = Batch(emb_q=torch.randint(-127, 128, (B, S, 32), generator=g, dtype=torch.int8),
              action=torch.randint(1, 16, (B, S), generator=g).to(torch.uint8),
              tok_surface=torch.zeros(B, S, dtype=torch.int8), age_s=torch.ones(B, S, dtype=torch.int32),
              seg_len=seg_len, cand_emb_q=torch.randint(-127, 128, (B, 32), generator=g, dtype=torch.int8),
              surface=torch.zeros(B, dtype=torch.long))
    with torch.inference_mode():
        fast = m(b)
        monkeypatch.setattr(encoder_cpu, "unsupported_reason", lambda enc: "forced reference")
        ref = m(b)
    torch.testing.assert_close(fast.logits, ref.logits, rtol=0, atol=1e-6)
    valid = fast.nal_query_valid
    torch.testing.assert_close(fast.nal_user[valid], ref.nal_user[valid], rtol=0, atol=1e-6)


# --- the training path ---------------------------------------------------------------------

def _grads(fn, enc, x, valid, g):
    """Output and the gradients of <output, g> w.r.t. x and every encoder parameter."""
    x = x.clone().requires_grad_()
    out = fn(enc, x, valid)  # [B, S, d]
    params = list(enc.parameters())
    grads = torch.autograd.grad(out, [x, *params], g, materialize_grads=True)  # 0 where unused (no valid token)
    return out.detach(), grads


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 5), S=st.integers(1, 40), heads=st.sampled_from([1, 2, 4]),
       kind=st.sampled_from(["random", "suffix", "mixed"]))
def test_training_path_equals_the_stock_module_in_outputs_and_gradients(seed, B, S, heads, kind):
    """Fresh random weights (LayerNorm affine and biases included), inputs, upstream gradient
    and padding patterns with empty and full rows, dropout 0, train mode: the packed training
    path gives the stock module's output at every valid position and 0 at padded ones, and --
    for an upstream gradient that, like the model's, ignores padded positions -- the same
    gradients for the input and every parameter."""
    rng = np.random.default_rng(seed)
    enc = random_encoder(seed % 1000, n_heads=heads).train()
    x = torch.from_numpy(rng.normal(size=(B, S, 64)).astype(np.float32))
    valid = valid_pattern(rng, B, S, kind)
    g = torch.from_numpy(rng.normal(size=(B, S, 64)).astype(np.float32)) * valid[..., None]
    out, grads = _grads(encoder_forward_train, enc, x, valid, g)
    ref, ref_grads = _grads(encoder_reference, enc, x, valid, g)
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-5)
    assert bool((out[~valid] == 0).all())
    names = ["x"] + [n for n, _ in enc.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_training_path_tokens_equal_the_padded_layout():
    """encoder_tokens (the model's training entry: valid tokens only) is the [B, S, d] path's
    output at the valid positions, for the packed path and for the stock module."""
    rng = np.random.default_rng(3)
    enc = random_encoder(3, n_heads=2).train()
    x = torch.from_numpy(rng.normal(size=(4, 21, 64)).astype(np.float32))
    valid = valid_pattern(rng, 4, 21, "mixed")
    want = encoder_reference(enc, x, valid)[valid]  # [N, d]
    for path in ("packed", "stock"):
        with dispatch.using(train_encoder=path):
            torch.testing.assert_close(dispatch.encoder_tokens(enc, x[valid], valid), want, rtol=0, atol=1e-5)


def test_training_path_dropout_and_empty_batch():
    """With dropout the path is stochastic, finite and differentiable; in eval mode (dropout
    off) it is the reference again at valid positions; an empty batch passes through."""
    torch.manual_seed(0)
    enc = make_encoder(dropout=0.3).train()
    x, valid = torch.randn(3, 9, 64, requires_grad=True), torch.rand(3, 9) < 0.7
    a, b = encoder_forward_train(enc, x, valid), encoder_forward_train(enc, x, valid)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    a.sum().backward()
    assert torch.isfinite(x.grad).all()
    enc.eval()
    torch.testing.assert_close(encoder_forward_train(enc, x, valid)[valid], encoder_reference(enc, x, valid)[valid],
                               rtol=0, atol=1e-5)
    assert encoder_forward_train(enc, torch.randn(0, 5, 64), torch.zeros(0, 5, dtype=torch.bool)).shape == (0, 5, 64)


def test_training_path_under_bf16_autocast_is_close():
    torch.manual_seed(4)
    enc = random_encoder(4).train()
    x, valid = torch.randn(4, 16, 64), valid_pattern(np.random.default_rng(4), 4, 16, "mixed")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder_forward_train(enc, x, valid)
    ref = encoder_reference(enc, x, valid)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float()[valid], ref[valid], rtol=0, atol=0.1)


def test_training_path_without_tokens_keeps_every_parameter_in_the_graph():
    """A batch whose rows have no token at all (cold start, or a time window that masks
    everything): every encoder parameter still gets a (zero) gradient, as in the [B, S, d]
    path -- DDP expects each parameter to get one in every step."""
    enc = make_encoder().train()
    x, valid = torch.randn(3, 5, 64, requires_grad=True), torch.zeros(3, 5, dtype=torch.bool)
    out = encoder_forward_train(enc, x, valid)
    out.sum().backward()
    assert out.shape == (3, 5, 64) and bool((out == 0).all())
    assert all(p.grad is not None and bool((p.grad == 0).all()) for p in enc.parameters())
