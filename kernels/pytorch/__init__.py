"""PyTorch references of the kernels (same signatures as the Triton ones) and the naive
serving baseline used by the benchmarks.

- :func:`nn_search`: reference of the fused NN search (per-user padding, no broadcast).
- :func:`encoder_reference`: reference of SKUT (the stock module with a dense mask).
- :func:`encoder_forward_cpu`: the encoder's CPU inference path (the same layers through
  the CPU flash-attention kernel, no dense mask).
- :func:`nn_search_unfused`: the broadcast-to-candidates baseline of paper §3.4.2.
"""
from transact.kernels.pytorch.encoder_cpu import encoder_forward_cpu
from transact.kernels.pytorch.unfused import nn_search_unfused
from transact.model.encoder import encoder_reference
from transact.model.nn_features import nn_search

__all__ = ["encoder_forward_cpu", "encoder_reference", "nn_search", "nn_search_unfused"]
