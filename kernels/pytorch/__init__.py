"""PyTorch references of the kernels (same signatures as the Triton ones) and the naive
serving baseline used by the benchmarks.

- :mod:`transact.kernels.pytorch.nn_search`: ``nn_search``, the reference of the fused NN
  search (users in chunks of similar lengths, padded; no broadcast), with its exact top-k
  helpers. Import it from
  the module: the package attribute ``nn_search`` is that module, not the function (a
  re-exported function of the same name would hide the module from ``import ... as`` and
  from monkeypatch / ``mock.patch`` paths).
- :func:`encoder_reference`: reference of SKUT (the stock module with a dense mask),
  with :func:`attention_mask` (:mod:`transact.kernels.pytorch.encoder`).
- :func:`encoder_forward_cpu`: the encoder's CPU inference path (the same layers through
  the CPU flash-attention kernel, no dense mask).
- :func:`encoder_forward_train` / ``encoder_tokens_train``: the encoder's training path (the
  same layers on the valid tokens only, packed in length groups -- :mod:`.packing` -- with
  causal attention, :mod:`.attention_train`; autograd, dropout), any device.
- :func:`nn_search_unfused`: the broadcast-to-candidates baseline of paper §3.4.2.
"""
from transact.kernels.pytorch.encoder import attention_mask, encoder_reference
from transact.kernels.pytorch.encoder_cpu import encoder_forward_cpu
from transact.kernels.pytorch.encoder_train import encoder_forward_train
from transact.kernels.pytorch.unfused import nn_search_unfused

__all__ = ["attention_mask", "encoder_forward_cpu", "encoder_forward_train", "encoder_reference", "nn_search_unfused"]
