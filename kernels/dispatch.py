"""The one dispatch point of every kernel: Triton on CUDA, the PyTorch reference elsewhere.

The model and the service call only these functions.
"""
from __future__ import annotations

import os

import torch
from torch import nn


def _use_triton(t: torch.Tensor) -> bool:
    if os.environ.get("TRANSACT_DISABLE_TRITON") == "1":
        return False
    return t.is_cuda


def nn_search(seq_emb_q: torch.Tensor, seq_offsets: torch.Tensor, cand_emb: torch.Tensor,
              cand_offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`transact.kernels.pytorch.nn_search.nn_search` for the contract."""
    if _use_triton(seq_emb_q):
        from transact.kernels.triton.nn_search import nn_search_triton

        return nn_search_triton(seq_emb_q, seq_offsets, cand_emb, cand_offsets, k)
    from transact.kernels.pytorch.nn_search import nn_search as reference

    return reference(seq_emb_q, seq_offsets, cand_emb, cand_offsets, k)


def encoder_forward(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder forward with the causal + padding mask; x [B, S, d], valid bool [B, S].

    Inference on CUDA runs the fused SKUT kernel, inference elsewhere the flash-attention
    layout of the same layers (:mod:`transact.kernels.pytorch.encoder_cpu`); training
    (autograd) always runs the PyTorch module. Valid positions agree to float rounding.
    """
    inference = not encoder.training and not torch.is_grad_enabled()
    if inference and _use_triton(x):
        from transact.kernels.triton.skut import skut_forward

        return skut_forward(encoder, x, valid)
    from transact.kernels.pytorch.encoder_cpu import encoder_forward_cpu, unsupported_reason
    from transact.kernels.pytorch.encoder import encoder_reference

    if inference and not x.is_cuda and unsupported_reason(encoder) is None:
        return encoder_forward_cpu(encoder, x, valid)
    return encoder_reference(encoder, x, valid)
