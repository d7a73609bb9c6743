"""Length-group packing (kernels/pytorch/packing.py): every token in exactly one slot, each
row's tokens in order at the front of its slots, rows grouped by length, and gathers whose
backward equals PyTorch's index_select backward when fillers get no gradient."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import example, given, settings, strategies as st

from helpers import valid_pattern
from transact.kernels.pytorch.packing import GatherRows, length_groups, pack, unpack


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 11), S=st.integers(1, 50),
       kind=st.sampled_from(["random", "suffix", "mixed"]), groups=st.integers(1, 6))
@example(seed=0, B=1, S=1, kind="random", groups=4)
def test_every_token_has_one_slot_in_order(seed, B, S, kind, groups):
    valid = valid_pattern(np.random.default_rng(seed), B, S, kind)
    n = valid.sum(1)
    N = int(n.sum())
    p = length_groups(valid, groups)
    assert p.slots.numel() == sum(p.sizes) and p.back.numel() == N
    assert all(L % 16 == 0 and L > 0 for _, L in p.groups)
    if N:
        assert torch.equal(p.slots[p.back], torch.arange(N))  # the slot of token i holds token i
        assert torch.equal(p.slots_or_zero[p.back], torch.arange(N))
    fillers = torch.ones(p.slots.numel(), dtype=torch.bool)
    fillers[p.back] = False
    assert bool((p.slots_or_zero[fillers] == N).all()) and bool((p.slots[fillers] == 0).all())
    # per group: rows of nondecreasing length (a row without tokens may share a group), each
    # row's tokens consecutive from slot 0; every row with tokens in exactly one group
    offs = (torch.cumsum(n, 0) - n).tolist()
    base, prev_len, starts = 0, -1, []
    for b, L in p.groups:
        for r in range(b):
            row = p.slots_or_zero[base + r * L: base + (r + 1) * L]
            k = int((row < N).sum())
            assert bool((row[k:] == N).all()) and k >= prev_len
            if k:
                assert torch.equal(row[:k], torch.arange(row[0].item(), row[0].item() + k))
                starts.append(row[0].item())
            prev_len = k
        base += b * L
    assert sorted(starts) == sorted(o for o, c in zip(offs, n.tolist()) if c > 0)


def test_gathers_backward_equals_index_select_when_fillers_have_no_gradient():
    rng = np.random.default_rng(5)
    valid = valid_pattern(rng, 7, 30, "mixed")
    p = length_groups(valid, 3)
    N = int(valid.sum())
    for dt in (torch.float32, torch.bfloat16):
        t = torch.randn(N, 24).to(dt).requires_grad_()
        g = torch.randn(p.slots.numel(), 24).to(dt)
        g[p.slots_or_zero == N] = 0  # what the encoder's fillers get
        (pack(t, p) * g).sum().backward()
        ref = t.detach().clone().requires_grad_()
        (ref.index_select(0, p.slots) * g).sum().backward()
        assert torch.equal(t.grad, ref.grad)
        a = torch.randn(p.slots.numel(), 24).to(dt).requires_grad_()
        ga = torch.randn(N, 24).to(dt)
        (unpack(a, p) * ga).sum().backward()
        ra = a.detach().clone().requires_grad_()
        (ra.index_select(0, p.back) * ga).sum().backward()
        assert torch.equal(a.grad, ra.grad) and bool((a.grad[p.slots_or_zero == N] == 0).all())
        assert torch.equal(pack(t, p), t.index_select(0, p.slots))


def test_gather_of_rows_not_a_multiple_of_eight_bytes():
    x = torch.randn(5, 3, dtype=torch.bfloat16, requires_grad=True)  # 6-byte rows: plain index_select
    idx = torch.tensor([4, 0, 2])
    y = GatherRows.apply(x, idx, torch.tensor([1, 0, 2, 0, 0]), False)
    assert torch.equal(y, x.detach()[idx])
