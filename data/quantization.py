"""Affine int8 quantisation of content embeddings (paper §3.2.1).

    q = clamp(round(e / 0.65 * 127), -127, 127)  as int8
    e ~ q * 0.65 / 127

For |e| <= 0.65 the round-trip error is at most half a step, 0.65 / 254;
values beyond ±0.65 saturate at ±127.
"""
from __future__ import annotations

from typing import overload

import numpy as np
import torch

SCALE: float = 0.65
QMAX: int = 127
STEP: float = SCALE / QMAX  # one quantisation step
MAX_ERROR: float = STEP / 2  # round-trip bound for |e| <= SCALE


# The overloads say what the isinstance dispatch does: a tensor in gives a tensor out, an array an array.
@overload
def quantize(e: torch.Tensor) -> torch.Tensor: ...
@overload
def quantize(e: np.ndarray) -> np.ndarray: ...
def quantize(e: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """fp embedding [..., D] -> int8 [..., D]."""
    if isinstance(e, torch.Tensor):
        q = torch.round(e.float() / SCALE * QMAX)  # [..., D] fp32
        return q.clamp_(-QMAX, QMAX).to(torch.int8)
    q = np.rint(np.asarray(e, dtype=np.float32) / SCALE * QMAX)  # [..., D] fp32
    return np.clip(q, -QMAX, QMAX).astype(np.int8)


@overload
def dequantize(q: torch.Tensor, dtype=None) -> torch.Tensor: ...
@overload
def dequantize(q: np.ndarray, dtype=None) -> np.ndarray: ...
def dequantize(q: np.ndarray | torch.Tensor, dtype=None) -> np.ndarray | torch.Tensor:
    """int8 [..., D] -> fp [..., D] (fp32 unless ``dtype`` is given)."""
    if isinstance(q, torch.Tensor):
        return q.to(dtype or torch.float32) * STEP
    return np.asarray(q).astype(dtype or np.float32) * np.float32(STEP)
