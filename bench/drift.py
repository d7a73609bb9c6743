"""``transact bench drift``: how often injected drift triggers a retrain, and how often a
stationary window does (false alarms).

For every seed:

1. three simulated worlds from the same seed -- no drift, ``interest_shift`` and
   ``new_items`` (default strengths, drift from the middle of the request window).
   The simulator draws drift from its own random stream, so all three are identical
   before the drift start: the no-drift world is the stationary control of the same
   users and items;
2. the reference: NN-feature training rows of the days before the drift start (after
   a ``warmup_days`` warm-up, since the simulator's impression sequences only start at
   the request window), a deterministic ``fraction`` of the requests, with the model's
   predictions;
3. served logs: the requests from the drift start on, in each world, replayed through
   the serving Ranker (:func:`transact.monitoring.replay.serve_world`), the same
   ``fraction`` sampled;
4. each day of served log is one window, judged by the monitor's rule and handed to the
   retrain trigger (cooldown off here -- with it on, one shift costs one retrain by
   design; a counting stand-in replaces the retrain pipeline).

The model: one small TransAct V2 trained once (``train_steps`` steps on the first seed's
reference rows) and reused for every world -- serving quality does not matter here,
only that the same model scores the reference and the windows. Scores are computed
with the same Evidently tests as the report without rendering it (``report=False``);
a test checks both paths agree.

World: the ``tiny`` profile with ``users`` users (default 300). With tiny's 50 users a
day is ~20 active users, so a stationary window differs from the reference mostly by
*which* users showed up; 300 users keep the cost small and the windows representative.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from transact.monitoring.drift import DriftRule, analyze_window, split_windows

KINDS = ("none", "interest_shift", "new_items")
DAY_MS = 86_400_000


def _world(root: Path, users: int, seed: int, kind: str, strength: float | None) -> tuple[Path, dict]:
    from transact.data.simulator import DriftConfig, get_profile, simulate

    cfg = get_profile("tiny")
    if users != cfg.n_users:
        cfg = replace(cfg, n_users=users)
    drift = DriftConfig(kind=kind) if strength is None or kind == "none" else DriftConfig(kind=kind, strength=strength)
    w = root / "worlds" / f"seed{seed}-{kind}"
    meta = w / "world.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        if info.get("seed") == seed and info["config"]["n_users"] == users and \
                info["drift"]["kind"] == kind and (strength is None or kind == "none"
                                                   or info["drift"]["strength"] == strength):
            return w, info
    return w, simulate(cfg, w, seed, drift=drift, progress=False)


def _train_model(root: Path, rows: Path, steps: int, seed: int) -> Path:
    from transact.model.train import train

    model_dir = root / "model"
    if (model_dir / "model.safetensors").exists() and (model_dir / "config.json").exists():
        return model_dir
    train(rows, model_dir, "v2", epochs=1, batch_size=128, max_steps=steps, seed=seed, progress=False,
          train_end_ts=2**62, resume=False, num_threads=1)
    return model_dir


def bench_drift(out: str | Path, seeds=range(10), *, users: int = 300, fraction: float = 0.3,
                warmup_days: int = 2, strength: float | None = None, train_steps: int = 20,
                rule: DriftRule | None = None, model_dir: str | Path | None = None,
                progress=print) -> dict:
    """Runs the benchmark (module docstring); returns the result (also ``<out>/drift.json``)."""
    import pyarrow.parquet as pq

    from transact.bench.machine import machine_info
    from transact.monitoring.features import add_predictions, features_frame
    from transact.monitoring.replay import log_rows, serve_world
    from transact.monitoring.trigger import DecisionLog, RetrainTrigger
    from transact.serving.served_log import read_served_log

    rule = rule or DriftRule()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    per_window = []
    retrains: list[dict] = []
    model = Path(model_dir) if model_dir else None
    for seed in seeds:
        t_seed = time.perf_counter()
        worlds = {k: _world(root, users, seed, k, strength) for k in KINDS}
        info = worlds["none"][1]
        drift_ts = int(worlds["interest_shift"][1]["drift"]["start_ts"])
        ref_start = info["request_start_ts"] + warmup_days * DAY_MS
        ref_rows = root / "reference" / f"seed{seed}.parquet"
        ref_rows.parent.mkdir(parents=True, exist_ok=True)
        if not ref_rows.exists():
            log_rows(worlds["none"][0], ref_rows, start_ts=ref_start, end_ts=drift_ts, fraction=fraction,
                     sample_seed=seed)
        if model is None:
            model = _train_model(root, ref_rows, train_steps, seed)
        ref_table = pq.read_table(ref_rows)
        reference = add_predictions(features_frame(ref_table), ref_table, model)
        from transact.model.checkpoint import read_config

        heads = list(read_config(model)["heads"])
        for kind in KINDS:
            served = root / "served" / f"seed{seed}-{kind}"
            if not any(served.glob("served-*.parquet")):
                serve_world(worlds[kind][0], model, served, start_ts=drift_ts, fraction=fraction,
                            sample_seed=seed)
            current = features_frame(read_served_log(served))
            log = DecisionLog(root / "decisions" / f"seed{seed}-{kind}.jsonl")
            if log.path.exists():
                log.path.unlink()
            def counted(ctx: dict, s: int = seed, k: str = kind) -> dict:
                retrains.append({"seed": s, "kind": k, "window": ctx["window"]})
                return {"outcome": "counted"}

            trigger = RetrainTrigger(log, mode="local", cooldown_hours=0.0, retrain=counted)
            for name, start, end, rows in split_windows(current, 24.0):
                _, res = analyze_window(reference, rows, heads, rule, window=name, start_ts=start, end_ts=end,
                                        report=False)
                rec = trigger.handle(res)
                s = res.scores
                per_window.append({
                    "seed": seed, "kind": kind, "window": name, "rows": res.rows, "drift": res.drift,
                    "action": rec["action"], "retrain": rec["action"] == "retrain",
                    "criteria": sorted({r.split(":")[0] for r in res.reasons}),
                    "drift_share": s.get("drift_share"),
                    "match": {c: s.get("columns", {}).get(c) for c in rule.match_columns},
                    "embeddings": s.get("embeddings"), "predictions": s.get("predictions"),
                })
        if progress:
            done = [w for w in per_window if w["seed"] == seed]
            progress(f"seed {seed}: " + ", ".join(
                f"{k} {sum(w['retrain'] for w in done if w['kind'] == k)}/{sum(w['kind'] == k for w in done)}"
                for k in KINDS) + f"  ({time.perf_counter() - t_seed:.0f} s)")
    summary = {}
    for kind in KINDS:
        ws = [w for w in per_window if w["kind"] == kind and not w["action"] == "insufficient_data"]
        k = sum(w["retrain"] for w in ws)
        summary[kind] = {"windows": len(ws), "retrains": k, "rate": k / len(ws) if ws else None,
                         "criteria": _count_criteria(ws)}
    drifted = [w for w in per_window if w["kind"] != "none" and w["action"] != "insufficient_data"]
    result = {
        "benchmark": "drift",
        "machine": machine_info(),
        "config": {"profile": "tiny", "users": users, "seeds": list(seeds), "fraction": fraction,
                   "warmup_days": warmup_days, "strength": strength if strength is not None else "default (0.5)",
                   "window_hours": 24, "model": str(model), "train_steps": train_steps,
                   "scores": "Evidently stattests + ModelDriftMethod, report not rendered"},
        "rule": rule.to_dict(),
        "summary": summary,
        "detection_rate": sum(w["retrain"] for w in drifted) / len(drifted) if drifted else None,
        "false_alarm_rate": summary["none"]["rate"],
        "windows": per_window,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (root / "drift.json").write_text(json.dumps(result, indent=2, default=_num))
    return result


def _num(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def _count_criteria(ws: list[dict]) -> dict:
    out: dict[str, int] = {}
    for w in ws:
        for c in w["criteria"]:
            out[c] = out.get(c, 0) + 1
    return out


def format_table(result: dict) -> str:
    lines = ["| windows | seeds | windows judged | retrain triggered | rate | criteria that fired |",
             "|---|---|---|---|---|---|"]
    names = {"none": "stationary (false alarms)", "interest_shift": "interest shift", "new_items": "new items"}
    for kind, s in result["summary"].items():
        crit = ", ".join(f"{k} {v}" for k, v in sorted(s["criteria"].items())) or "-"
        rate = f"{s['rate']:.1%}" if s["rate"] is not None else "-"
        lines.append(f"| {names.get(kind, kind)} | {len(result['config']['seeds'])} | {s['windows']} | "
                     f"{s['retrains']} | {rate} | {crit} |")
    det, fa = result["detection_rate"], result["false_alarm_rate"]
    lines.append("")
    lines.append(f"detection rate (drifted windows): {det:.1%}   false-alarm rate (stationary windows): {fa:.1%}"
                 if det is not None and fa is not None else "no windows")
    return "\n".join(lines)
