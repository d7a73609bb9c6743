"""The paper's Table 2 on our rows: every baseline, same data, same seeds.

    transact ablation --rows runs/world/nn_rows.parquet --out runs/ablation --baseline transact --seeds 3

Each model is trained once per seed (``<out>/<model>/seed<k>``, resumable) and scored
on the same eval window. Per model, the per-user HIT@3 totals are averaged over seeds;
the relative change vs the named baseline is ``sum_u t^A_u / sum_u t^B_u - 1`` with a
95% interval from a *paired* user bootstrap (each resample draws the same users for
both models). Writes ``ablation.json``, ``ablation.md`` and ``ablation.png``.
Runs in one process (not under torchrun).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transact.data.schema import EXPLICIT_ACTIONS
from transact.model import metrics as M
from transact.model.checkpoint import load_model
from transact.model.dataset import RowDataset, default_train_end_ts
from transact.model.evaluate import compute_metrics, label_matrix, predict
from transact.model.train import train
from transact.model.transact import BASELINES

LABELS: dict[str, str] = {
    "wdl": "WDL (no sequence)",
    "bst": "BST (RT sequence)",
    "transact": "TransAct (RT sequence)",
    "transact_nal_inbatch": "TransAct (RT sequence) + NAL_in-batch",
    "transact_nal_imp": "TransAct (RT sequence) + NAL_imp",
    "v2": "TransAct V2 (RT seq + LL seq + NAL_imp)",
}
TABLE_ACTIONS: tuple[str, ...] = ("repin", "hide")


def ablation(rows: str | Path, out: str | Path, *, baseline: str = "transact",
             models: tuple[str, ...] | list[str] | None = None, seeds: int = 1, epochs: int = 1,
             batch_size: int = 256, lr: float = 1e-3, train_end_ts: int | None = None,
             n_boot: int = 1000, score_weights: dict[str, float] | None = None,
             progress: bool = True, resume: bool = True, num_threads: int | None = None,
             max_memory_mb: float = 1024, model_overrides: dict | None = None,
             max_steps: int | None = None) -> dict:
    """Trains and evaluates every model; returns the result (also written to ``out``).

    ``max_steps`` caps each run's optimiser steps (same cap for every model and seed, so
    the comparison stays paired) for machines where full epochs take too long.
    """
    models = list(models or BASELINES)
    if baseline not in models:
        models.insert(0, baseline)
    unknown = [m for m in models if m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(BASELINES)}")
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = "given"
    if train_end_ts is None:
        train_end_ts, src = default_train_end_ts(rows)
    eval_data = RowDataset(rows, "eval", train_end_ts=train_end_ts, max_memory_mb=max_memory_mb)
    if eval_data.num_rows == 0:
        raise ValueError(f"{rows}: no eval rows (ts >= {train_end_ts})")

    per_model: dict[str, dict] = {}
    users_ref = None
    for name in models:
        totals, runs = [], []
        for seed in range(seeds):
            run_dir = out / name / f"seed{seed}"
            summary = train(rows, run_dir, name, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                            train_end_ts=train_end_ts, progress=progress, resume=resume,
                            num_threads=num_threads, max_memory_mb=max_memory_mb,
                            model_overrides=model_overrides, step_budget=max_steps)
            model = load_model(run_dir)
            pred = predict(model, eval_data)
            m = compute_metrics(pred, model.cfg.heads, score_weights, n_boot=n_boot, seed=seed)
            (run_dir / "metrics.json").write_text(json.dumps(M.json_safe(m), indent=2, allow_nan=False))
            score = M.ranking_score(pred["probs"], model.cfg.heads, m["score_weights"])
            users, t = M.hits_per_user(pred["user_id"], pred["request_id"], score, label_matrix(pred))
            if users_ref is None:
                users_ref = users
            assert np.array_equal(users, users_ref)
            totals.append(t)
            runs.append({"seed": seed, "dir": str(run_dir), "train_seconds": summary["seconds"],
                         "hit": {a: m["hit"][a]["value"] for a in EXPLICIT_ACTIONS},
                         "auc": {h: v["auc"] for h, v in m["heads"].items()}})
            del model
        per_model[name] = {"totals": np.mean(totals, axis=0), "runs": runs}

    base = per_model[baseline]["totals"]
    result = {
        "rows": str(rows), "baseline": baseline, "models": models, "seeds": seeds, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "train_end_ts": int(train_end_ts), "train_end_ts_source": src,
        "n_boot": n_boot, "n_eval_rows": eval_data.num_rows, "n_users": int(len(users_ref)),
        "score_weights": score_weights or M.DEFAULT_SCORE_WEIGHTS, "results": {},
    }
    for name in models:
        t = per_model[name]["totals"]
        rel = M.paired_relative_change(t, base, n_boot=n_boot, seed=12345)
        hit = t.mean(0)
        result["results"][name] = {
            "label": LABELS.get(name, name),
            "hit": {a: float(hit[i]) for i, a in enumerate(EXPLICIT_ACTIONS)},
            "rel_change": {a: None if name == baseline else
                           {"value": _num(rel["rel"][i]), "ci95": [_num(rel["lo"][i]), _num(rel["hi"][i])],
                            "undefined_resamples": float(rel["undefined_frac"][i])}
                           for i, a in enumerate(EXPLICIT_ACTIONS)},
            "runs": per_model[name]["runs"],
        }
    result = M.json_safe(result)
    (out / "ablation.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    (out / "ablation.md").write_text(format_markdown(result))
    plot(result, out / "ablation.png")
    return result


def _num(x) -> float | None:
    """JSON-safe float: None for NaN / infinity (e.g. a baseline with no hit at all)."""
    x = float(x)
    return x if np.isfinite(x) else None


def _pct(v: dict | None) -> str:
    if v is None:
        return "-"
    f = lambda x: "n/a" if x is None else f"{x * 100:+.2f}%"  # noqa: E731
    return f"{f(v['value'])} [{f(v['ci95'][0])}, {f(v['ci95'][1])}]"


def format_table(result: dict) -> str:
    """Plain-text Table 2: relative change vs the baseline (95% CI), then absolute HIT@3."""
    rows = [(r["label"], *[_pct(r["rel_change"][a]) for a in TABLE_ACTIONS],
             *[f"{r['hit'][a]:.4f}" for a in TABLE_ACTIONS]) for r in result["results"].values()]
    head = ("Methods", *[f"HIT@3/{a}" for a in TABLE_ACTIONS], *[f"abs {a}" for a in TABLE_ACTIONS])
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([f"relative to {LABELS.get(result['baseline'], result['baseline'])} "
                      f"({result['seeds']} seed(s), {result['n_users']} users, paired user bootstrap 95% CI)",
                      fmt(head), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


def format_markdown(result: dict) -> str:
    lines = ["# Offline ablation (paper Table 2 layout)", "",
             f"Relative change of HIT@3 vs **{LABELS.get(result['baseline'], result['baseline'])}**; "
             f"brackets: 95% interval of the relative change from a paired user bootstrap "
             f"({result['n_boot']} resamples, {result['n_users']} users, {result['seeds']} seed(s) averaged). "
             "Higher is better for repin, lower for hide.", "",
             "| Methods | HIT@3/repin | HIT@3/hide | HIT@3/repin (abs) | HIT@3/hide (abs) |",
             "|---|---|---|---|---|"]
    for r in result["results"].values():
        lines.append(f"| {r['label']} | {_pct(r['rel_change']['repin'])} | {_pct(r['rel_change']['hide'])} "
                     f"| {r['hit']['repin']:.4f} | {r['hit']['hide']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["models"] if n != result["baseline"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4))
    x = np.arange(len(names))
    width = 0.38
    for j, (a, color) in enumerate(zip(TABLE_ACTIONS, ("tab:blue", "tab:red"))):
        pct = lambda x: np.nan if x is None else x * 100  # noqa: E731
        vals = np.array([pct(result["results"][n]["rel_change"][a]["value"]) for n in names])
        lo = np.array([pct(result["results"][n]["rel_change"][a]["ci95"][0]) for n in names])
        hi = np.array([pct(result["results"][n]["rel_change"][a]["ci95"][1]) for n in names])
        err = np.nan_to_num(np.stack([vals - lo, hi - vals]).clip(min=0))
        ax.bar(x + (j - 0.5) * width, np.nan_to_num(vals), width, yerr=err, capsize=3, color=color, label=f"HIT@3/{a}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [LABELS.get(n, n).replace(" + ", "\n+ ").replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel(f"% change vs {result['baseline']}")
    ax.set_title("Offline ablation (95% paired bootstrap CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
