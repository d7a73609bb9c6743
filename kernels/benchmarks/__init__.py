"""Kernel benchmarks in the paper's layouts (§4.4.3, Table 5, appendix B Table 8).

Each ``bench_*`` function returns a result dict ``{"benchmark", "device", "gpu",
"notes", "rows"}``; :func:`write_json` adds :func:`transact.machine.machine_info` and
writes it. Timings on a GPU use CUDA events after warm-up (median of the repeats) and
``torch.cuda.max_memory_allocated`` for peak memory. Without a GPU only the PyTorch
paths run, at a small size, and the result says so: CPU figures say nothing about the
kernels' GPU latency.
"""
from transact.kernels.benchmarks.common import format_table, default_output, write_json
from transact.kernels.benchmarks.nn_search import bench_nn_search
from transact.kernels.benchmarks.skut import bench_skut

__all__ = ["bench_nn_search", "bench_skut", "default_output", "format_table", "write_json"]
