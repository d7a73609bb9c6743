"""Timing and memory of one callable, shared by the kernel benchmarks.

Each kernel ``bench_*`` function (:mod:`transact.bench.nn_search`, :mod:`transact.bench.skut`)
returns a result dict ``{"benchmark", "device", "gpu", "notes", "rows"}`` for
:func:`transact.bench.report.write_json`. Timings on a GPU use CUDA events after warm-up
(median of the repeats) and ``torch.cuda.max_memory_allocated`` for peak memory. Without a
GPU only the PyTorch paths run, at a small size, and the result says so (:data:`GPU_NOTE`):
CPU figures say nothing about the kernels' GPU latency.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

GPU_NOTE = ("No CUDA GPU: the Triton kernels' figures need a GPU. The rows below are CPU "
            "timings of the PyTorch paths at a small size, for a smoke test only.")


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median latency (ms) of ``fn()`` and, on CUDA, its peak memory.

    Returns ``{"latency_ms", "latency_p10_ms", "latency_p90_ms", "peak_mem_mib",
    "work_mem_mib"}``: peak is ``max_memory_allocated`` during one call (inputs and
    weights included), work is the peak minus what was allocated before the call.
    Memory is None on CPU (PyTorch does not track CPU allocations).
    """
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for _ in range(max(warmup, 0)):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        times = []
        for _ in range(max(repeats, 1)):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        peak = work = None
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            peak_b = torch.cuda.max_memory_allocated(device)
            peak, work = peak_b / 2**20, (peak_b - before) / 2**20
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"latency_ms": statistics.median(times), "latency_p10_ms": q[0], "latency_p90_ms": q[-1],
            "peak_mem_mib": peak, "work_mem_mib": work}
