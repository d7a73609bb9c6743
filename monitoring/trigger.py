"""What happens after a window is judged: retrain or not, and the decision log.

Every judged window becomes one line of the decision log (JSON Lines, append-only):
``{"window", "start_ts", "end_ts", "rows", "drift", "reasons", "scores", "action",
"reason", "retrain", "report", "decided_at"}`` where ``action`` is one of

- ``retrain``         drift, not in cooldown: the retrain ran (locally) or was submitted (cluster);
- ``cooldown``        drift, but the last retrain is too recent: nothing started;
- ``retrain_failed``  drift, the retrain raised; the cooldown does NOT start, so the next
                      drifted window tries again;
- ``dry_run``         drift, not in cooldown, but retraining is off (``mode="off"``);
- ``none``            no drift;
- ``insufficient_data``  too few rows to judge.

Cooldown: no retrain when the last ``retrain`` action (read back from the log, so it
survives restarts) is less than ``cooldown_hours`` of *data time* before this window's
end (window timestamps come from the logged requests, so replays and backfills behave
like live traffic), or fewer than ``cooldown_windows`` judged windows ago. One shift
then costs one retrain, not one per window -- V1 retrained twice a week (V1 §4.4.3), so
the default is 72 hours.

Retraining (:class:`RetrainTrigger`): ``mode="local"`` calls a retrain callable (default
:func:`local_pipeline_retrain`: the KFP ``retrain`` pipeline run here with
``kfp.local``); ``mode="cluster"`` submits the ``retrain`` pipeline to a Kubeflow
Pipelines host (:func:`cluster_retrain`); tests inject a lighter callable.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HOUR_MS = 3_600_000
ACTIONS = ("retrain", "cooldown", "retrain_failed", "dry_run", "none", "insufficient_data")

#: A retrain callable gets the decision context (window, scores, reasons, ...) and returns
#: a JSON-able dict describing the run (where it is, its outcome).
RetrainFn = Callable[[dict], dict]


class DecisionLog:
    """Append-only JSON Lines file of decisions; with ``mirror`` (a location on the storage root)
    the whole log is written there after every decision, before the next step acts on it: a
    monitor killed after submitting a retrain still leaves that decision -- the cooldown's
    memory -- where the next run reads it."""

    def __init__(self, path: str | Path, mirror: str | None = None) -> None:
        self.path = Path(path)
        self.mirror = mirror

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=_jsonable, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.mirror:
            from transact.data import storage

            storage.write_bytes(self.mirror, self.path.read_bytes())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a torn last line after a crash
                        continue
        return out

    def last_retrain(self) -> dict | None:
        for rec in reversed(self.read()):
            if rec.get("action") == "retrain":
                return rec
        return None


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


@dataclass
class RetrainTrigger:
    """Decides the action for a judged window and runs the retrain.

    Args:
        log: the decision log (also the cooldown's memory).
        mode: "local" (call ``retrain``), "cluster" (submit to ``kfp_host``) or "off".
        retrain: the local retrain callable (default: :func:`local_pipeline_retrain` needs
            ``pipeline_params["source"]``).
        kfp_host: Kubeflow Pipelines API address for mode "cluster".
        pipeline_params: parameters of the ``retrain`` pipeline (source, storage_root, ...).
        cooldown_hours: data-time hours after a retrain during which drift does not retrain.
        cooldown_windows: judged windows after a retrain during which drift does not retrain.
        image, cluster: for mode "cluster", the image the retrain pipeline's steps run and what
            their pods get (:class:`transact.pipelines.training.Cluster`), as ``pipeline submit``
            takes them: a retrain submitted by the monitor runs where the first run ran.
    """

    log: DecisionLog
    mode: str = "local"
    retrain: RetrainFn | None = None
    kfp_host: str | None = None
    pipeline_params: dict = field(default_factory=dict)
    run_root: str | Path = "runs/retrain"
    cooldown_hours: float = 72.0
    cooldown_windows: int = 0
    image: str | None = None
    cluster: Any = None

    def __post_init__(self) -> None:
        if self.mode not in ("local", "cluster", "off"):
            raise ValueError(f"retrain mode must be local, cluster or off; got {self.mode!r}")
        if self.mode == "cluster" and not self.kfp_host:
            raise ValueError("retrain mode 'cluster' needs a Kubeflow Pipelines host (--kfp-host)")
        if self.cooldown_hours < 0 or self.cooldown_windows < 0:
            raise ValueError("cooldown must be >= 0")

    def in_cooldown(self, end_ts: int) -> tuple[bool, str]:
        records = self.log.read()
        last_i = next((i for i in range(len(records) - 1, -1, -1) if records[i].get("action") == "retrain"), None)
        if last_i is None:
            return False, "no earlier retrain"
        last = records[last_i]
        since_h = (int(end_ts) - int(last["end_ts"])) / HOUR_MS
        since_w = len(records) - 1 - last_i  # windows judged after the retrain's window
        if since_h < self.cooldown_hours:
            return True, (f"cooldown: last retrain at window {last['window']} ({since_h:.1f} h of data "
                          f"earlier < {self.cooldown_hours:g} h)")
        if since_w < self.cooldown_windows:
            return True, (f"cooldown: last retrain at window {last['window']} ({since_w} windows "
                          f"earlier < {self.cooldown_windows})")
        return False, f"last retrain {since_h:.1f} h / {since_w} windows earlier"

    def handle(self, result, report: str | None = None) -> dict:
        """Decides, retrains if needed, logs; returns the logged record.

        ``result`` is a :class:`transact.monitoring.drift.WindowResult` (or its dict)."""
        r = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        record = {
            "window": r["window"], "start_ts": int(r["start_ts"]), "end_ts": int(r["end_ts"]),
            "rows": int(r["rows"]), "drift": bool(r["drift"]), "reasons": list(r.get("reasons", [])),
            "scores": r.get("scores", {}), "report": report or r.get("report_html"),
            "decided_at": datetime.now(UTC).isoformat(timespec="seconds"), "retrain": None,
        }
        insufficient = any(x.startswith("insufficient data") for x in record["reasons"])
        if not record["drift"]:
            record["action"] = "insufficient_data" if insufficient else "none"
            record["reason"] = record["reasons"][0] if insufficient else "no drift"
        else:
            cooling, why = self.in_cooldown(record["end_ts"])
            if cooling:
                record["action"], record["reason"] = "cooldown", why
            elif self.mode == "off":
                record["action"], record["reason"] = "dry_run", f"drift; retraining is off ({why})"
            else:
                context = {k: record[k] for k in ("window", "start_ts", "end_ts", "rows", "reasons", "scores")}
                t0 = time.perf_counter()
                try:
                    info = self._run(context)
                    record["action"], record["reason"] = "retrain", f"drift; {why}"
                    record["retrain"] = {**(info or {}), "mode": self.mode,
                                         "seconds": round(time.perf_counter() - t0, 1)}
                except Exception as e:  # noqa: BLE001 - a failed retrain is logged, monitoring goes on
                    record["action"] = "retrain_failed"
                    record["reason"] = f"drift; the retrain failed: {type(e).__name__}: {e}"
                    record["retrain"] = {"mode": self.mode, "error": f"{type(e).__name__}: {e}",
                                         "seconds": round(time.perf_counter() - t0, 1)}
        self.log.append(record)
        return record

    def _run(self, context: dict) -> dict:
        if self.mode == "cluster":
            assert self.kfp_host  # __post_init__ refuses mode "cluster" without a host
            return cluster_retrain(self.kfp_host, self.pipeline_params, context, image=self.image,
                                   cluster=self.cluster)
        fn = self.retrain or (lambda ctx: local_pipeline_retrain(ctx, self.run_root, self.pipeline_params))
        return fn(context)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def local_pipeline_retrain(context: dict, run_root: str | Path, params: dict) -> dict:
    """Runs the KFP ``retrain`` pipeline here (``kfp.local``) on ``params["source"]``."""
    from transact.pipelines.runner import run_local

    if not params.get("source"):
        raise ValueError("the retrain pipeline needs a source folder of logs (--retrain-source)")
    run_dir = (Path(run_root) / f"retrain-{_safe(context['window'])}").resolve()
    summary = run_local("retrain", run_dir, **dict(params))
    if not str(summary.get("outcome", "")).startswith(("packaged", "stopped")):
        raise RuntimeError(f"retrain pipeline: {summary.get('outcome')} (see {run_dir / 'summary.md'})")
    return {"run_dir": str(run_dir), "outcome": summary.get("outcome"), "package": summary.get("package")}


def cluster_retrain(host: str, params: dict, context: dict, image: str | None = None, cluster=None) -> dict:
    """Submits the ``retrain`` pipeline to the Kubeflow Pipelines API at ``host`` (compiled with
    ``image`` and ``cluster``, as :func:`transact.pipelines.runner.submit` takes them)."""
    from transact.pipelines.runner import submit

    run = submit(host, "retrain", dict(params), run_name=f"retrain-{_safe(context['window'])}", image=image,
                 cluster=cluster)
    run_id = getattr(run, "run_id", None) or (run.get("run_id") if isinstance(run, dict) else None)
    return {"host": host, "run_id": run_id, "outcome": "submitted"}
