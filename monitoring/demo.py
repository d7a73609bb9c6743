"""The monitoring pass at the end of ``make demo`` (for ``transact.commands.demo``).

:func:`monitoring_pass` takes the demo's world, NN-feature rows and trained model, and

1. simulates the same world (same profile and seed) with an injected drift -- identical
   to the demo world before the drift start;
2. serves ``days`` drifted days through the Ranker (a ``fraction`` of the requests) into a
   served log;
3. joins the drifted world's labels to the served rows (``labels``), as a deployment does once
   its engagements arrive, so every window also reports its calibration;
4. runs the monitor against the training reference (retraining off: the decision log says
   ``dry_run`` where a deployment would retrain) with the Evidently report per window and the
   dashboard workspace.

Returns the monitor's summary; ``summary["last_report"]`` is the HTML report to open and
``summary["workspace"]`` what ``transact dashboard --workspace`` serves.
"""
from __future__ import annotations

from pathlib import Path

DAY_MS = 86_400_000


def monitoring_pass(out: str | Path, world: str | Path, rows: str | Path, model_dir: str | Path, *,
                    profile: str = "demo", seed: int = 0, drift: str = "interest_shift", days: int = 2,
                    fraction: float = 0.1, reference_max_rows: int = 5_000, warmup_days: int = 2,
                    labels: bool = True, progress=print) -> dict:
    import json

    from transact.data.simulator import DriftConfig, get_profile, simulate
    from transact.monitoring.monitor import load_current, load_reference, run_monitor
    from transact.monitoring.replay import serve_world

    out = Path(out)
    info = json.loads((Path(world) / "world.json").read_text())
    drifted = out / f"world-{drift}"
    meta = drifted / "world.json"
    if meta.exists() and json.loads(meta.read_text()).get("seed") == seed:
        d_info = json.loads(meta.read_text())
    else:
        d_info = simulate(get_profile(profile), drifted, seed, drift=DriftConfig(kind=drift), progress=False)
    start = int(d_info["drift"]["start_ts"])
    served = out / "served"
    if not any(served.glob("served-*.parquet")):
        r = serve_world(drifted, model_dir, served, start_ts=start, end_ts=start + days * DAY_MS,
                        fraction=fraction, sample_seed=seed)
        if progress:
            progress(f"monitoring: served {r['requests']} drifted requests ({r['rows']} rows) in {r['seconds']} s")
    reference, ref_heads, ref_info = load_reference(
        rows, model_dir, start_ts=int(info["request_start_ts"]) + warmup_days * DAY_MS,
        max_rows=reference_max_rows, seed=seed)
    current, heads = load_current(served, labels=drifted if labels else None)
    return run_monitor(reference, ref_heads, current, heads, out / "monitor", progress=progress)
