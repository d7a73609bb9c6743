"""The one dispatch point of every kernel: Triton on CUDA, the PyTorch reference elsewhere.

The model and the service call only these functions.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

#: encoders of the training (autograd) path: "sdpa" (:mod:`transact.kernels.pytorch.encoder_train`,
#: the default: the valid tokens only, packed, causal SDPA -- the name kept for existing
#: ``TRANSACT_TRAIN_ENCODER`` settings) or "stock" (the ``nn.TransformerEncoder`` module with
#: its boolean mask, the reference; what training ran before -- ``transact bench train`` times both)
TRAIN_ENCODERS: tuple[str, ...] = ("sdpa", "stock")
_train_encoder: str = os.environ.get("TRANSACT_TRAIN_ENCODER", "sdpa")


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


def train_encoder() -> str:
    """The training encoder in use (see :data:`TRAIN_ENCODERS`)."""
    if _train_encoder not in TRAIN_ENCODERS:
        raise ValueError(f"TRANSACT_TRAIN_ENCODER must be one of {TRAIN_ENCODERS}, got {_train_encoder!r}")
    return _train_encoder


@contextlib.contextmanager
def use_train_encoder(name: str) -> Iterator[None]:
    """Runs the block with training encoder ``name`` (the benchmark's old and new paths)."""
    global _train_encoder
    if name not in TRAIN_ENCODERS:
        raise ValueError(f"training encoder must be one of {TRAIN_ENCODERS}, got {name!r}")
    before, _train_encoder = _train_encoder, name
    try:
        yield
    finally:
        _train_encoder = before


def encoder_forward(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder forward with the causal + padding mask; x [B, S, d], valid bool [B, S].

    Inference on CUDA runs the fused SKUT kernel, inference elsewhere the flash-attention
    layout of the same layers (:mod:`transact.kernels.pytorch.encoder_cpu`); training
    (autograd or dropout) runs the same layers on the valid tokens, packed, with causal
    attention (:mod:`transact.kernels.pytorch.encoder_train`; 0 at padded positions), or
    the stock module where that path cannot run it or ``TRANSACT_TRAIN_ENCODER=stock``.
    Valid positions agree to float rounding.
    """
    inference = not encoder.training and not torch.is_grad_enabled()
    if inference and _use_triton(x):
        from transact.kernels.triton.skut import skut_forward

        return skut_forward(encoder, x, valid)
    from transact.kernels.pytorch.encoder import encoder_reference
    from transact.kernels.pytorch.encoder_cpu import encoder_forward_cpu, unsupported_reason

    if inference and not x.is_cuda and unsupported_reason(encoder) is None:
        return encoder_forward_cpu(encoder, x, valid)
    if not inference and _packed_path(encoder):
        from transact.kernels.pytorch.encoder_train import encoder_forward_train

        return encoder_forward_train(encoder, x, valid)
    return encoder_reference(encoder, x, valid)


def _packed_path(encoder: nn.TransformerEncoder) -> bool:
    """Whether training runs ``encoder`` on the packed path (selected, and its layers known)."""
    from transact.kernels.pytorch.encoder_train import train_unsupported_reason

    return train_encoder() == "sdpa" and train_unsupported_reason(encoder) is None


def trains_on_tokens(encoder: nn.TransformerEncoder) -> bool:
    """Whether this forward of ``encoder`` is a training one that :func:`encoder_tokens` runs
    packed (so a caller may build the valid tokens alone instead of [B, S, d])."""
    return (encoder.training or torch.is_grad_enabled()) and _packed_path(encoder)


def encoder_tokens(encoder: nn.TransformerEncoder, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The training encoder on the valid tokens alone: t [N, d] = ``x[valid]`` (row-major),
    valid bool [B, S] -> [N, d], equal to ``encoder_forward(encoder, x, valid)[valid]``.

    The packed training path takes them as they are; the stock module (or a layer that path
    cannot run) gets them scattered into [B, S, d] and gathered back."""
    if _packed_path(encoder):
        from transact.kernels.pytorch.encoder_train import encoder_tokens_train

        return encoder_tokens_train(encoder, t, valid)
    from transact.kernels.pytorch.encoder import encoder_reference
    from transact.kernels.pytorch.packing import scatter_tokens, tokens_of

    return tokens_of(encoder_reference(encoder, scatter_tokens(t, valid), valid), valid)  # [N, d]
