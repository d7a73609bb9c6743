"""Packing a batch's valid tokens into length groups for attention, and back.

The training encoder keeps the valid tokens flat, t [N, d] (``x[valid]``, row-major, so each
row's tokens in time order), and attends them in a few groups of rows of similar length::

    rows sorted by length n_b, cut into LENGTH_GROUPS groups; group g: b_g rows, L_g = max n_b
    slot (r, j) of group g  <-  token j of the group's row r        for j < n_r   (real)
                            <-  token 0                             for j >= n_r  (filler)

A filler slot only needs a finite value: it sits after every real query of its row, so
causal attention never lets a real query see it, and the model discards its output. Its
gradients are then exactly 0 (no real query attends it; its own output gradient is 0), which
makes both gathers' backward another gather (:class:`GatherRows`), instead of PyTorch's
zero-fill and scatter-add.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: rows are sorted by length and cut into this many groups, each attended at its own
#: length: on the benchmark batch (half its slots padding) the attention's L^2 work is
#: 0.54x of one length for all rows (1 group 1.0, 2 0.70, 4 0.54, 8 0.46)
LENGTH_GROUPS: int = 4


def round16(n: int) -> int:
    """n up to a multiple of 16: the CPU flash kernel at L = 173 took 10-11 ms, at 176 5-8 ms
    (bf16, batch 256)."""
    return -(-n // 16) * 16


@dataclass
class Packing:
    """The groups of one batch. ``slots`` [M] (M = sum b_g L_g): the token in each slot, groups
    laid end to end (fillers -> 0); ``slots_or_zero`` the same with fillers -> N (a zero row);
    ``back`` [N]: the slot of each token; ``groups``: (b_g, L_g) in order."""

    groups: list[tuple[int, int]]
    slots: torch.Tensor
    slots_or_zero: torch.Tensor
    back: torch.Tensor

    @property
    def sizes(self) -> list[int]:
        return [b * L for b, L in self.groups]


def length_groups(valid: torch.Tensor, groups: int = LENGTH_GROUPS) -> Packing:
    """The packing of valid bool [B, S] (module docstring). Rows without tokens sort first: a
    group of them alone gets no slot; sharing a group with rows that have tokens, they get
    filler slots only."""
    n = valid.sum(dim=1)  # [B]
    N = int(n.sum())
    offs = torch.cumsum(n, 0) - n  # [B] first flat token of each row
    order = torch.argsort(n, stable=True)  # [B] rows, shortest first
    size = -(-valid.shape[0] // groups)
    back = torch.empty(N, dtype=torch.long, device=valid.device)  # [N]
    shapes, slots, real_all, base = [], [], [], 0
    for g in range(0, valid.shape[0], size):
        rows = order[g:g + size]  # [b]
        L = round16(int(n[rows].max()))
        if L == 0:
            continue  # rows without tokens: nothing to attend
        j = torch.arange(L, device=valid.device)  # [L]
        real = (j < n[rows, None]).reshape(-1)  # [b L] the slot holds a token
        idx = (offs[rows, None] + j).reshape(-1)  # [b L]
        back[idx[real]] = base + real.nonzero().squeeze(1)
        shapes.append((rows.numel(), L))
        slots.append(torch.where(real, idx, 0))
        real_all.append(real)
        base += rows.numel() * L
    flat = torch.cat(slots) if slots else back.new_zeros(0)  # [M]
    real = torch.cat(real_all) if real_all else torch.zeros(0, dtype=torch.bool, device=valid.device)
    return Packing(shapes, flat, torch.where(real, flat, N), back)


def tokens_of(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x [B, S, d], valid bool [B, S] -> the valid tokens [N, d], row-major (``x[valid]``)."""
    B, S, d = x.shape
    return x.reshape(B * S, d).index_select(0, valid.reshape(-1).nonzero().squeeze(1))


def scatter_tokens(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The inverse: tokens t [N, d] -> [B, S, d] with 0 at the slots ``valid`` leaves out."""
    B, S = valid.shape
    src = valid.reshape(-1).nonzero().squeeze(1)  # [N]
    return t.new_zeros(B * S, t.shape[1]).index_copy(0, src, t).view(B, S, t.shape[1])


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0 for a contiguous 2-d x. Rows whose bytes divide by 8 are moved as
    int64 words: ``index_select`` of bf16 [25255, 192] rows took 2.7 ms, of the same bytes as
    int64 0.4 ms."""
    x = x.contiguous()
    if x.shape[1] * x.element_size() % 8 == 0 and x.dtype != torch.int64:
        return x.view(torch.int64).index_select(0, index).view(x.dtype)
    return x.index_select(0, index)


class GatherRows(torch.autograd.Function):
    """y = x[index] along dim 0, with the backward dx = dy'[inverse]: ``inverse`` picks, for each
    row of x, the one row of y that holds it -- exact when every other row of y that reads it
    gets a zero gradient (fillers). With ``zero_row`` the backward reads from dy with a zero row
    appended (``inverse`` pointing at it for rows of x that no row of y holds)."""

    @staticmethod
    def forward(ctx, x, index, inverse, zero_row):
        ctx.save_for_backward(inverse)
        ctx.zero_row = zero_row
        return _take_rows(x, index)

    @staticmethod
    def backward(ctx, dy):
        (inverse,) = ctx.saved_tensors
        if ctx.zero_row:
            dy = torch.cat([dy, dy.new_zeros(1, dy.shape[1])])
        return _take_rows(dy, inverse), None, None, None


def pack(t: torch.Tensor, p: Packing) -> torch.Tensor:
    """Tokens t [N, c] -> slots [M, c] (fillers hold token 0)."""
    return GatherRows.apply(t, p.slots, p.back, False)


def unpack(a: torch.Tensor, p: Packing) -> torch.Tensor:
    """Slots a [M, c] -> tokens [N, c]; the backward gives fillers a zero gradient."""
    return GatherRows.apply(a, p.back, p.slots_or_zero, True)
