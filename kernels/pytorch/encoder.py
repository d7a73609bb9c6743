"""PyTorch reference of the encoder forward (what SKUT fuses) and its attention mask
(paper §3.2.2, §3.3.2).

The encoder is PyTorch's stock ``nn.TransformerEncoder`` (built by
:func:`transact.model.encoder.make_encoder`: post-LN layers, ReLU FFN,
``batch_first=True``); the fused kernels load its weights as they are.

Attention mask, for query position i and key position j of one example:

    allowed(i, j) = (j <= i and valid[j]) or j == i

- causal: a token sees only itself and earlier tokens (S_all is laid out in time
  order, see :mod:`transact.features.config`);
- padding: padded keys are never seen;
- the diagonal is always allowed so that padded queries (and an all-padding cold-start
  row) have one key and softmax never divides by zero; their outputs are ignored by
  max-pooling over valid tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stock_layer_issue(layer: nn.TransformerEncoderLayer) -> str | None:
    """How ``layer`` differs from the layer :func:`transact.model.encoder.make_encoder` builds
    (packed, batch-first Q/K/V without extra biases, post-LN, ReLU), or None: what the fused
    kernels assume."""
    attn = layer.self_attn
    if not attn._qkv_same_embed_dim or not attn.batch_first:
        return "separate q/k/v dims or batch_first=False"
    if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    if layer.norm_first:
        return "pre-LN (norm_first=True)"
    if not (layer.activation is F.relu or isinstance(layer.activation, nn.ReLU)):
        return "activation is not ReLU"
    return None


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid: bool [B, S] -> blocked: bool [B, S, S] (True = query i may not see key j)."""
    S = valid.shape[1]
    pos = torch.arange(S, device=valid.device)
    causal_ok = pos[None, :] <= pos[:, None]  # [S, S] j <= i
    allowed = causal_ok[None] & valid[:, None, :]  # [B, S, S]
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=valid.device)[None]  # [B, S, S]
    return ~allowed


def encoder_reference(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of the encoder forward with the causal + padding mask.

    x: [B, S, d] float, valid: bool [B, S] -> [B, S, d].
    """
    n_heads = encoder.layers[0].self_attn.num_heads
    blocked = attention_mask(valid)  # [B, S, S]
    if n_heads > 1:
        blocked = blocked.repeat_interleave(n_heads, dim=0)  # [B*H, S, S]
    return encoder(x, mask=blocked)
