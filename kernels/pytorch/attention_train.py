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

import torch
import torch.nn.functional as F

from transact.kernels.pytorch.compiled import CompiledOrEager

#: examples per recomputed block: [32, 192, 192] fp32 scores are 4.7 MB; 16 / 32 / 64 rows
#: took 18.9 / 15.5 / ~22 ms per layer on the machine measured
BLOCK_ROWS: int = 32


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


#: the block, compiled (dynamic: one build for every packed length and block size -- a static
#: build per shape hit Dynamo's recompile limit within an epoch; as fast as static here)
_run_block = CompiledOrEager(_block_backward, "attention backward")


def _pairs(groups: list[int]) -> list[tuple[int, int]]:
    return list(zip(groups[0::2], groups[1::2]))


def _views(x: torch.Tensor, lo: int, b: int, L: int, parts: int, heads: int) -> torch.Tensor:
    """Rows [lo, lo + b L) of x [M, parts H d_h] as [b, L, parts, H, d_h] (a view)."""
    return x[lo:lo + b * L].view(b, L, parts, heads, x.shape[1] // (parts * heads))


@torch.library.custom_op("transact::grouped_causal_attention_fwd", mutates_args=())
def _grouped_fwd(qkv: torch.Tensor, groups: list[int], heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3)  # [M, d]
    lses, lo = [], 0
    for b, L in _pairs(groups):
        part = _views(qkv, lo, b, L, 3, heads)  # [b, L, 3, H, d_h]
        q, k, v = (part[:, :, i].transpose(1, 2) for i in range(3))  # [b, H, L, d_h] strided views
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        _views(out, lo, b, L, 1, heads)[:, :, 0].copy_(o.transpose(1, 2))  # [b, L, H, d_h]
        lses.append(lse.reshape(-1))  # [b H L] fp32
        lo += b * L
    return out, torch.cat(lses)


@_grouped_fwd.register_fake
def _(qkv, groups, heads):
    n_lse = sum(b * L for b, L in _pairs(groups)) * heads
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3), qkv.new_empty(n_lse, dtype=torch.float32)


@torch.library.custom_op("transact::grouped_causal_attention_bwd", mutates_args=())
def _grouped_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, groups: list[int],
                 heads: int) -> torch.Tensor:
    dout = dout.to(qkv.dtype)
    dqkv = torch.empty_like(qkv)  # [M, 3d], every row written below
    scale = (qkv.shape[1] // (3 * heads)) ** -0.5
    lo = lo_lse = 0
    for b, L in _pairs(groups):
        part, dpart = _views(qkv, lo, b, L, 3, heads), _views(dqkv, lo, b, L, 3, heads)  # [b, L, 3, H, d_h]
        o, do = _views(out, lo, b, L, 1, heads)[:, :, 0], _views(dout, lo, b, L, 1, heads)[:, :, 0]  # [b, L, H, d_h]
        lse_g = lse[lo_lse:lo_lse + b * heads * L].view(b, heads, L)
        for s in range(0, b, BLOCK_ROWS):
            e = min(s + BLOCK_ROWS, b)
            # one block's operands, contiguous [rows, H, L, d_h] (cache-sized copies; the GEMMs
            # on strided views were slower); its gradients written into the [M, 3d] result
            q, k, v = (part[s:e, :, i].transpose(1, 2).contiguous() for i in range(3))
            grads = _run_block(q, k, v, o[s:e].transpose(1, 2).contiguous(), do[s:e].transpose(1, 2).contiguous(),
                               lse_g[s:e], scale)
            for i, g in enumerate(grads):
                dpart[s:e, :, i].copy_(g.transpose(1, 2))
        lo += b * L
        lo_lse += b * heads * L
    return dqkv


@_grouped_bwd.register_fake
def _(dout, qkv, out, lse, groups, heads):
    return torch.empty_like(qkv)


def _setup(ctx, inputs, output) -> None:
    qkv, groups, heads = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.groups, ctx.heads = groups, heads


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return _grouped_bwd(dout, qkv, out, lse, ctx.groups, ctx.heads), None, None


_grouped_fwd.register_autograd(_backward, setup_context=_setup)


def uses_block_backward(x: torch.Tensor, dropout_p: float) -> bool:
    """Whether attention on ``x`` takes the flash-forward / block-backward route: CPU, bf16,
    no dropout (the route recomputes P, so it cannot replay a dropout draw)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and dropout_p == 0.0


def grouped_causal_attention(qkv: torch.Tensor, groups: list[tuple[int, int]], heads: int,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Causal self-attention of packed rows in groups, with autograd.

    qkv [M, 3d]: groups laid end to end, group g = b_g rows x L_g slots, each slot's
    [q | k | v] (heads of d_h = d / heads each) -> [M, d], softmax(Q K^T / sqrt(d_h) + causal) V
    per row. bf16 on CPU without dropout: one op, flash forward + block backward writing
    straight into the [M, 3d] gradient (module docstring); anything else: SDPA per group
    (``is_causal``; on CUDA its flash kernel)."""
    if uses_block_backward(qkv, dropout_p) and torch.is_grad_enabled():
        return _grouped_fwd(qkv.contiguous(), [x for g in groups for x in g], heads)[0]
    # split / unbind, not slices: their backward is one concatenation / stack, where each
    # slice's gradient would be zero-filled to the whole buffer and added
    outs, d = [], qkv.shape[1] // 3
    for part, (b, L) in zip(qkv.split([b * L for b, L in groups]), groups):
        q, k, v = (z.transpose(1, 2) for z in part.view(b, L, 3, heads, d // heads).unbind(2))  # [b, H, L, d_h]
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # [b, H, L, d_h]
        outs.append(o.transpose(1, 2).reshape(b * L, d))
    return torch.cat(outs) if outs else qkv.new_zeros(0, d)


def causal_attention_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """One group: q, k, v [B, H, L, d_h] -> [B, H, L, d_h] through :func:`grouped_causal_attention`."""
    B, H, L, dh = q.shape
    qkv = torch.stack([q, k, v], dim=2).permute(0, 3, 2, 1, 4).reshape(B * L, 3 * H * dh)  # [B L, 3d]
    out = grouped_causal_attention(qkv, [(B, L)], H, dropout_p)  # [B L, d]
    return out.view(B, L, H, dh).transpose(1, 2)
