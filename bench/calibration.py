"""``transact bench calibration``: which map from logits to probabilities, measured.

The model's held-out calibration slice (the end of its training window, config.json's
``calibration_start_ts`` .. ``train_end_ts``) fits each candidate; the evaluation window after
it judges them, per head, by log-loss and ECE (15 equal-mass bins):

- ``raw``: the plain sigmoid of the label-weighted heads;
- ``platt``: sigmoid(s z + t);
- ``beta``: the model's own map (:mod:`transact.model.calibration`);
- ``isotonic``: pool-adjacent-violators, read between its knots linearly and kept within
  [1e-4, 1 - 1e-4] (as scikit-learn's ``IsotonicRegression`` predicts);
- ``platt_oracle``: Platt fitted on the evaluation window itself -- the best a temperature and a
  bias can do there, so a gap to it is the family's, not the slice's;
- ``constant``: the evaluation window's positive rate, everywhere.

Writes the table's JSON with the machine named (no timings: these are properties of the model).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def run(model_dir: str | Path, rows: str | Path, out: str | Path) -> dict:
    from transact.bench.machine import machine_info
    from transact.data.schema import LABEL_COLUMNS
    from transact.model import calibration as C
    from transact.model.checkpoint import load_model, read_config
    from transact.model.dataset import RowDataset
    from transact.model.evaluate import predict
    from transact.model.metrics import log_loss

    model = load_model(model_dir)
    training = read_config(model_dir).get("training", {})
    split = training.get("split") or {}
    if isinstance(split, dict) and split.get("kind", "time") != "time":
        raise ValueError(f"{model_dir}: trained with the per-user split; the comparison reads the time split's "
                         "held-out slice and window (train a time-split model to compare the maps)")
    start, end = training.get("calibration_start_ts"), training.get("train_end_ts")
    if start is None or end is None or start >= end:
        raise ValueError(f"{model_dir}: trained without a calibration slice (--calibration-holdout 0, or before "
                         "calibration existed); retrain it to compare the maps")
    held = predict(model, RowDataset(rows, "eval", train_end_ts=start, eval_end_ts=end))
    ev = predict(model, RowDataset(rows, "eval", train_end_ts=end))
    if len(ev["logits"]) == 0:
        raise ValueError(f"{rows}: no rows after the training window (ts >= {end})")
    table: dict[str, dict] = {}
    for j, h in enumerate(model.cfg.heads):
        col = LABEL_COLUMNS.index(f"label_{h}")
        zh, yh, ze, ye = held["logits"][:, j], held["labels"][:, col], ev["logits"][:, j], ev["labels"][:, col]
        s, t = C.fit_platt(zh, yh)
        so, to = C.fit_platt(ze, ye)
        knots, vals = C.isotonic(zh, yh)
        # between knots linearly, beyond them flat, probabilities kept off 0 and 1 (a step to 0 would give an
        # infinite log-loss): as scikit-learn's IsotonicRegression(y_min=1e-4, y_max=1 - 1e-4) predicts
        step = np.clip(np.interp(ze, knots, vals), 1e-4, 1 - 1e-4)
        maps = {"raw": C.sigmoid(ze), "platt": C.sigmoid(s * ze + t), "beta": C.apply(ze, *C.fit_beta(zh, yh)),
                "isotonic": step, "platt_oracle": C.sigmoid(so * ze + to), "constant": np.full(len(ye), ye.mean())}
        table[h] = {name: {"logloss": log_loss(ye, p), "ece": C.reliability(ye, p)["ece"]} for name, p in maps.items()}
        table[h]["rows"] = {"fit": int(len(yh)), "eval": int(len(ye)), "fit_positives": int(yh.sum()),
                            "eval_positive_rate": float(ye.mean())}
    # the ranking S = sum_h w_h f_h of the same model from the raw heads and from the calibrated ones
    from transact.model import metrics as M
    from transact.model.evaluate import label_matrix

    heads = model.cfg.heads
    weights = {h: w for h, w in M.DEFAULT_SCORE_WEIGHTS.items() if h in heads}
    hits = {}
    for name in ("raw", "probs"):
        score = M.ranking_score(ev[name], heads, weights)
        hits[name] = M.hits_per_user(ev["user_id"], ev["request_id"], score, label_matrix(ev))
    rel = M.paired_relative_change(hits["probs"][1], hits["raw"][1], n_boot=1000, seed=12345)
    from transact.data.schema import EXPLICIT_ACTIONS

    ranking = {a: {"raw": float(hits["raw"][1][:, i].mean()), "calibrated": float(hits["probs"][1][:, i].mean()),
                   "rel_change": float(rel["rel"][i]), "ci95": [float(rel["lo"][i]), float(rel["hi"][i])]}
               for i, a in enumerate(EXPLICIT_ACTIONS)}
    result = {"bench": "calibration", "hit3_by_score_from": ranking, "model_dir": str(model_dir), "rows": str(rows),
              "slice": {"start_ts": int(start), "end_ts": int(end)}, "heads": table,
              "machine": machine_info(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    names = ("raw", "platt", "beta", "isotonic", "platt_oracle", "constant")
    lines = [f"{'head':<7} " + " ".join(f"{n:>21}" for n in names), f"{'':<7} " + " ".join(
        f"{'logloss':>10} {'ECE':>10}" for _ in names)]
    for h, v in result["heads"].items():
        lines.append(f"{h:<7} " + " ".join(f"{v[n]['logloss']:>10.4f} {v[n]['ece']:>10.4f}" for n in names))
    lines.append("fitted on the model's held-out slice, judged on the window after training; "
                 "platt_oracle: Platt fitted on that window itself")
    lines.append("HIT@3 of S = sum_h w_h f_h from the raw heads -> from the calibrated ones (same model, paired):")
    for a, v in result["hit3_by_score_from"].items():
        lines.append(f"  {a:<8} {v['raw']:.4f} -> {v['calibrated']:.4f}  {v['rel_change'] * 100:+.2f}% "
                     f"[{v['ci95'][0] * 100:+.2f}%, {v['ci95'][1] * 100:+.2f}%]")
    return "\n".join(lines)
