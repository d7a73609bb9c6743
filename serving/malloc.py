"""The serving process's heap settings: keep the forward's buffers in the heap.

A CPU forward over N x |S_all| tokens allocates and frees the same few-MB activations
on every batch (256 x 192 x 64 fp32 = 12 MiB per layer output; a row chunk's ~2 MiB).
glibc's defaults serve blocks above its mmap threshold with a fresh ``mmap`` and give
them back with ``munmap`` -- on the next batch every page faults in again, zero-filled --
and return freed heap tops to the kernel once they pass the trim threshold. The dynamic
threshold only learns block sizes on the main thread's heap; the model runs on its own
thread (:mod:`transact.serving.batching`), whose arena keeps shrinking and regrowing.
Measured on the 2-core bench machine, whole forward on a non-main thread, N=256,
L_LL=16,384: NN search + forward ~27 + ~100 ms with the defaults, ~21 + ~71 ms with
these settings (``transact bench serving`` times both paths with them).

:func:`tune_malloc` sets, once per process, through ``mallopt`` (glibc only; elsewhere
it does nothing and says so):

- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum): blocks up to 32 MiB come from the
  heap and are reused; bigger ones (the naive path's broadcast copies) are still mapped;
- ``M_TRIM_THRESHOLD`` = 1 GiB: freed memory stays with the process for the next batch.
  The cost is resident memory at the peak of a batch, which a serving process has
  anyway at its next batch.

Users who set ``GLIBC_TUNABLES`` malloc values themselves keep theirs: the call is skipped.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("transact.serving")

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Applies the heap settings to this process (idempotent); True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        log.info("malloc: GLIBC_TUNABLES sets malloc values; leaving them as they are")
        _applied = False
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("malloc: not glibc (%s); heap settings unchanged", platform.libc_ver()[0] or platform.system())
        _applied = False
        return _applied
    libc = ctypes.CDLL("libc.so.6")
    ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1 and ok
    if not ok:
        log.warning("malloc: mallopt refused the heap settings; glibc defaults stay")
    _applied = ok
    return _applied
