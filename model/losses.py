"""Training losses: label-weighted multi-head cross-entropy and the Next Action Loss.

    L = L_CE + w_NAL * L_NAL                                             (V2 Eq. 7)

L_CE (V2 Eq. 1, V1 Eq. 1-2): for each example b and head h,

    w_bh  = sum_a M[h, a] * y_ba                                         (V1 Eq. 2)
    l_bh  = -[y_bh log f_bh + (1 - y_bh) log(1 - f_bh)]
    L_CE  = sum_h  sum_b w_bh l_bh / sum_b w_bh        ("weighted_mean", the default)
    L_CE  = sum_h  sum_b w_bh l_bh / B                  ("mean")

The default reduction divides each head by its total weight in the batch, like
PyTorch's class-weighted cross-entropy: L_CE then stays on the scale of a plain BCE
whatever the magnitude of M (Table 7 uses weights up to 100), so that w_NAL keeps a
meaningful ratio between the two losses. With "mean", L_CE is ~50x larger on typical
data and w_NAL * L_NAL is a rounding error.

M is the label-weight matrix over the actions ``label_actions`` (default: V1 Table 7,
click / repin / hide):

    head \\ action   click  repin  hide   none
    click             100      0   100      1
    repin               0    100   100      1
    hide                1      5    10      1

The "none" column is our addition. With Table 7 alone an example on which the user
took none of the actions gets w_h = 0 on every head, so the (by far most common)
negatives would never be trained. We append a pseudo-action ``none`` with
y_none = 1 iff no label among ``label_actions`` is set, and weight 1 on every head.

L_NAL (V2 Eq. 5-6), a sampled softmax over the realtime segment S_RT[:r] (slots
t = 0..r-1, oldest -> newest):

    L(u(t), p(t+1)) = -log( e^<u(t), p(t+1)> / (e^<u(t), p(t+1)> + sum_n e^<u(t), n>) )

- u(t): the encoder output at slot t of S_RT[:r] (causal, so it has seen only actions
  up to t) projected to 32-d by a linear layer (``TransActModel.nal_proj``; ``nal_projection=False``:
  its first 32 coordinates instead);
- p(t+1): the dequantised PinSage embedding of token t+1, used when token t+1 is real
  and has a positive action bit (click, repin or closeup; :data:`POSITIVE_MASK`) and
  slot t was a valid input token;
- negatives n: "impression" = the valid tokens of NN(S_imp, c) of the same row;
  "inbatch" = the valid S_RT[:r] tokens of the next row of the batch (roll by one),
  dropped when that row belongs to the same user (its tokens would include the
  positive); ``nal_negatives`` > 0 keeps only the newest that many slots of either.
L_NAL is the mean over valid (row, t) pairs (0 when a batch has none); Eq. 6 writes a
sum, the mean keeps w_NAL independent of batch size and r -- and so our w_NAL is not the
paper's: its 0.01 multiplies a sum over a row's ~30 pairs (the demo world), ours a mean, so
the paper's ratio to L_CE is w_NAL ~ 0.3 here (more if its L_CE is a batch mean and its
L_NAL a batch sum). Hence the default w_NAL = 1 (:class:`transact.model.transact.ModelConfig`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from transact.data.quantization import dequantize
from transact.data.schema import POSITIVE_MASK
from transact.features.config import SEGMENTS, FeatureConfig
from transact.features.nn_features import valid_mask
from transact.model.transact import Batch, ModelConfig, ModelOutput

NONE: str = "none"

#: V1 appendix A, Table 7: M[head][action].
TABLE7: dict[str, dict[str, float]] = {
    "click": {"click": 100.0, "repin": 0.0, "hide": 100.0},
    "repin": {"click": 0.0, "repin": 100.0, "hide": 100.0},
    "hide": {"click": 1.0, "repin": 5.0, "hide": 10.0},
}


def default_label_weights(heads: tuple[str, ...], actions: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Table 7 where it has the entry; elsewhere 1 on the head's own action, 0 otherwise;
    and ``none`` = 1 for every head."""
    out = {}
    for h in heads:
        row = {a: float(TABLE7.get(h, {}).get(a, 1.0 if a == h else 0.0)) for a in actions}
        row[NONE] = 1.0
        out[h] = row
    return out


def label_weight_matrix(cfg: ModelConfig) -> torch.Tensor:
    """M float32 [H, A + 1]: rows = cfg.heads, columns = cfg.label_actions + ("none",)."""
    weights = cfg.label_weights or default_label_weights(cfg.heads, cfg.label_actions)
    cols = cfg.label_actions + (NONE,)
    rows = []
    for h in cfg.heads:
        if h not in weights:
            raise ValueError(f"label_weights has no row for head {h!r}")
        unknown = set(weights[h]) - set(cols)
        if unknown:
            raise ValueError(f"label_weights[{h!r}] names unknown actions {sorted(unknown)}")
        rows.append([float(weights[h].get(a, 0.0)) for a in cols])
    return torch.tensor(rows, dtype=torch.float32)


def head_weights(y_actions: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """w [B, H] = [y, y_none] @ M^T  (V1 Eq. 2 plus the "none" pseudo-action).

    y_actions: float [B, A] labels of the matrix's actions; M: [H, A + 1].
    """
    y_none = (y_actions.sum(dim=1, keepdim=True) == 0).to(y_actions.dtype)  # [B, 1]
    return torch.cat([y_actions, y_none], dim=1) @ M.T.to(y_actions)  # [B, H]


def weighted_bce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                 reduction: str = "weighted_mean") -> torch.Tensor:
    """Label-weighted multi-head BCE; logits, y, w: [B, H] (see the module docstring)."""
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # [B, H]
    if reduction == "weighted_mean":
        return ((w * bce).sum(dim=0) / w.sum(dim=0).clamp(min=1e-12)).sum()
    if reduction == "mean":
        return (w * bce).sum(dim=1).mean()
    raise ValueError(f"unknown CE reduction {reduction!r}")


def ce_loss(out: ModelOutput, batch: Batch, cfg: ModelConfig, M: torch.Tensor) -> torch.Tensor:
    y_heads = torch.stack([batch.label(h) for h in cfg.heads], dim=1).float()  # [B, H]
    y_act = torch.stack([batch.label(a) for a in cfg.label_actions], dim=1).float()  # [B, A]
    return weighted_bce(out.logits, y_heads, head_weights(y_act, M), cfg.ce_reduction)


def _pair_logits(u: torch.Tensor, query_valid: torch.Tensor, pos: torch.Tensor, pos_ok: torch.Tensor,
                 neg: torch.Tensor, neg_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, r-1, 1 + M]: <u(t), p(t+1)> then <u(t), n> (-inf for invalid n); pair bool [B, r-1])."""
    q = u[:, :-1]  # [B, r-1, D] u(t)
    p = pos[:, 1:]  # [B, r-1, D] p(t+1)
    pair = query_valid[:, :-1] & pos_ok[:, 1:]  # [B, r-1]
    s_pos = (q * p).sum(-1, keepdim=True)  # [B, r-1, 1]
    s_neg = torch.einsum("btd,bmd->btm", q, neg)  # [B, r-1, M]
    s_neg = s_neg.masked_fill(~neg_ok[:, None, :], float("-inf"))  # [B, r-1, M]
    return torch.cat([s_pos, s_neg], dim=-1), pair  # [B, r-1, 1 + M], [B, r-1]


def sampled_softmax_nal(u: torch.Tensor, query_valid: torch.Tensor, pos: torch.Tensor,
                        pos_ok: torch.Tensor, neg: torch.Tensor, neg_ok: torch.Tensor) -> torch.Tensor:
    """Eq. 5-6 averaged over valid pairs.

    Args:
        u: [B, r, D] user embeddings u(t); query_valid: bool [B, r].
        pos: [B, r, D] embeddings of the r slots; pos_ok: bool [B, r], slot t+1 is a positive.
        neg: [B, M, D] negative embeddings per row; neg_ok: bool [B, M].
    Returns: scalar, mean over pairs (b, t) with query_valid[b, t] & pos_ok[b, t+1].
    """
    if u.shape[1] < 2:
        return u.sum() * 0.0
    logits, pair = _pair_logits(u, query_valid, pos, pos_ok, neg, neg_ok)  # [B, r-1, 1 + M], [B, r-1]
    loss = -torch.log_softmax(logits, dim=-1)[..., 0]  # [B, r-1]
    n = pair.sum()
    return torch.where(pair, loss, torch.zeros_like(loss)).sum() / n.clamp(min=1)


def next_action_stats(out: ModelOutput, batch: Batch, fcfg: FeatureConfig) -> dict[str, float]:
    """The NAL task scored on a batch (evaluation): {"loss": summed Eq. 5 over valid pairs,
    "top1": pairs whose positive outscores every negative, "pairs": their number, "chance":
    summed 1 / (1 + valid negatives), the top-1 rate of a model that knows nothing}.

    One yardstick for every model, whatever negatives it trained with: all of the row's
    NN(S_imp) tokens, the items the user saw and skipped. (In-batch negatives would measure
    nothing here: evaluation batches are in row order, so the neighbouring row is mostly the
    same user's and its tokens are dropped.)"""
    assert out.nal_user is not None and out.nal_query_valid is not None, \
        "the model output has no NAL head (its config has nal='none')"
    pos, pos_ok, neg, neg_ok = nal_targets(batch, fcfg, "impression")
    u = out.nal_user.float()  # [B, r, D]
    if u.shape[1] < 2:
        return {"loss": 0.0, "top1": 0.0, "pairs": 0.0, "chance": 0.0}
    logits, pair = _pair_logits(u, out.nal_query_valid, pos, pos_ok, neg, neg_ok)  # [B, r-1, 1 + M], [B, r-1]
    loss = -torch.log_softmax(logits, dim=-1)[..., 0]  # [B, r-1]
    top1 = logits[..., 0] > logits[..., 1:].amax(dim=-1) if logits.shape[-1] > 1 else torch.ones_like(pair)  # [B, r-1]
    chance = 1.0 / (1.0 + neg_ok.sum(dim=1, keepdim=True).float())  # [B, 1]
    return {"loss": float(loss[pair].sum()), "top1": float((top1 & pair).sum()), "pairs": float(pair.sum()),
            "chance": float(chance.expand_as(pair)[pair].sum())}


def nal_targets(batch: Batch, fcfg: FeatureConfig, negatives: str, max_negatives: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pos [B, r, D], pos_ok [B, r], neg [B, M, D], neg_ok [B, M]) read from the row;
    ``max_negatives`` > 0: M = the newest that many slots (segments run oldest -> newest)."""
    starts, sizes = fcfg.segment_starts, fcfg.segment_sizes
    valid = valid_mask(batch.seg_len, fcfg)  # [B, S], the logged tokens (no time window)
    i_rt = SEGMENTS.index("rt_recent")
    rt = slice(starts[i_rt], starts[i_rt] + sizes[i_rt])
    pos = dequantize(batch.emb_q[:, rt])  # [B, r, D]
    pos_ok = valid[:, rt] & ((batch.action[:, rt].long() & POSITIVE_MASK) != 0)  # [B, r]
    if negatives == "impression":
        i_imp = SEGMENTS.index("imp_nn")
        imp = slice(starts[i_imp], starts[i_imp] + sizes[i_imp])
        neg = dequantize(batch.emb_q[:, imp])  # [B, k_imp, D]
        neg_ok = valid[:, imp]  # [B, k_imp]
    elif negatives == "inbatch":
        neg = torch.roll(pos, 1, dims=0)  # [B, r, D], row b gets row b-1's S_RT[:r]
        neg_ok = torch.roll(valid[:, rt], 1, dims=0)  # [B, r]
        if batch.user_id is not None:
            other = batch.user_id != torch.roll(batch.user_id, 1, dims=0)  # [B]
            neg_ok = neg_ok & other[:, None]  # [B, r]
    else:
        raise ValueError(f"unknown NAL negatives {negatives!r}")
    if max_negatives > 0:
        neg, neg_ok = neg[:, -max_negatives:], neg_ok[:, -max_negatives:]  # [B, M', D], [B, M']
    return pos, pos_ok, neg, neg_ok


def nal_loss(out: ModelOutput, batch: Batch, cfg: ModelConfig, fcfg: FeatureConfig) -> torch.Tensor:
    assert out.nal_user is not None and out.nal_query_valid is not None, \
        "the model output has no NAL head (its config has nal='none')"
    pos, pos_ok, neg, neg_ok = nal_targets(batch, fcfg, cfg.nal, cfg.nal_negatives)
    return sampled_softmax_nal(out.nal_user, out.nal_query_valid, pos, pos_ok, neg, neg_ok)


def total_loss(out: ModelOutput, batch: Batch, cfg: ModelConfig, fcfg: FeatureConfig,
               M: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_CE + w_NAL * L_NAL; returns the loss and its detached parts (for logging)."""
    l_ce = ce_loss(out, batch, cfg, M)
    parts = {"ce": l_ce.detach()}
    if cfg.nal != "none" and out.nal_user is not None:
        l_nal = nal_loss(out, batch, cfg, fcfg)
        parts["nal"] = l_nal.detach()
        loss = l_ce + cfg.nal_weight * l_nal
    else:
        loss = l_ce
    parts["loss"] = loss.detach()
    return loss, parts
