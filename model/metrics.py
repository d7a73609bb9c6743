"""Offline metrics: HIT@3 (V1 §4.2.1, V2 §4.2.1), AUC, log-loss, user bootstrap.

HIT@K. Predictions are grouped by (user, chunk), a chunk being one ranking request
(``request_id``). Within a chunk, items are ranked by the final score

    S = sum_h w_h f(x)_h                       (default weights: click 1, repin 1, hide -1)

and gamma_{c,h} counts the top-K items whose label for h is 1. Then

    HIT@K/h = sum_{u in U} sum_{c in C_u} gamma_{c,h} / |U|

Ties in S are broken by input row order (a stable sort: of two items with the same
score, the one on the earlier row ranks higher), so the metric is deterministic.
Higher is better for click/repin, lower for hide.

Confidence intervals: HIT@K/h is a mean over users of the per-user total
t_u = sum_c gamma_{c,h}, so a user bootstrap resamples users with replacement and
recomputes the mean; the 95% interval is the 2.5 / 97.5 percentiles. Relative
changes between two models on the same rows use *paired* resamples (the same user
draw for both), ``ratio = sum_u n_u t^A_u / sum_u n_u t^B_u - 1``.
"""
from __future__ import annotations

import numpy as np

#: Default head weights of the ranking score S.
DEFAULT_SCORE_WEIGHTS: dict[str, float] = {"click": 1.0, "repin": 1.0, "hide": -1.0}


def ranking_score(probs: np.ndarray, heads: tuple[str, ...] | list[str],
                  weights: dict[str, float] | None = None) -> np.ndarray:
    """S [N] = sum_h w_h * probs[:, h]; heads missing from ``weights`` get weight 0."""
    weights = DEFAULT_SCORE_WEIGHTS if weights is None else weights
    unknown = set(weights) - set(heads)
    if unknown:
        raise ValueError(f"score weights name heads the model lacks: {sorted(unknown)}")
    w = np.array([float(weights.get(h, 0.0)) for h in heads], dtype=np.float64)  # [H]
    return np.asarray(probs, dtype=np.float64) @ w  # [N]


def parse_score_weights(spec: str | None) -> dict[str, float] | None:
    """"click=1,repin=1,hide=-1" -> dict (None/"" -> None, i.e. the default)."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, _, val = part.partition("=")
        if not _:
            raise ValueError(f"score weight {part!r} is not name=value")
        out[name.strip()] = float(val)
    return out


def topk_mask(user_id: np.ndarray, request_id: np.ndarray, score: np.ndarray, k: int = 3) -> np.ndarray:
    """bool [N]: row is among the top-k of its (user, request) chunk by score.

    Ties keep input row order (earlier row ranks higher).
    """
    n = len(score)
    if n == 0:
        return np.zeros(0, dtype=bool)
    row = np.arange(n)
    order = np.lexsort((row, -np.asarray(score, dtype=np.float64), request_id, user_id))  # [N]
    u, r = np.asarray(user_id)[order], np.asarray(request_id)[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | (r[1:] != r[:-1])
    start = np.maximum.accumulate(np.where(new, np.arange(n), 0))  # [N] group start (sorted)
    rank = np.arange(n) - start  # [N]
    top = np.zeros(n, dtype=bool)
    top[order] = rank < k
    return top


def hits_per_user(user_id: np.ndarray, request_id: np.ndarray, score: np.ndarray,
                  labels: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-user totals t_u = sum_c gamma_{c,h}.

    labels: 0/1 [N, H]. Returns (users [U] sorted, totals float64 [U, H]).
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    top = topk_mask(user_id, request_id, score, k)  # [N]
    users, uidx = np.unique(np.asarray(user_id), return_inverse=True)  # [U], [N]
    hit = labels * top[:, None]  # [N, H]
    totals = np.stack([np.bincount(uidx, weights=hit[:, h], minlength=len(users))
                       for h in range(hit.shape[1])], axis=1) if len(users) else np.zeros((0, hit.shape[1]))
    return users, totals


def hit_at_k(user_id, request_id, score, labels, k: int = 3) -> np.ndarray:
    """HIT@k per label column [H] = sum of gamma over users and chunks / |U|."""
    _, totals = hits_per_user(user_id, request_id, score, labels, k)
    return totals.mean(axis=0) if len(totals) else np.full(totals.shape[1], np.nan)


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC = P(s_pos > s_neg) + 0.5 P(s_pos = s_neg) (Mann-Whitney, average ranks).

    NaN when y holds a single class.
    """
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank (1-based) over runs of equal scores
    new = np.ones(len(s), dtype=bool)
    new[1:] = s_sorted[1:] != s_sorted[:-1]
    grp = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(s)) - 1
    ranks[order] = ((first + last) / 2.0 + 1.0)[grp]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities p (clipped to [eps, 1 - eps])."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def diversity_per_user(user_id: np.ndarray, request_id: np.ndarray, score: np.ndarray, emb: np.ndarray,
                       k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-user impression diversity of the top-k of every request, aggregated as HIT@k is.

    The paper's Impression Diversity sums, per user, the distinct top-level interests viewed
    (V1 §4.4.4); offline, with content embeddings and no taxonomy, a chunk's diversity is the
    intra-list distance of its top-k (ranked by S, ties as :func:`topk_mask`)::

        ILD_c = mean_{i < j in top-k(c)} (1 - cos(e_i, e_j))      (0 for fewer than 2 items)
        t_u   = sum_{c in C_u} ILD_c

    emb: [N, D] (int8 codes or floats: the cosine is scale-free). Returns (users [U] sorted,
    totals float64 [U]) over every user of ``user_id``, in :func:`hits_per_user`'s order."""
    users, uidx = np.unique(np.asarray(user_id), return_inverse=True)  # [U], [N]
    n = len(score)
    if n == 0:
        return users, np.zeros(len(users))
    top = np.nonzero(topk_mask(user_id, request_id, score, k))[0]  # [T] rows in some top-k
    u, r = np.asarray(user_id)[top], np.asarray(request_id)[top]
    order = np.lexsort((top, -np.asarray(score, dtype=np.float64)[top], r, u))  # by chunk, best first
    top, u, r = top[order], u[order], r[order]
    new = np.ones(len(top), dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | (r[1:] != r[:-1])
    chunk = np.cumsum(new) - 1  # [T] chunk index
    start = np.maximum.accumulate(np.where(new, np.arange(len(top)), 0))
    rank = np.arange(len(top)) - start  # [T] < k
    e = np.asarray(emb, dtype=np.float64)[top]  # [T, D]
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # [T, D] unit (0 stays 0)
    C = int(chunk[-1]) + 1 if len(top) else 0
    padded = np.zeros((C, k, e.shape[1]))  # [C, k, D]
    valid = np.zeros((C, k), dtype=bool)  # [C, k]
    padded[chunk, rank], valid[chunk, rank] = e, True
    cos = np.einsum("ckd,cjd->ckj", padded, padded)  # [C, k, k]
    pairs = valid[:, :, None] & valid[:, None, :] & np.triu(np.ones((k, k), dtype=bool), 1)  # [C, k, k]
    n_pairs = pairs.sum((1, 2))  # [C]
    ild = np.where(n_pairs > 0, ((1.0 - cos) * pairs).sum((1, 2)) / np.maximum(n_pairs, 1), 0.0)  # [C]
    chunk_user = uidx[top[new]]  # [C]
    return users, np.bincount(chunk_user, weights=ild, minlength=len(users))


def bootstrap_counts(n_users: int, n_boot: int, seed: int, chunk: int = 64):
    """Yields int [c, U] resample counts (users drawn with replacement), n_boot rows in all."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        c = min(chunk, n_boot - done)
        yield np.stack([np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)
                        for _ in range(c)])
        done += c


def bootstrap_mean_ci(totals: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """User-bootstrap (1 - alpha) interval of mean_u totals[u, h]; returns (lo [H], hi [H])."""
    U = totals.shape[0]
    if U == 0 or n_boot <= 0:
        nan = np.full(totals.shape[1], np.nan)
        return nan, nan
    samples = np.concatenate([c @ totals / U for c in bootstrap_counts(U, n_boot, seed)])  # [n_boot, H]
    return np.quantile(samples, alpha / 2, axis=0), np.quantile(samples, 1 - alpha / 2, axis=0)


def paired_relative_change(totals_a: np.ndarray, totals_b: np.ndarray, n_boot: int = 1000,
                           seed: int = 0, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Relative change of HIT (model A vs baseline B) with a paired user bootstrap.

    totals_a, totals_b: [U, H] per-user totals on the same users (same order).
    Returns {"rel": [H], "lo": [H], "hi": [H]} as fractions (0.05 = +5%), and
    "undefined_frac" [H]: the share of resamples in which the baseline has no hit at
    all (the ratio is undefined there; those resamples are left out of the interval).
    """
    if totals_a.shape != totals_b.shape:
        raise ValueError("paired bootstrap needs per-user totals on the same users")
    U = totals_a.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = totals_a.sum(0) / totals_b.sum(0) - 1.0
        samples = []
        for c in bootstrap_counts(U, n_boot, seed):
            samples.append((c @ totals_a) / (c @ totals_b) - 1.0)  # [c, H]
    if not samples:
        nan = np.full(totals_a.shape[1], np.nan)
        return {"rel": rel, "lo": nan, "hi": nan}
    s = np.concatenate(samples)  # [n_boot, H]
    s[~np.isfinite(s)] = np.nan  # resamples where the baseline has no hit: undefined, dropped
    lo, hi = np.full(s.shape[1], np.nan), np.full(s.shape[1], np.nan)
    ok = ~np.isnan(s).all(axis=0)
    if ok.any():
        lo[ok] = np.nanquantile(s[:, ok], alpha / 2, axis=0)
        hi[ok] = np.nanquantile(s[:, ok], 1 - alpha / 2, axis=0)
    return {"rel": rel, "lo": lo, "hi": hi, "undefined_frac": np.isnan(s).mean(axis=0)}


def json_safe(obj):
    """A copy of ``obj`` with NaN / infinite floats replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
