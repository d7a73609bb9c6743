"""NN search benchmark: the fused Triton kernel vs the unfused broadcast PyTorch path.

Layout: one row per (L_LL, implementation) at N candidates and top-K (paper §3.4.2:
N = 256 candidates of one request, K = 96, L_LL from 1k to 16k). Implementations:

- ``fused_triton``: :func:`transact.kernels.triton.nn_search.nn_search_triton` on the
  de-duplicated inputs (GPU only); ``fused_triton_no_split`` is the same with one
  program per candidate block (``n_split=1``), to show what the sequence split buys;
- ``reference_padded``: :func:`transact.kernels.pytorch.nn_search.nn_search`, the PyTorch
  reference (users in chunks of similar lengths, padded; no broadcast to candidates);
- ``unfused_broadcast``: :func:`transact.kernels.pytorch.unfused.nn_search_unfused`,
  the serving path before the paper's optimisations (broadcast to [N, L, D]).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from transact.bench.report import pct_change
from transact.bench.timing import GPU_NOTE, time_fn

GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384)
CPU_LENGTHS = (256, 1024)
EMB_DIM = 32


def make_inputs(length: int, n_cand: int, n_requests: int, device, dtype, seed: int = 0):
    """``n_requests`` users with ``length`` tokens each and ``n_cand`` candidates in all."""
    from transact.data.quantization import quantize

    g = torch.Generator().manual_seed(seed)
    T = length * n_requests
    seq_q = quantize(torch.randn(T, EMB_DIM, generator=g) * 0.15).to(device)  # [T, D] int8
    seq_off = torch.arange(n_requests + 1, dtype=torch.int64) * length  # [U + 1]
    per = [n_cand // n_requests + (1 if u < n_cand % n_requests else 0) for u in range(n_requests)]
    cand_off = torch.tensor([0] + per, dtype=torch.int64).cumsum(0)  # [U + 1]
    cand = (torch.randn(n_cand, EMB_DIM, generator=g) * 0.15).to(device=device, dtype=dtype)  # [N, D]
    return seq_q, seq_off.to(device), cand, cand_off.to(device)


def bench_nn_search(lengths: Sequence[int] | None = None, n_cand: int | None = None, k: int = 96,
                    n_requests: int = 1, repeats: int | None = None, warmup: int | None = None,
                    device: str | torch.device | None = None, seed: int = 0) -> dict:
    """Times the NN-search implementations; see the module doc for the layout.

    Sizes left as None take GPU defaults on CUDA (lengths 1k..16k, N = 256, 50 repeats)
    and small CPU defaults otherwise (lengths 256 and 1024, N = 64, 5 repeats).
    """
    from transact.bench.machine import device_label
    from transact.kernels.pytorch.nn_search import nn_search as reference
    from transact.kernels.pytorch.unfused import nn_search_unfused

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    lengths = tuple(lengths or (GPU_LENGTHS if gpu else CPU_LENGTHS))
    n_cand = n_cand or (256 if gpu else 64)
    repeats = repeats or (50 if gpu else 5)
    warmup = warmup if warmup is not None else (10 if gpu else 1)
    impls: dict[str, Callable[..., Any]] = {"reference_padded": reference, "unfused_broadcast": nn_search_unfused}
    if gpu:
        from transact.kernels.triton.nn_search import nn_search_triton

        impls = {"fused_triton": nn_search_triton,
                 "fused_triton_no_split": lambda *a: nn_search_triton(*a, n_split=1), **impls}
    notes = [] if gpu else [GPU_NOTE]
    rows = []
    for length in lengths:
        # fp16 candidates on the GPU (the serving dtype), fp32 on CPU.
        inputs = make_inputs(length, n_cand, n_requests, device, torch.float16 if gpu else torch.float32, seed)
        base = None
        for name, fn in impls.items():
            t = time_fn(lambda: fn(*inputs, k), device, warmup, repeats)
            row = {"L_LL": length, "N": n_cand, "K": k, "requests": n_requests, "impl": name,
                   "device_kind": "gpu" if gpu else "cpu", **t}
            rows.append(row)
            if name == "unfused_broadcast":
                base = row
        assert base is not None  # unfused_broadcast runs on every device
        for row in rows[-len(impls):]:
            row["latency_vs_unfused_pct"] = pct_change(row["latency_ms"], base["latency_ms"])
            row["memory_vs_unfused_pct"] = pct_change(row["peak_mem_mib"], base["peak_mem_mib"])
    return {"benchmark": "nn-search", "device": device_label() if gpu else f"{device_label()} (CPU timings)",
            "gpu": gpu, "notes": notes,
            "params": {"lengths": list(lengths), "n_cand": n_cand, "k": k, "n_requests": n_requests,
                       "repeats": repeats, "warmup": warmup, "emb_dim": EMB_DIM},
            "rows": rows}


TABLE_COLUMNS = ["L_LL", "N", "K", "impl", "latency_ms", "peak_mem_mib", "latency_vs_unfused_pct",
                 "memory_vs_unfused_pct"]
