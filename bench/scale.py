"""`transact bench scale`: NN-logging throughput and peak memory per worker, local vs Ray,
on simulated worlds of growing size.

Each world is the ``bench`` profile with ``n_users`` users (and a shorter history, ``days``).
The local engine runs in a fresh process (its peak RSS is its own); Ray runs on this
machine with 1, 2, ... worker CPUs and ``ceil(users / users_per_part)`` parts, so a part
holds about the same users whatever the world: its task's peak RSS should stay flat while
the local process grows with the world. Rows per second count output rows over the
step's wall time (Ray: map + reduce, without starting Ray). Ray's rows are checked equal
in number to the local engine's. ``peak_rss_mib`` is the largest peak of a worker process
(Ray: of any task, in a reused worker), ``base_rss_mib`` its resident memory before the work
(after the imports), ``task_rss_mib`` the largest growth of one task above its start -- the
part of the peak that the work itself needs. ``load_1m`` is the machine's load average when a run
ended: on a shared machine, others' work slows a run and shows there.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

from transact.bench.machine import peak_rss_mib

COLUMNS = ["users", "events", "rows", "engine", "workers", "parts", "seconds", "rows_per_s", "speedup",
           "peak_rss_mib", "base_rss_mib", "task_rss_mib", "load_1m"]


def _world(work_dir: Path, users: int, days: int) -> tuple[Path, dict]:
    """The bench world of ``users`` users (kept: a re-run reuses it)."""
    import json

    from transact.data.simulator import get_profile, simulate
    from transact.data.world import check_world

    path = work_dir / f"world-u{users}-d{days}"
    try:
        check_world(path)
        return path, json.loads((path / "world.json").read_text())
    except (FileNotFoundError, ValueError):
        return path, simulate(replace(get_profile("bench"), n_users=users, days=days), path, seed=0, progress=False)


def _rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))


def _local_child(world: str, out: str, ll_cap: int) -> dict:
    """Runs in a fresh process: the local engine, with that process's memory."""
    from transact.features.config import FeatureConfig
    from transact.features.nn_logging import log_nn_features

    base = _rss_now_mib()  # after the imports: torch, pyarrow
    summary = log_nn_features(world, out, FeatureConfig(ll_cap=ll_cap), progress=False)
    return {**summary, "peak_rss_mib": round(peak_rss_mib(), 1), "base_rss_mib": round(base, 1)}


def _run_local(world: Path, out: Path, ll_cap: int) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_local_child, str(world), str(out), ll_cap).result()


def bench_scale(users: list[int], workers: list[int], work_dir: str | Path, days: int = 240,
                ll_cap: int = 16_384, users_per_part: int = 250) -> dict:
    """Rows/s and peak RSS per worker of the local engine and of Ray with each worker count."""
    from transact.components.ray_engine import log_nn_ray, ray_session
    from transact.features.config import FeatureConfig

    work_dir = Path(work_dir)
    worlds = {u: _world(work_dir, u, days) for u in users}
    rows: list[dict] = []
    local_s = {}
    for u, (world, meta) in worlds.items():
        events = int(meta["rows"]["actions"]) + int(meta["rows"]["impressions"])
        s = _run_local(world, work_dir / f"rows-u{u}-local.parquet", ll_cap)
        local_s[u] = s["seconds"]
        rows.append({"users": u, "events": events, "rows": s["rows"], "engine": "local", "workers": 1, "parts": 1,
                     "seconds": s["seconds"], "rows_per_s": round(s["rows"] / s["seconds"], 1), "speedup": 1.0,
                     "peak_rss_mib": s["peak_rss_mib"], "base_rss_mib": s["base_rss_mib"],
                     "task_rss_mib": round(s["peak_rss_mib"] - s["base_rss_mib"], 1),
                     "load_1m": round(os.getloadavg()[0], 2)})
    for w in workers:
        with ray_session(num_cpus=w):
            for u, (world, _) in worlds.items():
                parts = max(1, math.ceil(u / users_per_part))
                t0 = time.perf_counter()
                s = log_nn_ray(world, work_dir / f"rows-u{u}-ray{w}", FeatureConfig(ll_cap=ll_cap), parts)
                seconds = time.perf_counter() - t0
                local = next(r for r in rows if r["users"] == u and r["engine"] == "local")
                if s["rows"] != local["rows"]:
                    raise RuntimeError(f"ray wrote {s['rows']} rows for {u} users, local {local['rows']}")
                rows.append({"users": u, "events": local["events"], "rows": s["rows"], "engine": "ray",
                             "workers": w, "parts": parts, "seconds": round(seconds, 2),
                             "rows_per_s": round(s["rows"] / seconds, 1),
                             "speedup": round(local_s[u] / seconds, 2),
                             "peak_rss_mib": max(s["peak_rss_mib"]["part"], s["peak_rss_mib"]["map"]),
                             "part_rss_mib": s["peak_rss_mib"]["part"], "map_rss_mib": s["peak_rss_mib"]["map"],
                             "base_rss_mib": min(t["rss_start_mib"] for t in s["parts"]),
                             "task_rss_mib": max(round(t["peak_rss_mib"] - t["rss_start_mib"], 1)
                                                 for t in s["parts"] + s["map_tasks"]),
                             "load_1m": round(os.getloadavg()[0], 2)})
    return {"benchmark": "scale", "days": days, "ll_cap": ll_cap, "users_per_part": users_per_part,
            "rows": rows, "growth": _growth(rows)}


def _growth(rows: list[dict]) -> list[dict]:
    """Per engine: how time and peak memory grew from the smallest world to the largest."""
    out = []
    for key in sorted({(r["engine"], r["workers"]) for r in rows}):
        rs = sorted((r for r in rows if (r["engine"], r["workers"]) == key), key=lambda r: r["users"])
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        out.append({"engine": key[0], "workers": key[1], "users_x": round(b["users"] / a["users"], 2),
                    "events_x": round(b["events"] / a["events"], 2), "seconds_x": round(b["seconds"] / a["seconds"], 2),
                    "peak_rss_x": round(b["peak_rss_mib"] / a["peak_rss_mib"], 2),
                    "task_rss_x": round(b["task_rss_mib"] / a["task_rss_mib"], 2)})
    return out


def format_scale(result: dict) -> str:
    from transact.bench.report import format_table

    return (format_table(result["rows"], COLUMNS) + "\n\ngrowth, smallest -> largest world:\n"
            + format_table(result["growth"]))
