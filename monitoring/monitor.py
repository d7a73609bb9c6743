"""The monitoring job: served logs vs the training reference, window by window.

:func:`run_monitor` does, for each window of the current served log (``window_hours``,
epoch-aligned, in request time):

1. the Evidently report of the window against the reference
   (:func:`transact.monitoring.drift.analyze_window`), saved as
   ``<out>/reports/<window>.html`` (and ``.json``);
2. the drift rule (:class:`transact.monitoring.drift.DriftRule`); the report and the run
   open with its decision, its rule and the numbers it used, Evidently's own preset
   verdict labelled as its share rule (:mod:`transact.monitoring.verdict`);
   with labels joined (:func:`load_current` ``labels``), the window's calibration -- predicted
   vs observed rate, ECE, log-loss per head (:mod:`transact.monitoring.calibration`) -- in
   its decision record's ``scores.calibration``, the report and the dashboard;
3. the snapshot as a run of the Evidently UI project (``<out>/workspace`` unless given);
4. the action -- retrain or not, cooldown -- by :class:`transact.monitoring.trigger.RetrainTrigger`,
   appended to the decision log ``<out>/decisions.jsonl``.

``<out>/summary.json`` lists every window's decision and where its report is.

The reference is the training rows (:func:`load_reference`): NN-feature rows with ``ts``
before the model's training split (``train_end_ts`` of the ``world.json`` next to the
rows unless given), their predictions computed with the served model (``model_dir``),
so prediction drift compares the same model on both sides. A served log works as a
reference too (it carries its predictions).
"""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from transact.monitoring.drift import DriftRule, analyze_window, split_windows
from transact.monitoring.features import add_predictions, features_frame, heads_of


def parse_ts(value) -> int | None:
    """int ms since the epoch, or an ISO date/datetime (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    s = str(value).strip()
    if s.lstrip("-").isdigit():
        return int(s)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a timestamp (ms) or ISO datetime: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _read_parquet(path: str | Path, start_ts: int | None, end_ts: int | None):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transact.data.parts import parquet_files

    files = parquet_files(path)  # the one rule of which files hold rows (a published copy: its manifest's)
    tables = []
    for f in files:
        t = pq.read_table(f)
        if "tok_emb_q" not in t.column_names or "cand_emb_q" not in t.column_names:
            raise ValueError(f"{f}: not NN-feature rows or a served log (no tok_emb_q/cand_emb_q columns)")
        mask = None
        ts = t.column("ts")
        if start_ts is not None:
            mask = pc.greater_equal(ts, start_ts)
        if end_ts is not None:
            m = pc.less(ts, end_ts)
            mask = m if mask is None else pc.and_(mask, m)
        tables.append(t.filter(mask) if mask is not None else t)
    schemas = {tuple(t.schema.names) for t in tables}
    if len(schemas) != 1:
        raise ValueError(f"{path}: files with different columns")
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _world_train_end(path: str | Path) -> int | None:
    from transact.model.dataset import rows_train_end_ts

    found = rows_train_end_ts(path)
    return found[0] if found is not None else None


def _sample_requests(table, max_rows: int | None, seed: int):
    import pyarrow as pa

    if not max_rows or table.num_rows <= max_rows:
        return table
    from transact.monitoring.replay import sample_requests

    keep = sample_requests(table.column("request_id").to_numpy(), max_rows / table.num_rows, seed)
    return table.filter(pa.array(keep))


def load_reference(rows: str | Path, model_dir: str | Path | None = None, *, start_ts=None, end_ts=None,
                   max_rows: int | None = 50_000, seed: int = 0) -> tuple[pd.DataFrame, list[str], dict]:
    """The reference frame: training rows (or a served log) -> monitoring features (+ predictions).

    Returns (frame, heads with predictions, info).
    """
    start_ts, end_ts = parse_ts(start_ts), parse_ts(end_ts)
    end_source = "given"
    if end_ts is None:
        end_ts = _world_train_end(rows)
        end_source = "world.json train_end_ts" if end_ts is not None else "all rows"
    table = _sample_requests(_read_parquet(rows, start_ts, end_ts), max_rows, seed)
    if table.num_rows == 0:
        raise ValueError(f"{rows}: no reference rows in [{start_ts}, {end_ts})")
    frame = features_frame(table)
    heads = heads_of(table)
    pred_source = "served log" if heads else None
    if model_dir is not None:
        frame = add_predictions(frame, table, model_dir)
        from transact.model.checkpoint import read_config

        heads = list(read_config(model_dir)["heads"])
        pred_source = f"model {model_dir}"
    info = {"path": str(rows), "rows": int(table.num_rows), "start_ts": start_ts, "end_ts": end_ts,
            "end_ts_source": end_source, "predictions": pred_source, "heads": heads}
    return frame, heads, info


def load_current(logs: str | Path, *, start_ts=None, end_ts=None,
                 labels: str | Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """A served log (folder of served-*.parquet or one file) -> monitoring frame and its heads.

    ``labels``: a world folder or a requests parquet file (local); its labels are joined to the
    served rows (:func:`transact.monitoring.calibration.label_frame`), so each window reports
    its calibration."""
    table = _read_parquet(logs, parse_ts(start_ts), parse_ts(end_ts))
    frame = features_frame(table)
    if labels is not None:
        from transact.monitoring.calibration import label_frame, read_labels

        joined = label_frame(table, read_labels(labels))  # same row order as the frame
        frame = pd.concat([frame, joined.set_index(frame.index)], axis=1)
    return frame, heads_of(table)


def run_monitor(reference: pd.DataFrame, ref_heads: list[str], current: pd.DataFrame, cur_heads: list[str],
                out: str | Path, *, rule: DriftRule | None = None, window_hours: float = 24.0,
                trigger=None, workspace: str | Path | None = None, project: str | None = None,
                report: bool = True, plot_points: int = 300, max_window_rows: int | None = None,
                seed: int = 0, progress=None) -> dict:
    """Judges every window of ``current`` against ``reference`` (module docstring).

    Args:
        reference, current: monitoring frames (:func:`load_reference`, :func:`load_current`).
        out: output folder (reports/, decisions.jsonl, summary.json, workspace/).
        trigger: a :class:`~transact.monitoring.trigger.RetrainTrigger` (default: one with
            retraining off, logging to ``<out>/decisions.jsonl``).
        workspace: Evidently UI workspace (default ``<out>/workspace``; "" = none).
        max_window_rows: sample whole requests down to this many rows per window.
        progress: optional callable(str) for one line per window.
    Returns:
        The summary (also ``<out>/summary.json``).
    """
    from transact.monitoring import dashboard
    from transact.monitoring.trigger import DecisionLog, RetrainTrigger

    rule = rule or DriftRule()
    out = Path(out)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    trigger = trigger or RetrainTrigger(DecisionLog(out / "decisions.jsonl"), mode="off")
    heads = [h for h in cur_heads if h in ref_heads]
    ws = proj = None
    if workspace != "" and report:
        ws_path = Path(workspace) if workspace else out / "workspace"
        ws = dashboard.open_workspace(ws_path)
        from transact.monitoring.calibration import STATE

        proj = dashboard.ensure_project(ws, project or dashboard.DEFAULT_PROJECT, heads or dashboard.HEADS, rule,
                                        calibration=STATE in current.columns)
    t0 = time.perf_counter()
    records = []
    for name, start, end, rows in split_windows(current, window_hours):
        if max_window_rows and len(rows) > max_window_rows:
            from transact.monitoring.replay import sample_requests

            rows = rows[sample_requests(rows["request_id"].to_numpy(), max_window_rows / len(rows), seed)]
        slug = name.replace(":", "")
        html = out / "reports" / f"{slug}.html"
        # cur_heads: analyze_window keeps for drift the heads the reference predicts too, and
        # judges calibration on every head the window predicts (labels need no reference)
        snapshot, result = analyze_window(reference, rows, cur_heads, rule, window=name, start_ts=start, end_ts=end,
                                          report=report, plot_points=plot_points,
                                          html=html if report else None,
                                          json_path=out / "reports" / f"{slug}.json" if report else None)
        run_id = None
        if ws is not None and snapshot is not None:
            run_id = dashboard.add_window(ws, proj, snapshot, name)
        record = trigger.handle(result, report=result.report_html)
        record["run_id"] = run_id
        records.append(record)
        if progress:
            progress(format_record(record))
    summary = {
        "out": str(out),
        "windows": len(records),
        "drift_windows": sum(r["drift"] for r in records),
        "retrains": sum(r["action"] == "retrain" for r in records),
        "actions": [{**{k: r.get(k) for k in ("window", "rows", "drift", "action", "reason", "report", "run_id")},
                     "calibration": r.get("scores", {}).get("calibration")} for r in records],
        "rule": rule.to_dict(),
        "window_hours": window_hours,
        "decision_log": str(trigger.log.path),
        "workspace": str(Path(workspace) if workspace else out / "workspace") if ws is not None else None,
        "project": proj.name if proj is not None else None,
        "project_id": str(proj.id) if proj is not None else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "last_report": next((r["report"] for r in reversed(records) if r.get("report")), None),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def format_record(r: dict) -> str:
    s = r.get("scores", {})
    emb = s.get("embeddings", {})
    share = s.get("drift_share")
    parts = [f"{r['window']}", f"rows={r['rows']}",
             f"share={share:.2f}" if share is not None else "share=-",
             " ".join(f"auc_{k}={v:.2f}" for k, v in emb.items()),
             f"drift={'yes (' + ', '.join(sorted({x.split(':')[0] for x in r['reasons']})) + ')' if r['drift'] else 'no'}",
             f"action={r['action']}"]
    from transact.monitoring.calibration import summary_line

    parts.append(summary_line(s.get("calibration")))
    return "  ".join(p for p in parts if p)
