"""The naive serving path of the NN search: broadcast, then unfused PyTorch ops.

Before request-level de-duplication (paper §3.4.2), each user's sequence is copied to
each of its candidates, and the NN search is a chain of separate kernels over the
broadcast [N, L, D] tensor:

    E      = gather(seq, user(n))            [N, L, D] int8, padded to L = max length
    E      = E * 0.65 / 127                  dequantise  (fp32)
    E      = E / max(|E|, 1e-12)             L2-normalise (square, sum, clamp, divide)
    s      = bmm(E, c_n / |c_n|)             [N, L]
    top-K  = topk(s masked to -inf beyond the user's length)

It is the benchmark baseline against the fused kernel, not a reference: ``torch.topk``
does not promise the lower index first on equal scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from transact.data.quantization import dequantize


def nn_search_unfused(seq_emb_q: torch.Tensor, seq_offsets: torch.Tensor, cand_emb: torch.Tensor,
                      cand_offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`transact.kernels.pytorch.nn_search.nn_search` (ties unordered)."""
    device = seq_emb_q.device
    N, D = cand_emb.shape
    U = seq_offsets.numel() - 1
    seq_len = seq_offsets[1:] - seq_offsets[:-1]  # [U]
    L = int(seq_len.max()) if U else 0
    if N == 0 or k == 0 or L == 0:
        return (torch.full((N, k), -1, dtype=torch.int64, device=device),
                torch.full((N, k), float("-inf"), dtype=torch.float32, device=device))
    c_user = torch.repeat_interleave(torch.arange(U, device=device),
                                     cand_offsets[1:] - cand_offsets[:-1], output_size=N)  # [N]
    # Broadcast: every candidate gets its own padded copy of its user's sequence.
    pos = torch.arange(L, device=device)  # [L]
    in_seq = pos[None, :] < seq_len[c_user][:, None]  # [N, L]
    rows = (seq_offsets[c_user][:, None] + pos[None, :]).clamp(max=max(seq_emb_q.shape[0] - 1, 0))  # [N, L]
    e_q = seq_emb_q[rows]  # [N, L, D] int8
    e_q = e_q.masked_fill(~in_seq[..., None], 0)  # [N, L, D]
    e = F.normalize(dequantize(e_q), dim=-1)  # [N, L, D] fp32
    c = F.normalize(cand_emb.float(), dim=-1)  # [N, D]
    scores = torch.bmm(e, c[:, :, None])[..., 0]  # [N, L]
    scores = scores.masked_fill(~in_seq, float("-inf"))  # [N, L]
    kk = min(k, L)
    score, idx = torch.topk(scores, kk, dim=1)  # [N, kk] each, best first
    idx = idx.masked_fill(torch.isinf(score), -1)
    if kk < k:
        idx = torch.cat([idx, idx.new_full((N, k - kk), -1)], dim=1)  # [N, k]
        score = torch.cat([score, score.new_full((N, k - kk), float("-inf"))], dim=1)  # [N, k]
    return idx, score
