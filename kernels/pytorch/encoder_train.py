"""The encoder's training path: the stock layers' math through
``F.scaled_dot_product_attention``, with one additive mask built once for all layers.

Same computation as :func:`transact.kernels.pytorch.encoder.encoder_reference` (post-LN
layers, ReLU FFN; the stock ``nn.TransformerEncoder`` stays the parameter container, so
checkpoints and the SKUT kernel load the same weights), per layer::

    [Q | K | V] = X W_in^T + b_in                          [B, S, 3d]  one GEMM, views split it
    A           = softmax(Q K^T / sqrt(d_h) + M) V         [B, H, S, d_h]  SDPA (dropout p on the weights)
    X           = LN1(X + drop(A W_out^T + b_out))         [B, S, d]
    X           = LN2(X + drop(W_2 drop(relu(W_1 X + b_1)) + b_2))

    M[b, 0, i, j] = 0 if allowed(i, j) else -inf           [B, 1, S, S]  built once per forward

with ``allowed`` exactly the reference's (:func:`~transact.kernels.pytorch.encoder.attention_mask`:
causal, padded keys blocked, the diagonal always allowed). So every row of M has a
finite entry, and every position -- padded queries and all-padding rows included -- is
the reference's to float rounding, in the forward and in the gradients (tested).

What the stock module costs in training and this path does not (``torch.profiler`` on the
v2 training step, batch 256, |S_all| 192, 2 threads; the tables are in docs/ablation.md):

- ``nn.MultiheadAttention`` transposes batch-first inputs to sequence-first copies and
  splits Q/K/V through an unflatten + transpose whose backward zero-fills and copies a
  [3, S, B, d] buffer per layer (fill_ + copy_ of 3 x 192 x 256 x 64 floats: the largest
  items of the stock profile, with 135 MB of freshly faulted pages per step against 39 MB
  here) -- here Q/K/V are views of the [B, S, 3d] projection and the backward of ``split``
  is one concatenation;
- it turns the boolean [B, S, S] mask into a float one in every layer (fill, masked_fill,
  add) -- here one float mask serves both layers.

What is left is mostly the attention kernel itself (~35% of the step, flash forward +
backward at ~150 GFLOP/s) and the GEMMs (~28%). Splitting the queries into causal blocks
(keys [0, e) for queries [s, e)) skips up to 42% of the attention FLOPs but was slower
here: the CPU flash kernel runs short query blocks less efficiently (forward, 1 thread:
3 calls of 64 queries over all keys 30 ms, one call of 192 queries 23 ms), and bf16 flash attention is
no faster than fp32 on this CPU (measured; the numbers are in docs/ablation.md).

Device kernels. On CPU, SDPA with a float mask runs the flash-attention kernel (it skips
no work for causality at S = 192; see encoder_cpu.py). On CUDA the same call goes to the
memory-efficient kernel, which takes an additive mask (FlashAttention takes none: it would
need ``is_causal`` and no padding) -- expected from PyTorch's SDPA dispatch, not measured
here (no GPU). fp16/bf16 inputs (autocast) get the mask in their dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transact.kernels.pytorch.encoder import stock_layer_issue


def train_unsupported_reason(encoder: nn.TransformerEncoder) -> str | None:
    """Why this path cannot run ``encoder`` (then the dispatcher runs the reference)."""
    for i, layer in enumerate(encoder.layers):
        if (issue := stock_layer_issue(layer)) is not None:
            return f"layer {i}: {issue}"
    return None


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """valid bool [B, S] -> M [B, 1, S, S] of ``dtype``: 0 where the reference allows
    query i to see key j, -inf elsewhere (the diagonal is always allowed)."""
    S = valid.shape[1]
    pos = torch.arange(S, device=valid.device)
    blocked = (pos[None, :] > pos[:, None])[None] | ~valid[:, None, :]  # [B, S, S] j > i or key padded
    blocked &= pos[None, :] != pos[:, None]  # [B, S, S] the diagonal stays allowed
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(blocked, float("-inf"), zero)[:, None]  # [B, 1, S, S]


def encoder_forward_train(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder forward with the causal + padding mask, for training (autograd, dropout);
    x [B, S, d] float, valid bool [B, S] -> [B, S, d]. Equals
    :func:`~transact.kernels.pytorch.encoder.encoder_reference` at every position."""
    B, S, d = x.shape
    if B == 0 or S == 0:
        return encoder(x)  # nothing to attend; keeps the autograd graph
    mask = None
    for layer in encoder.layers:
        attn = layer.self_attn
        H = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, S, 3d]
        if mask is None or mask.dtype != qkv.dtype:  # once (autocast: in the projections' dtype)
            mask = additive_mask(valid, qkv.dtype)  # [B, 1, S, S]
        q, k, v = (t.view(B, S, H, d // H).transpose(1, 2) for t in qkv.split(d, dim=-1))  # [B, H, S, d/H] views
        p = attn.dropout if attn.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, S, d/H]
        a = a.transpose(1, 2).reshape(B, S, d)  # [B, S, d] (a view when H = 1)
        x = layer.norm1(x + layer.dropout1(F.linear(a, attn.out_proj.weight, attn.out_proj.bias)))  # [B, S, d]
        x = layer.norm2(x + layer.dropout2(layer.linear2(layer.dropout(F.relu(layer.linear1(x))))))  # [B, S, d]
    if encoder.norm is not None:
        x = encoder.norm(x)  # [B, S, d]
    return x
