"""Monitoring features: NN-feature rows (training rows or served logs) -> a flat frame.

Evidently compares flat columns and silently ignores array cells, so everything the
monitor looks at is expanded here, one row per (request, candidate):

scalar features (:data:`SCALAR_COLUMNS`)
    ``len_<segment>``  valid tokens in each S_all segment (ll_nn, rt_nn, rt_recent, imp_nn);
    ``act_<action>``   share of the explicit-action tokens (ll_nn, rt_nn, rt_recent) that
                       carry the action bit (click, repin, hide, closeup): the action-type mix;
    ``tok_<surface>``  share of all valid tokens from each surface;
    ``age_newest``     log10(1 + age in seconds) of the newest token (recency);
    ``age_rt``         log10(1 + median age in seconds) of the realtime tokens;
    ``age_ll``         log10(1 + median age in seconds) of the lifelong tokens;
    ``sim_<segment>``  mean cosine between the candidate and the segment's tokens, and
    ``sim_max``        the best one over all tokens: how well the candidate matches the
                       user's history (an interest shift or new items lower it);
    ``surface``        the request's surface (categorical).
    A share or age with no token to average over is NaN (Evidently drops missing values).
embeddings (:data:`EMBEDDINGS`)
    ``cand_0..31``  the candidate's dequantised embedding;
    ``seq_0..31``   the mean dequantised embedding of the row's valid S_all tokens (zeros when
                    the row has none). Declared to Evidently as embeddings ``cand`` and ``seq``.
predictions
    ``pred_<head>`` (served logs, or computed with a model for the reference) and ``score``.
meta
    ``ts`` (ms), ``request_id``, ``user_id``, ``model_version`` (when present).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from transact.data.quantization import STEP, dequantize
from transact.data.schema import ACTION_BIT, EMB_DIM, EXPLICIT_ACTIONS, SURFACES
from transact.features.config import SEGMENTS, FeatureConfig

SEGMENT_COLUMNS: tuple[str, ...] = tuple(f"len_{s}" for s in SEGMENTS)
ACTION_COLUMNS: tuple[str, ...] = tuple(f"act_{a}" for a in EXPLICIT_ACTIONS)
TOKEN_SURFACE_COLUMNS: tuple[str, ...] = tuple(f"tok_{s}" for s in SURFACES)
AGE_COLUMNS: tuple[str, ...] = ("age_newest", "age_rt", "age_ll")
SIM_COLUMNS: tuple[str, ...] = tuple(f"sim_{s}" for s in SEGMENTS) + ("sim_max",)
#: Numerical scalar features, in frame order.
NUMERICAL_COLUMNS: tuple[str, ...] = (SEGMENT_COLUMNS + ACTION_COLUMNS + TOKEN_SURFACE_COLUMNS + AGE_COLUMNS
                                      + SIM_COLUMNS)
CATEGORICAL_COLUMNS: tuple[str, ...] = ("surface",)
SCALAR_COLUMNS: tuple[str, ...] = NUMERICAL_COLUMNS + CATEGORICAL_COLUMNS
#: Embedding name -> its expanded columns.
EMBEDDINGS: dict[str, list[str]] = {
    "cand": [f"cand_{i}" for i in range(EMB_DIM)],
    "seq": [f"seq_{i}" for i in range(EMB_DIM)],
}
META_COLUMNS: tuple[str, ...] = ("ts", "request_id", "user_id")


def pred_columns(heads) -> list[str]:
    return [f"pred_{h}" for h in heads]


def feature_config_of(table: pa.Table) -> FeatureConfig:
    """The feature contract stored in a rows/served-log table's schema metadata."""
    meta = (table.schema.metadata or {}).get(b"feature_config")
    return FeatureConfig.from_dict(json.loads(meta)) if meta else FeatureConfig()


def heads_of(table: pa.Table) -> list[str]:
    """Model heads whose predictions the table holds (``pred_<head>`` columns)."""
    return [c[len("pred_"):] for c in table.column_names if c.startswith("pred_")]


def _log_age(age_s: np.ndarray) -> np.ndarray:
    return np.log10(1.0 + np.maximum(age_s, 0.0))


def _masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median over ``mask`` along axis 1; NaN where a row has no valid value."""
    v = np.where(mask, values.astype(np.float64), np.nan)
    out = np.full(len(v), np.nan)
    ok = mask.any(1)
    if ok.any():
        out[ok] = np.nanmedian(v[ok], axis=1)
    return out


def _share(hit: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = mask.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (hit & mask).sum(1) / np.maximum(n, 1), np.nan)


def features_frame(table: pa.Table, cfg: FeatureConfig | None = None, chunk_rows: int = 8192) -> pd.DataFrame:
    """NN-feature rows (:func:`~transact.features.nn_features.nn_rows_schema`) or served-log rows
    -> the monitoring frame described in the module docstring (one row per input row)."""
    cfg = cfg or feature_config_of(table)
    parts = [_features(table.slice(lo, chunk_rows), cfg) for lo in range(0, table.num_rows, chunk_rows)]
    if not parts:
        parts = [_features(table.slice(0, 0), cfg)]
    return pd.concat(parts, ignore_index=True)


def _features(table: pa.Table, cfg: FeatureConfig) -> pd.DataFrame:
    from transact.features.nn_features import arrow_to_s_all, valid_mask

    s_all, cand_q = arrow_to_s_all(table, cfg)
    valid = valid_mask(s_all.seg_len, cfg).numpy()  # [N, S]
    seg_len = s_all.seg_len.numpy().astype(np.float64)  # [N, 4]
    action = s_all.action.numpy()  # [N, S] uint8
    surface = s_all.surface.numpy()  # [N, S] int8
    age = s_all.age_s.numpy()  # [N, S] int32
    N, S = action.shape
    seg_of_slot = np.repeat(np.arange(len(SEGMENTS)), cfg.segment_sizes)  # [S]
    explicit = valid & (seg_of_slot[None, :] < SEGMENTS.index("imp_nn"))  # action tokens

    cols: dict[str, np.ndarray] = {}
    for c in META_COLUMNS:
        cols[c] = table.column(c).to_numpy()
    for j, name in enumerate(SEGMENT_COLUMNS):
        cols[name] = seg_len[:, j]
    for a, name in zip(EXPLICIT_ACTIONS, ACTION_COLUMNS):
        cols[name] = _share((action & ACTION_BIT[a]) != 0, explicit)
    for k, name in enumerate(TOKEN_SURFACE_COLUMNS):
        cols[name] = _share(surface == k, valid)
    age_f = age.astype(np.float64)
    newest = np.where(valid, age_f, np.inf).min(1) if S else np.full(N, np.inf)
    cols["age_newest"] = np.where(np.isfinite(newest), _log_age(newest), np.nan)
    rt = valid & ((seg_of_slot == SEGMENTS.index("rt_recent")) | (seg_of_slot == SEGMENTS.index("rt_nn")))[None, :]
    cols["age_rt"] = _log_age(_masked_median(age_f, rt))
    ll = valid & (seg_of_slot == SEGMENTS.index("ll_nn"))[None, :]
    cols["age_ll"] = _log_age(_masked_median(age_f, ll))
    cols["surface"] = np.array(SURFACES, dtype=object)[table.column("surface").to_numpy().astype(np.int64)]

    cand = dequantize(cand_q).numpy()
    for i in range(EMB_DIM):
        cols[f"cand_{i}"] = cand[:, i].astype(np.float64)
    emb = s_all.emb_q.numpy().astype(np.float32)  # [N, S, D] int8 codes
    n_valid = valid.sum(1, keepdims=True)  # [N, 1]
    seq_sum = np.einsum("nsd,ns->nd", emb, valid.astype(np.float32))  # [N, D]
    seq_mean = seq_sum / np.maximum(n_valid, 1) * STEP
    for i in range(EMB_DIM):
        cols[f"seq_{i}"] = seq_mean[:, i].astype(np.float64)
    # cosine of every token with the candidate (the dequantisation scale cancels)
    cq = cand_q.numpy().astype(np.float32)  # [N, D]
    dots = np.einsum("nsd,nd->ns", emb, cq)  # [N, S]
    norms = np.sqrt(np.einsum("nsd,nsd->ns", emb, emb)) * np.sqrt((cq * cq).sum(1))[:, None]
    cos = np.where(norms > 0, dots / np.maximum(norms, 1e-12), 0.0).astype(np.float64)  # [N, S]
    for j, seg in enumerate(SEGMENTS):
        m = valid & (seg_of_slot == j)[None, :]
        n = m.sum(1)
        cols[f"sim_{seg}"] = np.where(n > 0, np.where(m, cos, 0.0).sum(1) / np.maximum(n, 1), np.nan)
    best = np.where(valid, cos, -np.inf).max(1) if S else np.full(N, -np.inf)
    cols["sim_max"] = np.where(np.isfinite(best), best, np.nan)

    for c in table.column_names:
        if c.startswith("pred_") or c == "score":
            cols[c] = table.column(c).to_numpy().astype(np.float64)
    if "model_version" in table.column_names:
        cols["model_version"] = np.asarray(table.column("model_version").to_pylist(), dtype=object)
    return pd.DataFrame(cols)


def add_predictions(frame: pd.DataFrame, table: pa.Table, model_dir: str | Path,
                    batch_rows: int = 2048) -> pd.DataFrame:
    """Adds ``pred_<head>`` columns computed by the model in ``model_dir`` (e.g. for the
    training reference, which has no logged predictions)."""
    import torch

    from transact.features.nn_features import arrow_to_s_all
    from transact.model.checkpoint import load_model
    from transact.model.metrics import DEFAULT_SCORE_WEIGHTS, ranking_score
    from transact.model.transact import Batch

    model = load_model(model_dir, "cpu")
    heads = tuple(model.cfg.heads)
    probs = []
    with torch.inference_mode():
        for lo in range(0, table.num_rows, batch_rows):
            t = table.slice(lo, batch_rows)
            s_all, cand = arrow_to_s_all(t, model.fcfg)
            surface = torch.from_numpy(t.column("surface").to_numpy().astype(np.int64))
            probs.append(model.predict_proba(Batch.from_s_all(s_all, cand, surface)).float().numpy())
    p = np.concatenate(probs, 0) if probs else np.zeros((0, len(heads)), np.float32)
    out = frame.copy()
    for j, h in enumerate(heads):
        out[f"pred_{h}"] = p[:, j].astype(np.float64)
    weights = {h: w for h, w in DEFAULT_SCORE_WEIGHTS.items() if h in heads}
    out["score"] = ranking_score(p, heads, weights)
    return out
