"""The training attention (kernels/pytorch/attention_train.py): bf16 flash forward + blocked
GEMM backward against fp32 causal attention on the same inputs, the eager fallback, and
the routes (fp32 and dropout keep SDPA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transact.kernels.pytorch import attention_train
from transact.kernels.pytorch.attention_train import causal_attention_train, uses_block_backward
from transact.kernels.pytorch.compiled import CompiledOrEager


def _inputs(seed: int, B: int, H: int, L: int, dh: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, L, dh, generator=g).mul(s).to(torch.bfloat16) for s in (1.5, 1.5, 1.0, 1.0))
    return q, k, v, do


def _grads(fn, q, k, v, do, dtype):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize(("seed", "B", "H", "L", "dh"), [
    (0, 5, 2, 24, 32),  # several heads, one block
    (1, 33, 1, 16, 64),  # a full block of 32 rows and a block of 1
])
def test_bf16_block_backward_is_close_to_fp32_attention(seed, B, H, L, dh):
    """Fresh random bf16 inputs: output and dQ, dK, dV within 2% (relative norm) of fp32 causal
    attention on the same values -- and no further from it than 4x the flash kernel's own bf16
    backward (the route replaced here)."""
    q, k, v, do = _inputs(seed, B, H, L, dh)
    assert uses_block_backward(q, 0.0)
    ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, do, torch.float32)
    flash = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, do, torch.bfloat16)
    got = _grads(causal_attention_train, q, k, v, do, torch.bfloat16)
    for name, g, f, r in zip(("out", "dq", "dk", "dv"), got, flash, ref):
        assert torch.isfinite(g).all(), name
        assert _rel(g, r) < 2e-2, (name, _rel(g, r))
        assert _rel(g, r) <= 4 * _rel(f, r) + 1e-3, (name, _rel(g, r), _rel(f, r))


def test_eager_fallback_gives_the_same_gradients(monkeypatch):
    """When torch.compile fails, one warning and the same block eagerly: the compiled block's
    gradients to bf16 rounding."""
    q, k, v, do = _inputs(2, 3, 1, 16, 32)
    compiled = _grads(causal_attention_train, q, k, v, do, torch.bfloat16)

    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler")

    fresh = CompiledOrEager(attention_train._block_backward, "attention backward")
    monkeypatch.setattr(attention_train, "_run_block", fresh)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="attention backward runs eagerly"):
        eager = _grads(causal_attention_train, q, k, v, do, torch.bfloat16)
    assert fresh.failed
    for a, b in zip(eager, compiled):
        assert _rel(a, b) < 1e-2


def test_fp32_and_dropout_keep_sdpa():
    """fp32 inputs (no matrix-unit gain) and dropout (the recompute cannot replay its draw) take
    SDPA: fp32 equals causal SDPA exactly."""
    q, k, v, do = (t.float() for t in _inputs(3, 2, 2, 12, 16))
    assert not uses_block_backward(q, 0.0) and not uses_block_backward(q.bfloat16(), 0.1)
    got = _grads(causal_attention_train, q, k, v, do, torch.float32)
    ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, do, torch.float32)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(0)
    out = causal_attention_train(q.requires_grad_(), k, v, dropout_p=0.5)
    assert torch.isfinite(out).all()
