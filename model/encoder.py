"""The sequence encoder (paper §3.2.2, §3.3.2): the one place that decides how a batch runs.

:class:`SequenceEncoder` is PyTorch's stock ``nn.TransformerEncoder`` (post-LN layers, ReLU
FFN, ``batch_first=True``; 2 layers, 1 head, d_model 64, FFN 32): the module is the parameter
container, so checkpoints keep their keys and the fused kernels load its weights as they are.
Its :meth:`SequenceEncoder.encode` takes a batch's token mask and a builder of token features
and chooses the layout, so the model has one forward whatever runs underneath::

    training (autograd), layers the packed path knows, no appended token:
        packed   tokens = the N valid tokens, flat          U [N, d]   (kernels.dispatch.encoder_tokens)
    otherwise (inference; the BST candidate token; the stock reference):
        padded   tokens = every slot, [B, S, d]             U [B, S, d] (kernels.dispatch.encoder_forward)

:class:`Encoded` holds the outputs in that layout and answers what the model asks of them
(max-pool per row, the [B, S, .] view for first-K, the rows of given slots for the NAL), so the
model never looks at the layout. Valid positions agree to float rounding in both layouts; the
padded layout is static in shape (ONNX export, ``torch.compile``, CUDA graphs of serving).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from transact.kernels import dispatch

#: Token features for the tokens at ``(rows, slots)`` ([M] each) -> [M, d]; ``rows is None``
#: means every slot of every row, laid out [B, L, d].
TokenFeatures = Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor]


@dataclass
class Encoded:
    """Encoder outputs in the layout :meth:`SequenceEncoder.encode` chose.

    ``U``: [N, d] (packed: the valid tokens, row-major) or [B, S, d] (padded); ``valid`` bool [B, S].
    """

    U: torch.Tensor
    valid: torch.Tensor
    #: packed only: the (row, slot) of each of the N tokens, row-major
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.rows is not None

    def max_pool(self, z: torch.Tensor) -> torch.Tensor:
        """z: per-token values in this layout ([N, o] or [B, S, o]) -> [B, o], the max over a
        row's valid tokens (0 for a row without any)."""
        if self.packed:
            # rows are contiguous runs of z (row-major): a segment max (-inf for a row without
            # tokens, then 0). Tied maxima share the gradient evenly (max(dim) gives it to one of
            # them): the same value and total gradient, another subgradient -- ties are rare in
            # fp32, not in bf16
            n = self.valid.sum(dim=1)  # [B]
            pooled = torch.segment_reduce(z, "max", lengths=n, unsafe=True)  # [B, o]
            return torch.where(n[:, None] > 0, pooled, torch.zeros_like(pooled))  # [B, o]
        zm = z.masked_fill(~self.valid[..., None], float("-inf"))  # [B, S, o]
        # With autograd, max (with indices) rather than amax: its backward scatters into the
        # argmax rows instead of comparing all of z with the max (same values; the same
        # gradient unless two tokens tie). Inference keeps amax (the exported graphs').
        pooled = zm.max(dim=1).values if torch.is_grad_enabled() else zm.amax(dim=1)  # [B, o]
        return torch.where(self.valid.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))  # [B, o]

    def padded(self, z: torch.Tensor) -> torch.Tensor:
        """z in this layout -> [B, S, o] (zeros at invalid slots when packed)."""
        return dispatch.scatter_tokens(z, self.valid) if self.packed else z

    def at_slots(self, idx: torch.Tensor) -> torch.Tensor:
        """U at slots idx [r] of every row -> [B, r, d] (zeros where a slot holds no token
        when packed; whatever the encoder left there when padded -- callers mask by ``valid``)."""
        if self.rows is None or self.cols is None:
            return self.U[:, idx]  # [B, r, d]
        B, S = self.valid.shape
        rows, cols = self.rows, self.cols  # [N] each
        at = torch.full((S,), -1, dtype=torch.long, device=self.U.device)
        at[idx] = torch.arange(idx.numel(), device=self.U.device)  # [S] position among idx, or -1
        j = at[cols]  # [N]
        keep = j >= 0
        return self.U.new_zeros(B, idx.numel(), self.U.shape[1]).index_put((rows[keep], j[keep]), self.U[keep])


class SequenceEncoder(nn.TransformerEncoder):
    """The stock encoder layers plus :meth:`encode`, which owns the packed-versus-padded choice."""

    def __init__(self, d_model: int = 64, n_heads: int = 1, ffn_dim: int = 32, n_layers: int = 2,
                 dropout: float = 0.0) -> None:
        layer = nn.TransformerEncoderLayer(
            d_model=d_model, nhead=n_heads, dim_feedforward=ffn_dim, dropout=dropout,
            activation="relu", batch_first=True, norm_first=False,
        )
        super().__init__(layer, num_layers=n_layers, enable_nested_tensor=False)

    def encode(self, valid: torch.Tensor, features: TokenFeatures, append: torch.Tensor | None = None) -> Encoded:
        """valid bool [B, L]: the input tokens; ``features`` builds their F (see :data:`TokenFeatures`);
        ``append`` [B, d]: one extra, always valid, last token per row (BST's candidate) or None."""
        if append is None and dispatch.trains_on_tokens(self):
            rows, cols = valid.nonzero(as_tuple=True)  # [N] each, row-major
            t = features(rows, cols)  # [N, d]
            return Encoded(dispatch.encoder_tokens(self, t, valid), valid, rows, cols)  # [N, d]
        x, valid = padded_input(features(None, None), valid, append)  # [B, S, d], [B, S]
        return Encoded(dispatch.encoder_forward(self, x, valid), valid)  # [B, S, d]


def padded_input(x: torch.Tensor, valid: torch.Tensor, append: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded layout's input: x [B, L, d], valid bool [B, L], plus ``append`` [B, d] as one
    more, always valid, last token when given -> [B, S, d], [B, S] (S = L or L + 1)."""
    if append is None:
        return x, valid
    x = torch.cat([x, append[:, None, :]], dim=1)  # [B, L + 1, d]
    return x, torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)  # [B, L + 1]


def make_encoder(d_model: int = 64, n_heads: int = 1, ffn_dim: int = 32, n_layers: int = 2,
                 dropout: float = 0.0) -> SequenceEncoder:
    return SequenceEncoder(d_model, n_heads, ffn_dim, n_layers, dropout)
