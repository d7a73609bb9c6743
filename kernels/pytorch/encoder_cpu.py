"""The encoder's CPU inference path: the stock layers' math, laid out for PyTorch's CPU
flash-attention kernel.

Same computation as :func:`transact.kernels.pytorch.encoder.encoder_reference` (post-LN layers,
ReLU FFN), per layer::

    [Q | K | V] = X W_in^T + b_in                    [B, S, 3d]   one GEMM, views split it
    A           = softmax(Q K^T / sqrt(d_h) + M) V   [B, H, S, d_h]  flash kernel, per query block
    X           = LN1(X + A W_out^T + b_out)         [B, S, d]
    X           = LN2(X + W_2 relu(W_1 X + b_1) + b_2)

What differs from the stock module is only the layout and the mask:

- the stock ``nn.MultiheadAttention`` turns batch-first inputs into sequence-first copies
  and converts the boolean [B, S, S] mask into a float one in every layer (fill,
  masked_fill, add: about a third of the stock CPU forward); here Q/K/V stay views of one
  [B, S, 3d] projection, and the float mask is built once for all layers:
  M[b, 0, i, j] = -inf if j > i, else 0 if valid[b, j], else -1e9 (SDPA takes a mask or
  ``is_causal``, not both; the CPU flash kernel skips no work for ``is_causal`` at
  |S_all| = 192 anyway -- measured equal);
- causality skips work: queries [s, s + b) are attended over keys [0, s + b) only (one
  flash call per query block of b = 32), about 58% of the full S x S at |S_all| = 192;
  the keys cut off are all masked for those queries (weight 0), so each row's result is
  the same (bit-equal on the bench batch);
- -1e9 instead of -inf, and no diagonal exception. The reference's exception (a token
  always sees itself) only exists so that a padded query with no visible key still has
  one. For a *valid* query i, key i is valid and unmasked, so the row maximum is a real
  score and every blocked key's weight is exp(-1e9 + s - max) = 0 exactly in fp32: valid
  outputs are the reference's to the bit when the kernels agree, and to float rounding
  otherwise (tested). A padded query sees the earlier valid keys (or, with none, its
  earlier keys at -1e9): a finite output, still causal, where the reference's differs;
  padded outputs are never read (max-pooling, the NAL and "first K" take valid tokens only; as keys of the
  next layer they are masked).

Used for inference only (the dispatcher sends training and autograd to the stock module).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transact.kernels.pytorch.encoder import stock_layer_issue

#: additive mask of a padded key: finite (no NaN on a query without valid keys), and far
#: below any attention score, so that exp underflows to exactly 0 (see the module docstring)
PAD_SCORE: float = -1e9

#: queries per flash-attention call (measured on the 2-core bench machine, compiled, 256 x
#: 192 tokens: one call 91 ms, blocks of 96 / 64 / 32: 84 / 83 / 82 ms)
QUERY_BLOCK: int = 32


def unsupported_reason(encoder: nn.TransformerEncoder) -> str | None:
    """Why this path cannot run ``encoder`` (then the dispatcher runs the reference)."""
    if encoder.training:
        return "training mode"
    for i, layer in enumerate(encoder.layers):
        if (issue := stock_layer_issue(layer)) is not None:
            return f"layer {i}: {issue}"
    if encoder.norm is not None:
        return "a final norm"
    return None


def encoder_forward_cpu(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor,
                        query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """Encoder forward with the causal + padding mask; x [B, S, d] float, valid bool [B, S]
    -> [B, S, d]. Valid positions equal :func:`~transact.kernels.pytorch.encoder.encoder_reference`;
    padded positions are finite and unspecified."""
    if query_block < 1:
        raise ValueError(f"query_block must be >= 1, got {query_block}")
    B, S, d = x.shape
    if B == 0 or S == 0:
        return x.clone()
    pos = torch.arange(S, device=x.device)
    later = pos[None, :] > pos[:, None]  # [S, S] j > i
    mask = torch.zeros(B, 1, S, S, dtype=x.dtype, device=x.device)  # [B, 1, S, S]
    mask.masked_fill_(~valid[:, None, None, :], max(PAD_SCORE, torch.finfo(x.dtype).min))  # fp16: -65504
    mask.masked_fill_(later, float("-inf"))  # key i is never later: no row is all -inf
    for layer in encoder.layers:
        attn = layer.self_attn
        H = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, S, 3d]
        q, k, v = qkv.view(B, S, 3, H, d // H).permute(2, 0, 3, 1, 4)  # each [B, H, S, d/H], views
        a = torch.cat([
            F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], attn_mask=mask[:, :, s:e, :e])
            for s, e in ((s, min(S, s + query_block)) for s in range(0, S, query_block))
        ], dim=2)  # [B, H, S, d/H]: query block [s, e) over keys [0, e)
        a = a.transpose(1, 2).reshape(B, S, d)  # [B, S, d] (a view when H = 1)
        x = layer.norm1(x + F.linear(a, attn.out_proj.weight, attn.out_proj.bias))  # [B, S, d]
        x = layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))  # [B, S, d]
    return x
