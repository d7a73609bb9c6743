"""Causal attention for training on CPU: PyTorch's flash-attention forward, and a backward
that recomputes the probabilities in cache-sized row blocks with batched GEMMs.

The training encoder (:mod:`transact.kernels.pytorch.encoder_train`) packs each row's valid
tokens to the front, so a plain causal mask is the whole mask (padded keys sit after every
valid query). For one head (q, k, v [L, d_h], scale s = d_h^-1/2, C the causal mask)::

    forward   O    = softmax(s Q K^T + C) V                     [L, d_h]  flash kernel, keeps
              lse  = logsumexp(s Q K^T + C, dim=-1)             [L]       (O, lse) for backward
    backward  P    = exp(s Q K^T + C - lse)                     [L, L]    recomputed, fp32
              dV   = P^T dO                                     [L, d_h]
              dP   = dO V^T                                     [L, L]
              dS   = P * (dP - rowsum(dO * O))                  [L, L]
              dQ   = s dS K,   dK = s dS^T Q                    [L, d_h]

Why not the flash kernel's own backward: on a CPU with bf16 matrix units (AMX) PyTorch's
flash backward does not use them -- at the model's shapes (B 256, L 192, d_h 64, 2 threads)
it takes ~46 ms per layer in bf16 against ~5 ms for the forward, while the five GEMMs
above run on the matrix units in ~1 ms each. The elementwise work between them is fused
by ``torch.compile`` over blocks of ``BLOCK_ROWS`` examples (the [rows, L, L] scores stay
in cache): ~16 ms per layer. In fp32 the same backward is no faster than the flash
kernel's (38 vs 34 ms), so fp32 keeps SDPA's backward (docs/ablation.md, "training speed").

Precision (bf16 inputs): the five GEMMs take bf16 operands with fp32 accumulation and
bf16 results (the scores are rounded to bf16 before the exp, as autocast's matmuls round
theirs); P and dS are formed in fp32 and rounded once for the GEMMs that consume them.
Gradients are within ~1% (relative norm) of an fp32 reference on the same inputs (the
flash kernel's bf16 backward: ~0.3%); tested in tests/kernels/test_kernels_attention_train.py.

If ``torch.compile`` cannot build the fused block (no C++ compiler), the same block runs
eagerly (same values, ~3x slower), after one warning.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

#: examples per recomputed block: [32, 192, 192] fp32 scores are 4.7 MB; 16 / 32 / 64 rows
#: took 18.9 / 15.5 / ~22 ms per layer on the machine measured
BLOCK_ROWS: int = 32

_compiled: Callable | None = None
_compile_failed: bool = False


def _block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                    lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of rows; q, k, v, o, do [b, H, L, d_h], lse [b, H, L] (fp32)."""
    dt, L = q.dtype, q.shape[-2]
    pos = torch.arange(L, device=q.device)
    future = pos[None, :] > pos[:, None]  # [L, L] key after query
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # [b, H, L, L]
    p = torch.exp(scores * scale - lse[..., None]).masked_fill(future, 0.0)  # [b, H, L, L]
    dv = torch.matmul(p.to(dt).transpose(-1, -2), do)  # [b, H, L, d_h]
    dp = torch.matmul(do, v.transpose(-1, -2)).float()  # [b, H, L, L]
    delta = (do.float() * o.float()).sum(-1, keepdim=True)  # [b, H, L, 1]
    ds = (p * (dp - delta)).to(dt)  # [b, H, L, L]
    dq = torch.matmul(ds, k) * scale  # [b, H, L, d_h]
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale  # [b, H, L, d_h]
    return dq, dk, dv


def _run_block(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled block (built once per process), or the eager one once compiling failed."""
    global _compiled, _compile_failed
    if not _compile_failed:
        try:
            if _compiled is None:
                # dynamic: one build for every packed length L and block size (a static build per
                # shape hit Dynamo's recompile limit within an epoch); as fast as static here
                _compiled = torch.compile(_block_backward, dynamic=True)
            return _compiled(*args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the same math, eagerly
            _compile_failed = True
            first = str(e).splitlines()[0][:160] if str(e) else ""
            warnings.warn(f"attention backward runs eagerly (torch.compile failed: {type(e).__name__}: {first})",
                          RuntimeWarning, stacklevel=2)
    return _block_backward(*args)


@torch.library.custom_op("transact::causal_attention_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    return out, lse  # [B, H, L, d_h], [B, H, L] fp32


@_flash_fwd.register_fake
def _(q, k, v):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("transact::causal_attention_bwd", mutates_args=())
def _block_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, scale = q.shape[0], q.shape[-1] ** -0.5
    dout = dout.to(q.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for s in range(0, B, BLOCK_ROWS):
        e = min(s + BLOCK_ROWS, B)
        dq[s:e], dk[s:e], dv[s:e] = _run_block(q[s:e], k[s:e], v[s:e], out[s:e], dout[s:e], lse[s:e], scale)
    return dq, dk, dv


@_block_bwd.register_fake
def _(dout, q, k, v, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return _block_bwd(dout, q, k, v, out, lse)


_flash_fwd.register_autograd(_backward, setup_context=_setup)


def uses_block_backward(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether :func:`causal_attention_train` takes the flash-forward / block-backward route:
    CPU, bf16, no dropout (the route recomputes P, so it cannot replay a dropout draw)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout_p == 0.0


def causal_attention_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_h) + causal) V with autograd; q, k, v [B, H, L, d_h] -> [B, H, L, d_h].

    bf16 on CPU without dropout: flash forward + block backward (module docstring); anything
    else: ``F.scaled_dot_product_attention(is_causal=True)`` (on CUDA its flash kernel)."""
    if uses_block_backward(q, dropout_p) and torch.is_grad_enabled():
        return _flash_fwd(q.contiguous(), k.contiguous(), v.contiguous())[0]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
