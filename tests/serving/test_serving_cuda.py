"""The serving path on a CUDA GPU (docs/design.md §8, paper §3.4.2): the pinned staging arena,
CUDA-graph replay of the encoder + heads, and the whole Ranker against the CPU path.

These need compiled Triton kernels on a GPU: skipped without one, and under the Triton
interpreter (the suite's default, ``TRITON_INTERPRET=1``). ``bench/gpu-check.sh`` runs
them on a GPU machine with ``TRITON_INTERPRET=0``.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from helpers import queries_of, write_world
from transact.features.config import FeatureConfig
from transact.features.sequences import EventStore
from transact.model.transact import Batch, build_model
from transact.serving.device import ModelRunner, StagingArena
from transact.serving.ranker import Ranker, assemble

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="Triton interpreter on (run with TRITON_INTERPRET=0 on a GPU)"),
]

CFG = FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)


def random_model(seed: int = 0):
    """A v2 model with every parameter moved off its initialisation."""
    torch.manual_seed(seed)
    model = build_model("v2", CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def random_batch(B: int, g: torch.Generator, device: str) -> Batch:
    S = CFG.seq_len
    seg = torch.stack([torch.randint(0, n + 1, (B,), generator=g) for n in CFG.segment_sizes], 1)  # [B, 4]
    b = Batch(emb_q=torch.randint(-127, 128, (B, S, 32), dtype=torch.int8, generator=g),
              action=torch.randint(0, 16, (B, S), dtype=torch.uint8, generator=g),
              tok_surface=torch.randint(0, 3, (B, S), dtype=torch.int8, generator=g),
              age_s=torch.randint(0, 10_000, (B, S), dtype=torch.int32, generator=g),
              seg_len=seg.to(torch.int16),
              cand_emb_q=torch.randint(-127, 128, (B, 32), dtype=torch.int8, generator=g),
              surface=torch.randint(0, 3, (B,), generator=g))
    return b.to(device)


def test_staging_arena_pins_copies_in_one_buffer_and_reuses_it():
    g = torch.Generator().manual_seed(1)

    def payload(n: int) -> dict[str, torch.Tensor]:
        return {"emb_q": torch.randint(-127, 128, (n, 32), dtype=torch.int8, generator=g),
                "ts": torch.randint(0, 2**40, (n,), generator=g),
                "action": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g),
                "offsets": torch.tensor([0, n // 2, n])}

    arena = StagingArena("cuda", capacity=1 << 20)
    assert arena.host.is_pinned() and arena.dev.is_cuda and arena.grows == 1
    lo, hi = arena.dev.data_ptr(), arena.dev.data_ptr() + arena.capacity
    for n in (100, 3_000):  # two batches through the same buffers
        src = payload(n)
        dev = arena.stage(src)
        for name, t in src.items():
            assert dev[name].is_cuda and dev[name].dtype == t.dtype and dev[name].shape == t.shape
            assert lo <= dev[name].data_ptr() < hi  # a view into the one device buffer
            assert torch.equal(dev[name].cpu(), t), name
        assert arena.last_bytes == sum(t.numel() * t.element_size() for t in src.values())
    assert arena.grows == 1
    big = payload(40_000)  # > 1 MiB: the arena grows once and still returns the inputs
    dev = arena.stage(big)
    assert arena.grows == 2 and arena.capacity >= StagingArena.nbytes(big)
    assert all(torch.equal(dev[k].cpu(), v) for k, v in big.items())


def test_cuda_graph_replay_equals_eager_for_every_bucket_and_refills_its_inputs():
    model = random_model().cuda()
    runner = ModelRunner(model, "cuda", cuda_graphs=True)
    g = torch.Generator().manual_seed(2)
    for B in (1, 3, 8, 5, 13, 8):  # buckets 1, 4, 8, 16; 5 and 8 replay bucket 8 with new rows
        batch = random_batch(B, g, "cuda")
        got = runner(batch)
        with torch.inference_mode():
            exp = model(batch).logits
        assert got.shape == (B, len(model.cfg.heads))
        torch.testing.assert_close(got, exp, rtol=0, atol=5e-5)
    assert runner._failed == set(), "a CUDA graph capture fell back to eager (see the log)"
    assert sorted(runner._graphs) == [1, 4, 8, 16]


def test_gpu_forward_matches_the_cpu_forward():
    """SKUT (Triton) on the GPU = the CPU inference encoder, through the whole model."""
    cpu_model = random_model(3)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    g = torch.Generator().manual_seed(3)
    batch = random_batch(37, g, "cpu")
    with torch.inference_mode():
        exp = cpu_model(batch).logits
    got = ModelRunner(gpu_model, "cuda")(batch.to("cuda")).cpu()
    torch.testing.assert_close(got, exp, rtol=0, atol=5e-4)


def test_ranker_on_cuda_equals_the_cpu_ranker(tmp_path):
    """The served path on the GPU (staging arena, Triton NN search, CUDA graphs) ranks
    like the CPU path: the same S_all tokens and probabilities to float rounding."""
    items, actions, impressions, requests = write_world(tmp_path / "w")
    store = EventStore(items, actions, impressions, CFG)
    cpu_model = random_model(4)
    gpu = Ranker(copy.deepcopy(cpu_model), store, "cuda")
    cpu = Ranker(cpu_model, store, "cpu", cpu_forward="eager")
    gpu.warmup(max_batch=64)
    qs = queries_of(requests, cpu.weights)
    for chunk in (qs[:1], qs[1:7], qs[7:]):  # micro-batches of different sizes
        got, st_gpu = gpu.rank(chunk)
        exp, st_cpu = cpu.rank(chunk)
        assert st_gpu.errors == st_cpu.errors == 0
        assert st_gpu.h2d_bytes == st_cpu.h2d_bytes > 0
        for a, b in zip(got, exp):
            np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-4)
    assert gpu.runner._failed == set() and gpu.runner._graphs
    # S_all on both devices, on the whole request set at once
    users = np.array([q.user_id for q in qs])
    ts = np.array([q.ts for q in qs])
    seqs = store.sequences(users, ts)
    cand = torch.from_numpy(np.concatenate([store.item_emb_q_of(q.item_ids) for q in qs]))
    args = (*seqs, cand, torch.tensor([q.n for q in qs]), torch.from_numpy(ts), torch.zeros(len(qs), dtype=torch.int64))
    s_gpu, _, _, _ = gpu.compute(gpu.arena.stage(assemble(*args)))
    s_cpu, _, _, _ = cpu.compute(cpu.arena.stage(assemble(*args)))
    same = torch.ones(cand.shape[0], dtype=torch.bool)
    for f in ("emb_q", "action", "surface", "age_s", "seg_len"):
        a, b = getattr(s_gpu, f).cpu(), getattr(s_cpu, f)
        same &= (a == b).reshape(a.shape[0], -1).all(1)
    # identical except where two tokens score within float rounding of each other
    assert float(same.float().mean()) >= 0.95, f"{int((~same).sum())} of {same.numel()} rows differ"
