"""The one dispatch point of every kernel: Triton on CUDA, the PyTorch reference elsewhere.

The model and the service call only these functions. Which kernels run is a
:class:`KernelConfig` set once at the edge (:func:`configure`; the CLI reads it from its
options), never read from the environment on a call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


class TrainEncoder(enum.StrEnum):
    """The encoder of the training (autograd) path."""

    #: the valid tokens only, packed in length groups, causal attention
    #: (:mod:`transact.kernels.pytorch.encoder_train`): the default
    PACKED = "packed"
    #: the ``nn.TransformerEncoder`` module with its boolean mask: the reference, what training
    #: ran before (``transact bench train`` times both)
    STOCK = "stock"


@dataclass(frozen=True)
class KernelConfig:
    """Which kernels run: set once at the edge (the CLI, a benchmark, a test), read here.

    ``triton``: Triton kernels on CUDA tensors (False: the PyTorch references everywhere).
    ``train_encoder``: see :class:`TrainEncoder`.
    """

    triton: bool = True
    train_encoder: TrainEncoder = TrainEncoder.PACKED

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_encoder", train_encoder_named(self.train_encoder))


def train_encoder_named(name: str) -> TrainEncoder:
    """The :class:`TrainEncoder` called ``name``; one-line ValueError naming the choices."""
    try:
        return TrainEncoder(name)
    except ValueError:
        raise ValueError(f"train encoder must be one of {[e.value for e in TrainEncoder]}, got {name!r}") from None


_config = KernelConfig()


def config() -> KernelConfig:
    """The kernel configuration in force."""
    return _config


def configure(cfg: KernelConfig) -> KernelConfig:
    """Sets the kernel configuration for this process; returns the one it replaces."""
    global _config
    before, _config = _config, cfg
    return before


@contextlib.contextmanager
def using(**changes) -> Iterator[KernelConfig]:
    """Runs the block under the configuration in force with ``changes`` (``using(train_encoder="stock")``)."""
    before = configure(dataclasses.replace(_config, **changes))
    try:
        yield _config
    finally:
        configure(before)


def _use_triton(t: torch.Tensor) -> bool:
    return _config.triton and t.is_cuda


def nn_search(seq_emb_q: torch.Tensor, seq_offsets: torch.Tensor, cand_emb: torch.Tensor,
              cand_offsets: torch.Tensor, k: int, seq_norm: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`transact.kernels.pytorch.nn_search.nn_search` for the contract. ``seq_norm``
    (the tokens' :func:`token_norms`, optional) spares the reference a pass over the tokens;
    the Triton kernel computes them in its own pass over the tokens and does not read it."""
    if _use_triton(seq_emb_q):
        from transact.kernels.triton.nn_search import nn_search_triton

        return nn_search_triton(seq_emb_q, seq_offsets, cand_emb, cand_offsets, k)
    from transact.kernels.pytorch.nn_search import nn_search as reference

    return reference(seq_emb_q, seq_offsets, cand_emb, cand_offsets, k, seq_norm)


def token_norms(emb_q: torch.Tensor) -> torch.Tensor:
    """float32 [T]: |s| of each int8 row, +inf for a zero row -- the NN search's own norms
    (:func:`transact.kernels.pytorch.nn_search.token_norms`), for callers that compute them
    once per item and hand them to :func:`nn_search` as ``seq_norm``."""
    from transact.kernels.pytorch.nn_search import token_norms as norms

    return norms(emb_q)


def encoder_forward(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder forward with the causal + padding mask; x [B, S, d], valid bool [B, S].

    Inference on CUDA runs the fused SKUT kernel, inference elsewhere the flash-attention
    layout of the same layers (:mod:`transact.kernels.pytorch.encoder_cpu`); training
    (autograd or dropout) runs the same layers on the valid tokens, packed, with causal
    attention (:mod:`transact.kernels.pytorch.encoder_train`; 0 at padded positions), or
    the stock module where that path cannot run it or ``KernelConfig.train_encoder`` is ``stock``.
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

    return _config.train_encoder is TrainEncoder.PACKED and train_unsupported_reason(encoder) is None


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


def scatter_tokens(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Valid tokens t [N, d] (row-major) -> [B, S, d] with zeros at invalid slots; see
    :func:`transact.kernels.pytorch.packing.scatter_tokens` (its backward is a gather)."""
    from transact.kernels.pytorch.packing import scatter_tokens as scatter

    return scatter(t, valid)
