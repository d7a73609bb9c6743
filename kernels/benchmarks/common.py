"""Timing, memory and output helpers shared by the kernel benchmarks."""
from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Callable

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


def pct_change(new: float | None, base: float | None) -> float | None:
    """Relative change in percent (negative = decrease), as in the paper's Table 5."""
    if new is None or base is None or base == 0:
        return None
    return 100.0 * (new - base) / base


def device_slug() -> str:
    """Short file-name tag of the device: the GPU's name, or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def default_output(name: str) -> Path:
    return Path("bench/results") / f"{name}-{device_slug()}.json"


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Plain aligned text: one header line, one line per row; floats to 3 decimals."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def write_json(path: str | Path, result: dict) -> Path:
    """Writes ``result`` plus ``machine`` (:func:`transact.machine.machine_info`) as JSON."""
    from transact.machine import device_label, machine_info

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**result, "device": result.get("device") or device_label(), "machine": machine_info()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path
