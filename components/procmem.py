"""This process's memory, read from Linux's ``/proc`` (steps and benchmarks report it).

One reader for every caller: the Ray engine's tasks (a reused worker resets its peak per
task) and the benchmarks' peak-RSS columns.
"""
from __future__ import annotations


def rss_mib(field: str = "VmHWM") -> float:
    """``VmHWM`` (peak, resettable by :func:`reset_peak_rss`) or ``VmRSS`` (now) in MiB;
    ``ru_maxrss`` where ``/proc`` is missing (a spawned child inherits it from its parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
