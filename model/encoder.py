"""The sequence encoder (paper §3.2.2, §3.3.2).

The encoder is PyTorch's stock ``nn.TransformerEncoder`` (post-LN layers, ReLU FFN,
``batch_first=True``): 2 layers, 1 head, d_model 64, FFN 32. Using the stock module
keeps training plain PyTorch and lets the fused SKUT kernel load its weights as they
are (``kernels/``).

Its forward runs with the causal + padding mask of
:func:`transact.kernels.pytorch.encoder.attention_mask` (the mask and the PyTorch
reference forward live with the kernels); the model calls it through
:func:`transact.kernels.dispatch.encoder_forward` (training: ``encoder_tokens``), which trains
the same layers' parameters on the valid tokens only, packed, with causal attention
(:mod:`transact.kernels.pytorch.encoder_train`) -- the module stays the parameter
container, so checkpoints do not change.
"""
from __future__ import annotations

from torch import nn


def make_encoder(d_model: int = 64, n_heads: int = 1, ffn_dim: int = 32, n_layers: int = 2,
                 dropout: float = 0.0) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=d_model, nhead=n_heads, dim_feedforward=ffn_dim, dropout=dropout,
        activation="relu", batch_first=True, norm_first=False,
    )
    return nn.TransformerEncoder(layer, num_layers=n_layers, enable_nested_tensor=False)
