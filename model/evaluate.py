"""Offline evaluation on the rows the model never trained on: HIT@3 per action, AUC, log-loss.

    transact evaluate --model-dir runs/model --rows runs/world/nn_rows.parquet [--split user]

The evaluation rows are those of the split the model was trained with (config.json's
"training" section; the time split for models made before it was recorded), unless one is
given: under the time split the rows with ``ts >= train_end_ts``, under the per-user split
each user's last requests (:class:`transact.model.dataset.Split`). They are scored; HIT@3 is
computed for every label column (click, repin, hide, closeup) from the ranking score ``S =
sum_h w_h f_h`` (default w: click 1, repin 1, hide -1, see :mod:`transact.model.metrics`),
with a 95% user-bootstrap interval; AUC and log-loss are computed for each model head, with
the calibration error (ECE, equal-mass bins) of the calibrated probabilities and of the raw
heads (:mod:`transact.model.calibration`); for a model with a Next Action Loss head, the NAL task
itself (``next_action``: loss, and how often the next positive outscores the row's skipped
impressions, against chance).
Writes ``metrics.json``, ``reliability.png`` (the reliability diagram) and
``predictions.parquet`` (ids, per-head probabilities, score, labels) to ``out``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from transact.data.schema import EMB_DIM, EXPLICIT_ACTIONS, LABEL_COLUMNS
from transact.model import calibration as C, metrics as M
from transact.model.checkpoint import load_model, read_config
from transact.model.dataset import RowDataset, Split, default_train_end_ts
from transact.model.losses import next_action_stats
from transact.model.transact import TransActModel


@torch.no_grad()
def predict(model: TransActModel, data: RowDataset, batch_size: int = 1024, device: str | None = None,
            progress: bool = False, next_action: bool = False) -> dict[str, np.ndarray]:
    """Scores every row of ``data`` in file order (``next_action``: the NAL task too, for a
    model with a NAL head; calibration, which reads the heads only, leaves it off).

    Returns user_id, request_id, item_id, ts [N]; cand_emb_q int8 [N, D]; probs float32 [N, H] (the model's calibrated
    probabilities), raw float32 [N, H] (the plain sigmoid of the logits), logits float32 [N, H];
    labels float32 [N, len(LABEL_COLUMNS)]; with ``next_action`` and a Next Action Loss head, next_action float64 [4]:
    the NAL task's summed loss, top-1 hits, pairs and chance hits over the rows
    (:func:`transact.model.losses.next_action_stats`).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user_id", "request_id", "item_id", "ts", "probs", "raw",
                                                         "logits", "labels", "cand_emb_q")}
    nal = np.zeros(4) if next_action and model.has_nal else None  # loss, top1, pairs, chance
    for batch in tqdm(data.iter_batches(batch_size), total=data.num_batches(batch_size),
                      desc="predict", unit="batch", disable=not progress):
        batch = batch.to(dev)
        out = model(batch)
        logits = out.logits.float()  # [B, H]
        if nal is not None:
            st = next_action_stats(out, batch, model.fcfg)
            nal += [st["loss"], st["top1"], st["pairs"], st["chance"]]
        cols["probs"].append(model.probabilities(logits).cpu().numpy())
        cols["raw"].append(model.probabilities(logits, raw=True).cpu().numpy())
        cols["logits"].append(logits.cpu().numpy())
        cols["labels"].append(batch.labels.numpy())
        for k in ("user_id", "request_id", "item_id", "ts", "cand_emb_q"):
            cols[k].append(getattr(batch, k).numpy())
    H = len(model.cfg.heads)
    empty = {k: np.zeros((0, H), np.float32) for k in ("probs", "raw", "logits")}
    empty["labels"] = np.zeros((0, len(LABEL_COLUMNS)), np.float32)
    empty["cand_emb_q"] = np.zeros((0, EMB_DIM), np.int8)
    res = {k: (np.concatenate(v) if v else empty.get(k, np.zeros(0, np.int64))) for k, v in cols.items()}
    if nal is not None:
        res["next_action"] = nal
    return res


def next_action_metrics(pred: dict) -> dict | None:
    """The NAL task on the evaluation rows (None without a NAL head): mean Eq. 5 loss, the share
    of (u(t), p(t+1)) pairs whose positive outscores every negative, and that share by chance."""
    if "next_action" not in pred:
        return None
    loss, top1, pairs, chance = (float(x) for x in pred["next_action"])
    if pairs == 0:  # no (u(t), next positive) pair in these rows: nothing measured
        return {"loss": None, "top1": None, "chance_top1": None, "pairs": 0}
    return {"loss": loss / pairs, "top1": top1 / pairs, "chance_top1": chance / pairs, "pairs": int(pairs)}


def label_matrix(pred: dict, actions: tuple[str, ...] = EXPLICIT_ACTIONS) -> np.ndarray:
    """0/1 [N, len(actions)] from the predictions' label columns."""
    return np.stack([pred["labels"][:, LABEL_COLUMNS.index(f"label_{a}")] for a in actions], axis=1)


def compute_metrics(pred: dict, heads: tuple[str, ...], score_weights: dict[str, float] | None = None,
                    k: int = 3, n_boot: int = 1000, seed: int = 0,
                    actions: tuple[str, ...] = EXPLICIT_ACTIONS) -> dict:
    """HIT@k per action (with user-bootstrap 95% CI), impression diversity, AUC, log-loss and
    ECE per head, and the NAL task when ``pred`` carries it (:func:`next_action_metrics`)."""
    if score_weights is None:  # the default, restricted to the heads this model has
        weights = {h: w for h, w in M.DEFAULT_SCORE_WEIGHTS.items() if h in heads}
    else:
        weights = dict(score_weights)
    score = M.ranking_score(pred["probs"], heads, weights)  # [N]
    users, totals = M.hits_per_user(pred["user_id"], pred["request_id"], score, label_matrix(pred, actions), k)
    lo, hi = M.bootstrap_mean_ci(totals, n_boot, seed)
    hit = totals.mean(0) if len(users) else np.full(len(actions), np.nan)
    n_chunks = len(np.unique(np.stack([pred["user_id"], pred["request_id"]], 1), axis=0)) if len(score) else 0
    per_head: dict[str, dict] = {}  # filled below
    out = {
        "k": k, "score_weights": weights, "n_rows": int(len(score)), "n_users": int(len(users)),
        "n_chunks": int(n_chunks), "n_boot": n_boot,
        "hit": {a: {"value": float(hit[i]), "ci95": [float(lo[i]), float(hi[i])]} for i, a in enumerate(actions)},
        "heads": per_head,
    }
    if "cand_emb_q" in pred:  # impression diversity of the top-k, per user as HIT@k
        d_users, d_tot = M.diversity_per_user(pred["user_id"], pred["request_id"], score, pred["cand_emb_q"], k)
        d_lo, d_hi = M.bootstrap_mean_ci(d_tot[:, None], n_boot, seed)
        out["diversity"] = {"ild": {"value": float(d_tot.mean()) if len(d_tot) else float("nan"),
                                    "ci95": [float(d_lo[0]), float(d_hi[0])]},
                            "definition": f"sum over a user's requests of the mean pairwise cosine distance "
                                          f"of the top-{k} items' embeddings, mean over users"}
    reliability: dict[str, dict] = {}
    for j, h in enumerate(heads):
        y = pred["labels"][:, LABEL_COLUMNS.index(f"label_{h}")]
        p = pred["probs"][:, j]
        rate = float(y.mean()) if len(y) else float("nan")
        rel = {"calibrated": C.reliability(y, p)}
        per_head[h] = {"auc": M.auc(y, p), "logloss": M.log_loss(y, p), "ece": rel["calibrated"]["ece"],
                       "positive_rate": rate, "mean_prediction": float(p.mean()) if len(p) else float("nan"),
                       # the predictor that says the observed rate every time: a calibrated head must beat it
                       "constant_logloss": M.log_loss(y, np.full(len(y), rate)) if len(y) else float("nan")}
        if "raw" in pred:
            r = pred["raw"][:, j]
            rel["raw"] = C.reliability(y, r)
            per_head[h]["raw"] = {"logloss": M.log_loss(y, r), "ece": rel["raw"]["ece"],
                                  "mean_prediction": float(r.mean()) if len(r) else float("nan")}
        reliability[h] = rel
    out["reliability"] = reliability
    na = next_action_metrics(pred)
    if na is not None:
        out["next_action"] = na
    return out


def format_metrics(m: dict) -> str:
    split = (m.get("eval_window") or {}).get("description")
    lines = ([split] if split else []) + [f"{m['n_rows']:,} rows, {m['n_users']:,} users, {m['n_chunks']:,} chunks; "
             f"S = " + " ".join(f"{w:+g}*{h}" for h, w in m["score_weights"].items()), ""]
    lines.append(f"{'action':<10} {'HIT@' + str(m['k']):>9}  {'95% CI':>19}")
    for a, v in m["hit"].items():
        lines.append(f"{a:<10} {v['value']:>9.4f}  [{v['ci95'][0]:>8.4f}, {v['ci95'][1]:>8.4f}]")
    if "diversity" in m:
        d = m["diversity"]["ild"]
        lines.append(f"{'diversity':<10} {d['value']:>9.4f}  [{d['ci95'][0]:>8.4f}, {d['ci95'][1]:>8.4f}]  "
                     f"(intra-list distance of the top-{m['k']}, summed per user)")
    lines += ["", f"{'head':<10} {'AUC':>7} {'logloss':>8} {'ECE':>7} {'pos rate':>9} {'mean p':>7}   "
                  f"{'constant':>8}   {'raw logloss':>11} {'raw ECE':>7}"]
    for h, v in m["heads"].items():
        raw = v.get("raw", {})
        lines.append(f"{h:<10} {v['auc']:>7.4f} {v['logloss']:>8.4f} {v.get('ece', float('nan')):>7.4f} "
                     f"{v['positive_rate']:>9.4f} {v['mean_prediction']:>7.4f}   "
                     f"{v.get('constant_logloss', float('nan')):>8.4f}   {raw.get('logloss', float('nan')):>11.4f} "
                     f"{raw.get('ece', float('nan')):>7.4f}")
    lines.append("(logloss, ECE: calibrated probabilities; ECE over 15 equal-mass bins; constant: the log-loss "
                 "of always predicting the observed rate; raw: the plain sigmoid of the label-weighted heads)")
    na = m.get("next_action")
    if na and na["pairs"]:
        lines.append(f"next action (NAL task): loss {na['loss']:.4f}, positive ranked first in "
                     f"{na['top1']:.1%} of {na['pairs']:,} pairs (chance {na['chance_top1']:.1%})")
    return "\n".join(lines)


def write_predictions(pred: dict, heads: tuple[str, ...], score: np.ndarray, path: str | Path) -> None:
    cols = {k: pa.array(pred[k]) for k in ("user_id", "request_id", "item_id", "ts")}
    for j, h in enumerate(heads):
        cols[f"p_{h}"] = pa.array(pred["probs"][:, j])
    cols["score"] = pa.array(score)
    for i, c in enumerate(LABEL_COLUMNS):
        cols[c] = pa.array(pred["labels"][:, i].astype(np.uint8))
    pq.write_table(pa.table(cols), path)


def eval_split(model_dir: str | Path, rows: str | Path, train_end_ts: int | None = None,
               eval_end_ts: int | None = None, max_memory_mb: float = 1024,
               split: Split | str | dict | None = None) -> tuple[RowDataset, dict]:
    """The evaluation rows of the model's split (or the one given): the time split's window
    (ts >= the model's train_end_ts, or the one given), or each user's last requests.

    The window dict names the split (``split``, ``description``) for every table and for the
    gate, which scores the champion on the same rows."""
    training = read_config(model_dir).get("training", {})
    given = split is not None
    split = Split.parse(split if given else training.get("split"))
    window: dict = {"split": str(split), "split_source": "given" if given else "model config",
                    "eval_end_ts": eval_end_ts}
    # another split than the model's scores rows it trained on: allowed (a look), but said in every table
    trained = Split.parse(training.get("split"))
    note = "" if trained == split else f" -- NOT the model's training split ({trained}): rows it trained on are scored"
    if split.kind == "user":
        if train_end_ts is not None or eval_end_ts is not None:
            raise ValueError("the per-user split holds out each user's last requests: it takes no "
                             "train_end_ts / eval_end_ts")
        window.update(train_end_ts=None, source="per-user split", description=split.describe() + note)
        return RowDataset(rows, "eval", max_memory_mb=max_memory_mb, split_by=split), window
    if train_end_ts is None:
        # a model trained under the per-user split records none: the rows' own split point then
        train_end_ts = training.get("train_end_ts")
        window["source"] = "model config"
        if train_end_ts is None:
            train_end_ts, window["source"] = default_train_end_ts(rows)
    else:
        window["source"] = "given"
    window["train_end_ts"] = int(train_end_ts)
    window["description"] = split.describe(int(train_end_ts)) + note
    return RowDataset(rows, "eval", train_end_ts=train_end_ts, eval_end_ts=eval_end_ts,
                      max_memory_mb=max_memory_mb), window


def evaluate(model_dir: str | Path, rows: str | Path, out: str | Path | None = None, *,
             batch_size: int = 1024, score_weights: dict[str, float] | None = None, k: int = 3,
             n_boot: int = 1000, seed: int = 0, train_end_ts: int | None = None,
             eval_end_ts: int | None = None, device: str | None = None, predictions: bool = True,
             progress: bool = True, split: Split | str | dict | None = None) -> dict:
    """Evaluates a trained model folder on the evaluation rows of ``rows`` under ``split``
    (default: the split the model was trained with, :func:`eval_split`).

    Writes ``<out>/metrics.json`` (default out: ``<model_dir>/eval``) and returns the metrics.
    """
    model = load_model(model_dir, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data, window = eval_split(model_dir, rows, train_end_ts, eval_end_ts, split=split)
    # Before anything reads a row: rows of another S_all layout would fail in a reshape.
    data.feature_config.check_same(model.fcfg, f"the rows {rows}", f"the model {model_dir}")
    if data.num_rows == 0:
        raise ValueError(f"{rows}: no evaluation rows ({window['description']})")
    pred = predict(model, data, batch_size, device, progress, next_action=True)
    heads = model.cfg.heads
    m = compute_metrics(pred, heads, score_weights, k, n_boot, seed)
    m = {"model_dir": str(model_dir), "model": model.cfg.name, "rows": str(rows), "split": window["description"],
         "eval_window": window, **m}
    m["calibration"] = model.calibration.to_dict()
    out = Path(out) if out is not None else Path(model_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    m["reliability_plot"] = str(C.reliability_plot(m["reliability"], out / "reliability.png"))
    (out / "metrics.json").write_text(json.dumps(M.json_safe(m), indent=2, allow_nan=False))
    if predictions:
        write_predictions(pred, heads, M.ranking_score(pred["probs"], heads, m["score_weights"]),
                          out / "predictions.parquet")
    return m
