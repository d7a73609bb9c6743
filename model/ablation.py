"""The paper's Table 2 on our rows: every baseline, same data, same seeds -- a run a person
can watch, read early and resume.

    transact ablation --rows runs/world/nn_rows.parquet --out runs/ablation --baseline transact --seeds 3

Each model is trained once per seed (``<out>/<model>/seed<k>``) and scored on the same
evaluation rows, those of one :class:`transact.model.dataset.Split` (``split``: the global
time split, or each user's last requests), named in every table. Per model, the per-user
HIT@3 totals are averaged over seeds; the relative change vs the named baseline is ``sum_u
t^A_u / sum_u t^B_u - 1`` with a 95% interval from a *paired* user bootstrap (each resample
draws the same users for both models). Writes ``ablation.json``, ``ablation.md`` and
``ablation.png``. Runs in one process (not under torchrun).

Watching and resuming:

- Order: seed-major -- seed 0 of every model (the baseline first), then seed 1, ... -- so
  the first comparison exists after two runs, and every later run refines it.
- Progress: a line per run every ``progress_every_s`` seconds and at its end (model, seed,
  step, loss, examples/s, the run's and the whole ablation's ETA); ``log`` receives them.
- After every finished run the table is rebuilt from the finished runs, written (JSON,
  markdown, chart) and logged; until the last run it is marked partial. A model's row
  averages its finished seeds; its comparison uses the seeds the baseline has finished too
  (paired by seed as well as by user).
- Budget: ``max_steps`` is the number of optimiser steps of every run -- the training rows
  are cycled (as many epochs as it takes, the last one cut) and the warm-up + cosine
  schedule spans exactly those steps; without it every run trains ``epochs`` epochs. The
  budget actually trained is logged and recorded per run.
- Variants: a model may be a registry model with ModelConfig fields changed
  (:class:`Variant`, ``--variant imp_w1=transact_nal_imp:nal_weight=1``), so one ablation sweeps
  a setting (the NAL's weight, negatives, projection) paired by seed and user like the rest.
- Resume (``resume=True``): a finished run (``run.json`` + ``hits.npz`` in its folder, with
  the same settings) is read back, neither trained nor scored again; an interrupted run
  continues from its last checkpoint (:func:`transact.model.train.train`). A finished run
  with other settings, or whose stored model config differs from the one this ablation
  would train (a changed default), is refused by name (use another ``out`` or ``resume=False``).
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transact.data.schema import EXPLICIT_ACTIONS
from transact.model import metrics as M
from transact.model.calibration import HOLDOUT
from transact.model.checkpoint import load_model, read_config
from transact.model.dataset import RowDataset, Split, split_point
from transact.model.defaults import TRAIN
from transact.model.evaluate import compute_metrics, label_matrix, predict
from transact.model.train import PRECISIONS, holdout_start, train
from transact.model.transact import BASELINES, ModelConfig, model_config

LABELS: dict[str, str] = {
    "wdl": "WDL (no sequence)",
    "bst": "BST (RT sequence)",
    "transact": "TransAct (RT sequence)",
    "transact_nal_inbatch": "TransAct (RT sequence) + NAL_in-batch",
    "transact_nal_imp": "TransAct (RT sequence) + NAL_imp",
    "v2": "TransAct V2 (RT seq + LL seq + NAL_imp)",
}
TABLE_ACTIONS: tuple[str, ...] = ("repin", "hide")
RUN_FILE, HITS_FILE = "run.json", "hits.npz"


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _field_value(variant: str, key: str, raw: str, default):
    """``raw`` as the type of the field whose default is ``default`` (ValueError otherwise)."""
    bad = ValueError(f"variant {variant!r}: {key}={raw!r} is not a {type(default).__name__}")
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false"):
            raise bad
        return raw.lower() == "true"
    if isinstance(default, (int, float)):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        if isinstance(default, int) and not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, str):
        return raw
    raise ValueError(f"variant {variant!r}: {key} is not a setting a variant can change (a {type(default).__name__})")


@dataclass(frozen=True)
class Variant:
    """A model of the ablation that is a registry model with some ModelConfig fields changed."""

    name: str
    base: str
    overrides: dict

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``NAME=MODEL:FIELD=VALUE[,FIELD=VALUE...]``; each value must be of its field's type
        (true/false, an integer, a finite number, or a word). The config is built here, so a
        bad name, field or value fails in one line before any training."""
        name, sep, rest = spec.partition("=")
        base, sep2, fields = rest.partition(":")
        name, base = name.strip(), base.strip()
        if not (sep and sep2 and name and base):
            raise ValueError(f"variant {spec!r}: expected NAME=MODEL:FIELD=VALUE[,FIELD=VALUE...]")
        if not _NAME.fullmatch(name):
            raise ValueError(f"variant {name!r}: a name is letters, digits, '.', '_' or '-' (it names a folder)")
        if base not in BASELINES:
            raise ValueError(f"variant {name!r}: unknown model {base!r}; choose from {', '.join(BASELINES)}")
        defaults = BASELINES[base]()
        overrides: dict = {}
        for item in filter(None, (f.strip() for f in fields.split(","))):
            key, eq, raw = (x.strip() for x in item.partition("="))
            if not eq:
                raise ValueError(f"variant {name!r}: {item!r} is not FIELD=VALUE")
            if not hasattr(defaults, key):
                raise ValueError(f"variant {name!r}: unknown ModelConfig field {key!r}")
            overrides[key] = _field_value(name, key, raw, getattr(defaults, key))
        if not overrides:
            raise ValueError(f"variant {name!r}: no FIELD=VALUE given")
        try:
            cfg = model_config(base, **overrides)  # the config's own checks, now
        except (TypeError, ValueError) as e:
            raise ValueError(f"variant {name!r}: {e}") from None
        idle = sorted(k for k in overrides if k.startswith("nal_")) if cfg.nal == "none" else []
        if idle:
            raise ValueError(f"variant {name!r}: {', '.join(idle)} change nothing: {base} has no Next Action Loss "
                             f"(set nal=impression or nal=inbatch too)")
        return cls(name, base, overrides)

    @property
    def label(self) -> str:
        return f"{LABELS.get(self.base, self.base)} [" + ", ".join(f"{k}={v}" for k, v in self.overrides.items()) + "]"


def run_order(models: list[str], baseline: str, seeds: int) -> list[tuple[str, int]]:
    """(model, seed) in training order: seed-major, the baseline first within each seed."""
    first = [baseline] + [m for m in models if m != baseline]
    return [(m, s) for s in range(seeds) for m in first]


def epochs_for(max_steps: int | None, epochs: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs to pass to the trainer, steps each run trains): with a step budget, as many
    epochs as the budget needs (the last one cut), else ``epochs`` whole ones."""
    if max_steps is None:
        return epochs, epochs * steps_per_epoch
    return max(1, math.ceil(max_steps / max(steps_per_epoch, 1))), int(max_steps)


def _fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def ablation(rows: str | Path, out: str | Path, *, baseline: str = "transact",
             models: tuple[str, ...] | list[str] | None = None, seeds: int = 1, epochs: int = TRAIN.epochs,
             batch_size: int = TRAIN.batch_size, lr: float = TRAIN.lr, train_end_ts: int | None = None,
             n_boot: int = 1000, score_weights: dict[str, float] | None = None,
             progress: bool = True, resume: bool = True, num_threads: int | None = None,
             max_memory_mb: float = 1024, model_overrides: dict | None = None,
             max_steps: int | None = None, log: Callable[[str], None] | None = None,
             progress_every_s: float = 30.0, precision: str = "fp32",
             split: Split | str | None = None, variants: list[Variant] | None = None) -> dict:
    """Trains and evaluates every model; returns the result (also written to ``out``).

    ``max_steps``: optimiser steps of every run (epochs cycled to reach it; same budget for
    every model and seed, so the comparison stays paired). ``log``: where progress lines
    and the tables after each run go (default ``print`` when ``progress``, else nowhere).
    ``precision``: of every run's forward (:func:`transact.model.train.train`).
    ``split``: the time split (default) or the per-user one ("user", "user:N").
    ``variants``: further models, each a registry model with fields changed (:class:`Variant`);
    they join ``models`` (every registry model when that is None) unless it names them already.
    """
    split = Split.parse(split)
    names = [v.name for v in variants or []]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"variant names given twice: {twice}")
    variant_of = {v.name: v for v in variants or []}
    clash = sorted(set(variant_of) & set(BASELINES))
    if clash:
        raise ValueError(f"variant names {clash} are registry models; name variants otherwise")
    models = list(models or BASELINES)
    models += [v for v in variant_of if v not in models]
    if baseline not in models:
        models.insert(0, baseline)
    unknown = [m for m in models if m not in BASELINES and m not in variant_of]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(BASELINES)}")
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if log is None:
        log = (lambda s: print(s, flush=True)) if progress else (lambda s: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_end_ts, src = split_point(rows, train_end_ts, split)
    eval_data = RowDataset(rows, "eval", train_end_ts=train_end_ts, max_memory_mb=max_memory_mb, split_by=split)
    if eval_data.num_rows == 0:
        raise ValueError(f"{rows}: no eval rows ({eval_data.describe()})")
    # the rows the trainer steps through: the training rows less their held-out calibration slice
    fit_end_ts = holdout_start(rows, train_end_ts, HOLDOUT, split)
    spe = RowDataset(rows, "train", train_end_ts=train_end_ts, max_memory_mb=0, split_by=split,
                     max_ts=fit_end_ts).num_batches(batch_size)
    run_epochs, run_steps = epochs_for(max_steps, epochs, spe)
    budget = {"steps_per_run": run_steps, "epochs_per_run": round(run_steps / max(spe, 1), 3),
              "steps_per_epoch": spe, "cycled_epochs": run_epochs, "max_steps": max_steps}
    log(f"ablation ({eval_data.describe()}): {len(models)} models x {seeds} seed(s), {run_steps} steps per run "
        f"({budget['epochs_per_run']:g} epochs of {spe} steps, batch {batch_size}), seed-major, "
        f"baseline {baseline} first")
    end = None if train_end_ts is None else int(train_end_ts)
    settings = {"batch_size": batch_size, "lr": lr, "steps": run_steps, "epochs": run_epochs,
                "train_end_ts": end, "split": str(split), "model_overrides": model_overrides or {},
                "score_weights": score_weights, "n_eval_rows": eval_data.num_rows, "precision": precision}

    order = run_order(models, baseline, seeds)
    done: dict[tuple[str, int], dict] = {}
    rate: dict[str, float] = {}  # model -> steps/s of its last run
    eval_s: list[float] = []
    meta = {"rows": str(rows), "baseline": baseline, "models": models, "seeds": seeds, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "train_end_ts": end, "train_end_ts_source": src,
            "split": {**split.to_dict(), "description": eval_data.describe()},
            "n_boot": n_boot, "n_eval_rows": eval_data.num_rows, "budget": budget, "precision": precision,
            "score_weights": score_weights or M.DEFAULT_SCORE_WEIGHTS,
            "labels": {m: variant_of[m].label if m in variant_of else LABELS.get(m, m) for m in models},
            "variants": {n: {"model": v.base, "overrides": v.overrides} for n, v in variant_of.items()}}
    result: dict | None = None
    for i, (name, seed) in enumerate(order):
        run_dir = out / name / f"seed{seed}"
        variant = variant_of.get(name)
        spec = {"model": name, "seed": seed, **settings}
        if variant is not None:  # recorded, so a resumed run with other fields is refused by name
            spec["variant"] = {"model": variant.base, "overrides": variant.overrides}
        tag = f"[{i + 1}/{len(order)}] {name} seed {seed}"
        base, fields = (variant.base, variant.overrides) if variant else (name, {})
        resolved = model_config(base, **{**(model_overrides or {}), **fields})  # what a run would train now
        cached = _read_run(run_dir, spec, resolved) if resume else None
        if cached is not None:
            done[(name, seed)] = cached
            log(f"{tag}: finished before ({cached['steps']} steps), read back")
        else:
            def remaining_s(step: int, r: float) -> float:
                later = order[i + 1:]
                left = (run_steps - step) / r + sum(run_steps / rate.get(m, r) for m, s in later
                                                    if (m, s) not in done)
                return left + (float(np.mean(eval_s)) if eval_s else 0.0) * (1 + len(later))

            last = [0.0]
            t_run = time.perf_counter()

            def on_log(rec: dict) -> None:
                now = time.perf_counter()
                if rec["step"] < rec["total_steps"] and now - last[0] < progress_every_s:
                    return
                last[0] = now
                r = rec["examples_per_s"] / batch_size  # steps/s
                log(f"{tag}: step {rec['step']}/{rec['total_steps']}  loss {rec['loss']:.4f}  "
                    f"{rec['examples_per_s']:.0f} ex/s  ETA run {_fmt_s((rec['total_steps'] - rec['step']) / r)}"
                    f", all {_fmt_s(remaining_s(rec['step'], r))}")

            summary = train(rows, run_dir, base, epochs=run_epochs, batch_size=batch_size, lr=lr, seed=seed,
                            train_end_ts=train_end_ts, progress=False, resume=resume,
                            num_threads=num_threads, max_memory_mb=max_memory_mb,
                            model_overrides={**(model_overrides or {}), **fields},
                            step_budget=run_steps, on_log=on_log,
                            precision=precision, split=split)
            trained = summary["steps"] - summary["resumed_from_step"]
            if trained and summary["seconds"] > 0:
                rate[name] = trained / summary["seconds"]
            t_eval = time.perf_counter()
            run = _evaluate_run(run_dir, eval_data, score_weights, n_boot, seed, spec, summary)
            eval_s.append(time.perf_counter() - t_eval)
            done[(name, seed)] = run
            log(f"{tag}: trained {run['steps']} steps = {run['steps'] / max(spe, 1):g} epochs of {spe} "
                f"({run['examples']:,} examples) in {_fmt_s(time.perf_counter() - t_run)}; "
                f"HIT@3 repin {run['hit']['repin']:.4f}, hide {run['hit']['hide']:.4f}")
        result = _assemble(meta, order, done, n_boot)
        _write(out, result)
        log(format_table(result))
    assert result is not None  # order has at least one run
    return result


def _read_run(run_dir: Path, spec: dict, resolved: ModelConfig) -> dict | None:
    """A finished run's record (with its per-user totals) if ``run_dir`` holds one, else None;
    ValueError when it was made with other settings, or its model with other fields than
    ``resolved`` (the config this ablation would train now: a default that changed since the
    run finished -- w_NAL's did -- would otherwise read an old model back under today's name)."""
    f, h = run_dir / RUN_FILE, run_dir / HITS_FILE
    if not (f.exists() and h.exists()):
        return None
    run = json.loads(f.read_text())
    run["spec"].setdefault("split", "time")  # runs finished before the split was a setting were time-split
    want = json.loads(json.dumps(spec))  # tuples -> lists, as stored
    for k in sorted(set(want) | set(run["spec"])):
        if want.get(k) != run["spec"].get(k):
            raise ValueError(f"{run_dir}: finished with {k} = {run['spec'].get(k)!r}, this ablation has "
                             f"{want.get(k)!r} (use another --out or --no-resume)")
    # fields the run predates take today's defaults, as when a checkpoint resumes
    stored = json.loads(json.dumps(ModelConfig.from_dict(read_config(run_dir)["model_config"]).to_dict()))
    now = json.loads(json.dumps(resolved.to_dict()))
    changed = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
    if changed:
        was = ", ".join(f"{k} = {stored.get(k)!r}" for k in changed)
        raise ValueError(f"{run_dir}: its model was trained with {was}; this ablation's has "
                         f"{', '.join(f'{k} = {now.get(k)!r}' for k in changed)} (a default changed since it "
                         f"finished? use another --out or --no-resume)")
    with np.load(h) as z:
        run["users"], run["totals"] = z["users"], z["totals"]
        run["diversity_totals"] = z["diversity"] if "diversity" in z else None  # runs made before it was measured
    return run


def _evaluate_run(run_dir: Path, eval_data: RowDataset, score_weights, n_boot: int, seed: int,
                  spec: dict, summary: dict) -> dict:
    model = load_model(run_dir)
    pred = predict(model, eval_data, next_action=True)
    m = {"split": eval_data.describe(), **compute_metrics(pred, model.cfg.heads, score_weights, n_boot=n_boot,
                                                         seed=seed)}
    (run_dir / "metrics.json").write_text(json.dumps(M.json_safe(m), indent=2, allow_nan=False))
    score = M.ranking_score(pred["probs"], model.cfg.heads, m["score_weights"])
    users, totals = M.hits_per_user(pred["user_id"], pred["request_id"], score, label_matrix(pred))
    _, diversity = M.diversity_per_user(pred["user_id"], pred["request_id"], score, pred["cand_emb_q"])
    run = {"spec": spec, "seed": seed, "dir": str(run_dir), "steps": summary["steps"],
           "epochs": round(summary["steps"] / max(summary["steps_per_epoch"], 1), 3),
           "examples": summary["steps"] * summary["batch_size"], "train_seconds": summary["seconds"],
           "hit": {a: m["hit"][a]["value"] for a in EXPLICIT_ACTIONS},
           "auc": {h: v["auc"] for h, v in m["heads"].items()},
           "logloss": {h: v["logloss"] for h, v in m["heads"].items()},
           "ece": {h: v["ece"] for h, v in m["heads"].items()},
           "diversity": m["diversity"]["ild"]["value"],
           # the NAL task: on the evaluation rows, and the training loss of the last tenth of the run
           "next_action": m.get("next_action"), "train_nal": _tail_mean(summary.get("history") or [], "nal")}
    np.savez(run_dir / HITS_FILE, users=users, totals=totals, diversity=diversity)
    (run_dir / RUN_FILE).write_text(json.dumps(M.json_safe(run), indent=2, allow_nan=False))  # last: marks it done
    return {**run, "users": users, "totals": totals, "diversity_totals": diversity}


def _tail_mean(history: list[dict], key: str, share: float = 0.1) -> float | None:
    """Mean of ``key`` over the last ``share`` of the logged records (None when never logged or all zero)."""
    vals = [r[key] for r in history if key in r]
    tail = vals[-max(1, int(len(vals) * share)):] if vals else []
    return float(np.mean(tail)) if tail and any(tail) else None


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _head_means(done: dict, name: str, seeds: list[int], key: str) -> dict[str, float] | None:
    """Per head, the mean of ``key`` over the seeds; None if a run lacks it or diverged (NaN)."""
    per = [done[(name, s)].get(key) for s in seeds]
    if not per or any(not p for p in per) or not all(_finite(v) for p in per for v in p.values()):
        return None
    return {h: float(np.mean([p[h] for p in per])) for h in per[0]}


def _heads(r: dict, key: str) -> str:
    v = r.get(key)
    return "-" if not v else " / ".join(f"{x:.3f}" for x in v.values())


def _next_action(done: dict, name: str, seeds: list[int]) -> dict | None:
    """The NAL task of a model with a NAL head, mean over its seeds (None without one)."""
    keys = ("loss", "top1", "chance_top1")
    per = [done[(name, s)].get("next_action") for s in seeds]
    if not per or any(p is None or not all(_finite(p.get(k)) for k in keys) for p in per):
        return None  # no NAL head, no pairs, or a diverged run
    out: dict[str, float | None] = {k: float(np.mean([p[k] for p in per])) for k in keys}
    tn = [done[(name, s)].get("train_nal") for s in seeds]
    out["train_loss"] = float(np.mean(tn)) if all(_finite(t) for t in tn) else None
    return out


def _label(result: dict, name: str) -> str:
    """A model's row label (a variant names its changed fields)."""
    return (result.get("labels") or {}).get(name) or LABELS.get(name, name)


def _assemble(meta: dict, order: list[tuple[str, int]], done: dict, n_boot: int) -> dict:
    """The result of the finished runs (partial until every run of ``order`` is done)."""
    baseline = meta["baseline"]
    users_ref = next(iter(done.values()))["users"]
    for (name, seed), run in done.items():
        if not np.array_equal(run["users"], users_ref):
            raise ValueError(f"{name} seed {seed}: scored other eval users than the other runs")
    seeds_of = {m: sorted(s for (n, s) in done if n == m) for m in meta["models"]}
    base_seeds = set(seeds_of[baseline])
    result = {**meta, "partial": len(done) < len(order), "runs_finished": len(done), "runs_total": len(order),
              "n_users": int(len(users_ref)), "results": {},
              "pending": [m for m in meta["models"] if not seeds_of[m]]}
    for name in meta["models"]:
        if not seeds_of[name]:
            continue
        mean = lambda m, ss: np.mean([done[(m, s)]["totals"] for s in ss], axis=0)  # noqa: E731
        t = mean(name, seeds_of[name])
        common = [s for s in seeds_of[name] if s in base_seeds]
        rel = None
        if name != baseline and common:
            rel = M.paired_relative_change(mean(name, common), mean(baseline, common), n_boot=n_boot, seed=12345)
        hit = t.mean(0)
        div = _diversity(done, name, baseline, seeds_of[name], common, n_boot)
        result["results"][name] = {
            "label": _label(result, name), "seeds_done": seeds_of[name], "paired_seeds": common,
            "hit": {a: float(hit[i]) for i, a in enumerate(EXPLICIT_ACTIONS)},
            "rel_change": {a: None if rel is None else
                           {"value": _num(rel["rel"][i]), "ci95": [_num(rel["lo"][i]), _num(rel["hi"][i])],
                            "undefined_resamples": float(rel["undefined_frac"][i])}
                           for i, a in enumerate(EXPLICIT_ACTIONS)},
            "diversity": div,
            # calibrated log-loss and ECE per head, mean over the seeds (runs scored before: None)
            "logloss": _head_means(done, name, seeds_of[name], "logloss"),
            "ece": _head_means(done, name, seeds_of[name], "ece"),
            "next_action": _next_action(done, name, seeds_of[name]),
            "runs": [{k: v for k, v in done[(name, s)].items() if k not in ("users", "totals", "diversity_totals", "spec")}
                     for s in seeds_of[name]],
        }
    return M.json_safe(result)


def _diversity(done: dict, name: str, baseline: str, seeds: list[int], common: list[int], n_boot: int) -> dict | None:
    """Impression diversity (:func:`transact.model.metrics.diversity_per_user`) of ``name``, mean
    over its seeds, and its paired relative change vs the baseline; None for runs made before it
    was measured."""
    per = {s: done[(name, s)].get("diversity_totals") for s in seeds}
    if any(v is None for v in per.values()):
        return None
    out: dict = {"value": float(np.mean([per[s].mean() for s in seeds])), "rel_change": None}
    base = [done[(baseline, s)].get("diversity_totals") for s in common]
    if name != baseline and common and all(b is not None for b in base):
        a = np.mean([per[s] for s in common], axis=0)[:, None]  # [U, 1]
        rel = M.paired_relative_change(a, np.mean(base, axis=0)[:, None], n_boot=n_boot, seed=12345)
        out["rel_change"] = {"value": _num(rel["rel"][0]), "ci95": [_num(rel["lo"][0]), _num(rel["hi"][0])]}
    return out


def _write(out: Path, result: dict) -> None:
    for name, text in (("ablation.json", json.dumps(result, indent=2, allow_nan=False)),
                       ("ablation.md", format_markdown(result))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)  # a reader never sees half a table
    plot(result, out / "ablation.png")


def _num(x) -> float | None:
    """JSON-safe float: None for NaN / infinity (e.g. a baseline with no hit at all)."""
    x = float(x)
    return x if np.isfinite(x) else None


def _pct(v: dict | None) -> str:
    if v is None:
        return "-"
    f = lambda x: "n/a" if x is None else f"{x * 100:+.2f}%"  # noqa: E731
    return f"{f(v['value'])} [{f(v['ci95'][0])}, {f(v['ci95'][1])}]"


def _status(result: dict) -> str:
    b = result.get("budget") or {}
    steps = f", {b['steps_per_run']} steps per run ({b['epochs_per_run']:g} epochs)" if b else ""
    if result.get("partial"):
        return f"PARTIAL: {result['runs_finished']} of {result['runs_total']} runs finished{steps}"
    return f"final: {result.get('runs_total', '?')} runs{steps}"


def _div(r: dict) -> str:
    d = r.get("diversity")
    if d is None:
        return "-"
    return f"{d['value']:.3f}" + (f" {_pct(d['rel_change'])}" if d.get("rel_change") else "")


def _seeds(r: dict) -> str:
    return ",".join(map(str, r.get("seeds_done", []))) or "-"


def format_table(result: dict) -> str:
    """Plain-text Table 2: relative change vs the baseline (95% CI), then absolute HIT@3."""
    rows = [(r["label"], *[_pct(r["rel_change"][a]) for a in TABLE_ACTIONS],
             *[f"{r['hit'][a]:.4f}" for a in TABLE_ACTIONS], _div(r), _seeds(r)) for r in result["results"].values()]
    head = ("Methods", *[f"HIT@3/{a}" for a in TABLE_ACTIONS], *[f"abs {a}" for a in TABLE_ACTIONS],
            "diversity", "seeds")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    lines = [_split_line(result),
             f"{_status(result)}; relative to {_label(result, result['baseline'])} "
             f"({result['seeds']} seed(s), {result['n_users']} users, paired user bootstrap 95% CI)",
             fmt(head), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]]
    if result.get("pending"):
        lines.append("pending: " + ", ".join(result["pending"]))
    return "\n".join(lines)


def _split_line(result: dict) -> str:
    """The split the table's users were evaluated under (results made before it was recorded: time)."""
    s = result.get("split") or {}
    return s.get("description") or f"split: time (train_end_ts={result.get('train_end_ts')})"


def format_markdown(result: dict) -> str:
    lines = ["# Offline ablation (paper Table 2 layout)", "",
             f"{_split_line(result)}.", "",
             f"**{_status(result)}.** " if result.get("partial") else "",
             f"Relative change of HIT@3 vs **{_label(result, result['baseline'])}**; "
             f"brackets: 95% interval of the relative change from a paired user bootstrap "
             f"({result['n_boot']} resamples, {result['n_users']} users, {result['seeds']} seed(s) averaged). "
             "Higher is better for repin, lower for hide. Diversity: the impression diversity of the "
             "top 3 (intra-list distance, summed per user; its change vs the baseline in brackets). "
             "Log-loss and ECE: of the calibrated heads (click / repin / hide), mean over seeds.", "",
             "| Methods | HIT@3/repin | HIT@3/hide | HIT@3/repin (abs) | HIT@3/hide (abs) | diversity "
             "| log-loss | ECE | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"].values():
        lines.append(f"| {r['label']} | {_pct(r['rel_change']['repin'])} | {_pct(r['rel_change']['hide'])} "
                     f"| {r['hit']['repin']:.4f} | {r['hit']['hide']:.4f} | {_div(r)} | {_heads(r, 'logloss')} "
                     f"| {_heads(r, 'ece')} | {_seeds(r)} |")
    nal = [(r["label"], r["next_action"]) for r in result["results"].values() if r.get("next_action")]
    if nal:
        lines += ["", "The Next Action Loss task itself on the evaluation rows (models with a NAL head): mean "
                  "Eq. 5 loss, and how often the next positive action outscores every negative (chance: "
                  "1 / (1 + negatives)), scored for every model against the same negatives, all of the row's "
                  "NN(S_imp) tokens; train: the NAL loss over the last tenth of training, against the model's "
                  "own training negatives (in-batch, or fewer with nal_negatives: not comparable across those).", "",
                  "| Methods | NAL loss (eval) | top-1 | chance | NAL loss (train) |", "|---|---|---|---|---|"]
        for label, na in nal:
            tl = "-" if na.get("train_loss") is None else f"{na['train_loss']:.4f}"
            lines.append(f"| {label} | {na['loss']:.4f} | {na['top1']:.1%} | {na['chance_top1']:.1%} | {tl} |")
    if result.get("pending"):
        lines += ["", "Pending: " + ", ".join(result["pending"]) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    """Bar chart of the relative changes of the finished models (partial runs say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["models"] if n != result["baseline"] and n in result["results"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4))
    x = np.arange(len(names))
    width = 0.38
    pct = lambda v: np.nan if v is None else v * 100  # noqa: E731
    for j, (a, color) in enumerate(zip(TABLE_ACTIONS, ("tab:blue", "tab:red"))):
        rcs = [result["results"][n]["rel_change"][a] for n in names]
        vals = np.array([pct(rc and rc["value"]) for rc in rcs], dtype=float)
        lo = np.array([pct(rc and rc["ci95"][0]) for rc in rcs], dtype=float)
        hi = np.array([pct(rc and rc["ci95"][1]) for rc in rcs], dtype=float)
        err = np.nan_to_num(np.stack([vals - lo, hi - vals]).clip(min=0)) if names else np.zeros((2, 0))
        ax.bar(x + (j - 0.5) * width, np.nan_to_num(vals), width, yerr=err, capsize=3, color=color, label=f"HIT@3/{a}")
    ax.axhline(0, color="black", lw=0.8)
    ticks = [_label(result, n).replace(" + ", "\n+ ").replace(" [", "\n[").replace(" (", "\n(") for n in names]
    ax.set_xticks(x, ticks, fontsize=7)
    ax.set_ylabel(f"% change vs {result['baseline']}")
    title = "Offline ablation (95% paired bootstrap CI)"
    if result.get("partial"):
        title += f" -- partial, {result['runs_finished']}/{result['runs_total']} runs"
    ax.set_title(f"{title}\n{_split_line(result)}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
