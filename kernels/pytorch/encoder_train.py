"""The encoder's training path: the stock layers' math on the valid tokens only, with causal
attention over each row's tokens packed to the front.

Same computation as :func:`transact.kernels.pytorch.encoder.encoder_reference` at every
valid position (post-LN layers, ReLU FFN; the stock ``nn.TransformerEncoder`` stays the
parameter container, so checkpoints and the SKUT kernel load the same weights).

Packing. Row b has n_b valid tokens (in time order); the reference lets valid query i see
the valid keys j <= i. Gather them to the front of the row, in order, and that is exactly
causal attention over the packed row: padded slots sit after every valid query. So::

    T        = X[valid]                                      [N, d]  N = sum_b n_b, row-major
    per layer:
    QKV      = pack(T W_in^T + b_in)                         [M, 3d] slots of the length groups
    A        = unpack(causal_attention(QKV))                 [N, d]  per group [b_g, H, L_g, d_h]
    T        = LN1(T + drop(A W_out^T + b_out))              [N, d]
    T        = LN2(T + drop(W_2 drop(relu(W_1 T + b_1)) + b_2))
    U        = scatter(T) into [B, S, d], 0 at padded slots (encoder_forward_train only)

with rows sorted by length into groups, each attended at its own length
(:mod:`transact.kernels.pytorch.packing`). Every per-token step -- projections, norms, FFN,
residuals and their gradients -- runs on N tokens instead of B x S, attention on each
group's L_g <= S with no mask to build or read (docs/ablation.md, "Training throughput").

Padded positions. The reference gives a padded query its own key and the earlier valid
ones; the model never reads those outputs (max-pooling, first-K and the NAL all mask by
validity), so here they are 0 -- the loss and every gradient are the reference's to float
rounding (tests/model/test_model_train_path.py), the outputs at valid positions too.

Precision. Under bf16/fp16 autocast the whole encoder runs in that dtype with autocast
off inside: the tokens and every weight are cast once, and the residual stream and the
attention keep it, instead of autocast's fp32 norms and residual adds that cast the
activations back and forth around every matmul; on CPU the layer norms take the fp32 affine
parameters (statistics in fp32 either way; faster than all-bf16, 3.1 vs 3.6 ms a call). The
output is in that dtype.

Device kernels. On CPU, bf16 attention runs the flash forward and a blocked GEMM backward
on the matrix units (:mod:`transact.kernels.pytorch.attention_train`), and the residual add +
layer norm is fused by ``torch.compile``; fp32 runs SDPA's flash kernel both ways. On CUDA
SDPA with ``is_causal`` and no mask is eligible for FlashAttention -- expected from
PyTorch's SDPA dispatch, not measured here (no GPU).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from transact.kernels.pytorch.attention_train import grouped_causal_attention
from transact.kernels.pytorch.compiled import CompiledOrEager
from transact.kernels.pytorch.encoder import stock_layer_issue
from transact.kernels.pytorch.packing import length_groups, pack, scatter_tokens, tokens_of, unpack


def train_unsupported_reason(encoder: nn.TransformerEncoder) -> str | None:
    """Why this path cannot run ``encoder`` (then the dispatcher runs the reference)."""
    for i, layer in enumerate(encoder.layers):
        if (issue := stock_layer_issue(layer)) is not None:
            return f"layer {i}: {issue}"
    if encoder.norm is not None and not isinstance(encoder.norm, nn.LayerNorm):
        return f"final norm is {type(encoder.norm).__name__}, not LayerNorm"
    return None


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The reduced dtype autocast would give ``x``'s matmuls here (bf16/fp16), or None."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    dt = torch.get_autocast_dtype(dev)
    return dt if dt in (torch.bfloat16, torch.float16) else None


def encoder_forward_train(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder forward with the causal + padding mask, for training (autograd, dropout);
    x [B, S, d] float, valid bool [B, S] -> [B, S, d]: the reference's at valid positions,
    0 at padded ones (module docstring); in autocast's dtype under bf16/fp16 autocast."""
    return scatter_tokens(encoder_tokens_train(encoder, tokens_of(x, valid), valid), valid)  # [B, S, d]


def encoder_tokens_train(encoder: nn.TransformerEncoder, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The same on the valid tokens alone: t [N, d], the tokens ``x[valid]`` (row-major, so each
    row's in time order), valid bool [B, S] -> [N, d]."""
    dt = autocast_dtype(t)
    if dt is None:
        return _packed(encoder, t, valid, lambda p: p)
    with torch.autocast(t.device.type, enabled=False):
        return _packed(encoder, t.to(dt), valid, lambda p: p.to(dt))


def _packed(encoder: nn.TransformerEncoder, t: torch.Tensor, valid: torch.Tensor,
            w: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The layers on the valid tokens t [N, d], every parameter passed through ``w``."""
    N, d = t.shape
    if N == 0:  # no token (an empty batch, or every row empty): every parameter stays in the
        # graph with a zero gradient, as in the [B, S, d] path (DDP expects each to get one)
        return t + torch.stack([(q.reshape(-1)[:1] * 0).sum() for q in encoder.parameters()]).sum().to(t.dtype)
    pk = length_groups(valid)
    for layer in encoder.layers:
        attn = layer.self_attn
        H = attn.num_heads
        # One QKV GEMM and one gather into the groups' slots; the attention reads its groups
        # and Q/K/V as views and (bf16 on CPU) writes one [M, 3d] gradient: per-part slices
        # would each be zero-filled to the whole buffer and added, splits concatenated.
        qkv = pack(F.linear(t, w(attn.in_proj_weight), w(attn.in_proj_bias)), pk)  # [M, 3d] slots
        p = attn.dropout if attn.training else 0.0
        a = unpack(grouped_causal_attention(qkv, pk.groups, H, dropout_p=p), pk)  # [N, d]
        t = _add_norm(layer.norm1, t, layer.dropout1(F.linear(a, w(attn.out_proj.weight), w(attn.out_proj.bias))))
        h = layer.dropout(F.relu(F.linear(t, w(layer.linear1.weight), w(layer.linear1.bias))))  # [N, f]
        t = _add_norm(layer.norm2, t, layer.dropout2(F.linear(h, w(layer.linear2.weight), w(layer.linear2.bias))))
    if isinstance(encoder.norm, nn.LayerNorm):  # any other final norm: train_unsupported_reason
        t = F.layer_norm(t, encoder.norm.normalized_shape, *_norm_params(encoder.norm, t), encoder.norm.eps)
    return t


def _add_norm_eager(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    return F.layer_norm(x + y, (x.shape[-1],), weight, bias, eps)  # [N, d]


#: residual add + layer norm, forward and backward fused by torch.compile: 2.5 vs 3.7 ms per
#: call on [25255, 64] bf16 (the eager kernels take several passes over the tokens)
_add_norm_fused = CompiledOrEager(_add_norm_eager, "residual + layer norm")


def _norm_params(ln: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's affine parameters for activations ``x``: as they are (fp32) on CPU, whose
    kernel takes the mixed pair; in ``x``'s dtype elsewhere (CUDA's kernel expects one dtype)."""
    if x.device.type == "cpu":
        return ln.weight, ln.bias
    return ln.weight.to(x.dtype), ln.bias.to(x.dtype)


def _add_norm(ln: nn.LayerNorm, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LN(x + y) [N, d] with the module's parameters."""
    fn = _add_norm_fused if x.device.type == "cpu" else _add_norm_eager
    return fn(x, y, *_norm_params(ln, x), ln.eps)
