"""What machine a benchmark ran on, written into every benchmark JSON."""
from __future__ import annotations

import os
import platform
import socket


def machine_info() -> dict:
    import torch

    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def device_label() -> str:
    """Short name of the device timings come from: the GPU's name or the CPU model."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {_cpu_model()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (:func:`transact.components.procmem.rss_mib`)."""
    from transact.components.procmem import rss_mib

    return rss_mib("VmHWM")
