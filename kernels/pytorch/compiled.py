"""A function through ``torch.compile`` with the same function, eagerly, as the fallback.

The training path compiles two small pieces whose elementwise work PyTorch's eager kernels
do in several memory passes: the attention backward's block (attention_train.py) and the
residual add + layer norm (encoder_train.py). Shapes change with every batch (packed
lengths, token counts), so they are built with dynamic shapes: one build per process. A
machine that cannot compile (no C++ compiler) runs the same function eagerly after one
warning: the same values, slower.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


class CompiledOrEager:
    """Calls ``torch.compile(fn, dynamic=True)``, built on the first call; on any compiler
    error, warns once and calls ``fn`` from then on."""

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn, self.what = fn, what
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 -- any compiler failure: the same math, eagerly
                self.failed = True
                first = str(e).splitlines()[0][:160] if str(e) else ""
                warnings.warn(f"{self.what} runs eagerly (torch.compile failed: {type(e).__name__}: {first})",
                              RuntimeWarning, stacklevel=2)
        return self.fn(*args)
