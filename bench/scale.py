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


#: the stages of one NN-logging pass, and the function each is timed in (module, attribute);
#: a stage's time excludes the stages timed inside it (S_all assembly: build_s_all less the
#: NN search it calls)
STAGES: list[tuple[str, str, str]] = [
    ("store: read + index", "transact.features.sequences:EventStore", "from_dir"),
    ("sequences", "transact.features.sequences:EventStore", "sequences"),
    ("NN search", "transact.kernels.dispatch", "nn_search"),
    ("S_all assembly", "transact.features.nn_logging", "build_s_all"),
    ("arrow packing", "transact.features.nn_logging", "s_all_to_arrow"),
    ("parquet write (zstd)", "transact.data.io:AtomicParquetWriter", "write"),
    ("parquet write (zstd)", "transact.data.io:AtomicParquetWriter", "close"),
]


class StageTimer:
    """Wall time per stage of the pass, exclusive of nested stages: wraps the functions of
    :data:`STAGES` while in use (``with StageTimer() as t: ...; t.seconds``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open stage: [start, time spent in nested stages]
        self._undo: list[tuple[object, str, object]] = []

    def __enter__(self) -> StageTimer:
        import importlib

        for stage, where, attr in STAGES:
            mod_name, _, cls = where.partition(":")
            owner = importlib.import_module(mod_name)
            owner = getattr(owner, cls) if cls else owner
            raw = owner.__dict__[attr]
            self._undo.append((owner, attr, raw))
            setattr(owner, attr, self._wrap(stage, raw))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, raw in reversed(self._undo):
            setattr(owner, attr, raw)
        self._undo.clear()

    def _wrap(self, stage: str, raw):
        fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw

        def timed(*args, **kwargs):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, nested = self._stack.pop()
                spent = time.perf_counter() - start
                self.seconds[stage] = self.seconds.get(stage, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1][1] += spent

        return classmethod(timed) if isinstance(raw, classmethod) else timed


def _local_child(world: str, out: str, ll_cap: int, profile: bool = False) -> dict:
    """Runs in a fresh process: the local engine, with that process's memory."""
    import contextlib

    from transact.features.config import FeatureConfig
    from transact.features.nn_logging import log_nn_features

    base = _rss_now_mib()  # after the imports: torch, pyarrow
    timer = StageTimer() if profile else None
    with timer or contextlib.nullcontext():
        summary = log_nn_features(world, out, FeatureConfig(ll_cap=ll_cap), progress=False)
    out_d = {**summary, "peak_rss_mib": round(peak_rss_mib(), 1), "base_rss_mib": round(base, 1)}
    if timer is not None:
        stages = {k: round(v, 3) for k, v in timer.seconds.items()}
        stages["other (requests, batching, summary)"] = round(summary["seconds"] - sum(timer.seconds.values()), 3)
        out_d["stages_s"] = stages
    return out_d


def _run_local(world: Path, out: Path, ll_cap: int, profile: bool = False) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_local_child, str(world), str(out), ll_cap, profile).result()


def bench_scale(users: list[int], workers: list[int], work_dir: str | Path, days: int = 240,
                ll_cap: int = 16_384, users_per_part: int = 250, profile: bool = False) -> dict:
    """Rows/s and peak RSS per worker of the local engine and of Ray with each worker count.

    ``profile``: every run also times each stage of the pass (:class:`StageTimer`; the
    wrappers cost a few microseconds per call, ~1,000 calls per 100k rows), reported in
    ``stages`` as seconds and shares of the run: the local engine's wall time, Ray's
    task-seconds (:func:`ray_stages`)."""
    from transact.components.ray_engine import log_nn_ray, ray_session
    from transact.features.config import FeatureConfig

    work_dir = Path(work_dir)
    worlds = {u: _world(work_dir, u, days) for u in users}
    rows: list[dict] = []
    stages: list[dict] = []
    local_s = {}
    for u, (world, meta) in worlds.items():
        events = int(meta["rows"]["actions"]) + int(meta["rows"]["impressions"])
        s = _run_local(world, work_dir / f"rows-u{u}-local.parquet", ll_cap, profile)
        local_s[u] = s["seconds"]
        if profile:
            stages.extend({"users": u, "engine": "local", "stage": k, "seconds": v,
                           "share_pct": round(100 * v / s["seconds"], 1), "us_per_row": round(1e6 * v / s["rows"], 1)}
                          for k, v in s["stages_s"].items())
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
                s = log_nn_ray(world, work_dir / f"rows-u{u}-ray{w}", FeatureConfig(ll_cap=ll_cap), parts,
                               stage_timer=StageTimer if profile else None)
                seconds = time.perf_counter() - t0
                if profile:
                    stages.extend(ray_stages(s, u, w, seconds))
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
    result = {"benchmark": "scale", "days": days, "ll_cap": ll_cap, "users_per_part": users_per_part,
              "rows": rows, "growth": _growth(rows)}
    if profile:
        result["stages"] = stages
    return result


#: the part of a Ray part task outside the timed stages
RAY_PART_OTHER = "other (shuffle read, store index, batching)"


def ray_stages(summary: dict, users: int, workers: int, wall_s: float) -> list[dict]:
    """Where a Ray pass's *task* time goes: the map tasks (world tables -> shuffle), each
    stage of the part tasks summed over parts (:class:`StageTimer` inside every task), the
    rest of the parts, and what the workers did not spend in a task (``workers x wall -
    task seconds``: the driver's planning and sealing, Ray's scheduling, idle CPUs).
    ``seconds`` are task-seconds, so ``us_per_row`` is CPU cost per row whatever the workers."""
    per: dict[str, float] = {"map: world tables -> shuffle": sum(m["seconds"] for m in summary["map_tasks"])}
    for p in summary["parts"]:
        for k, v in p["stages_s"].items():
            per[k] = per.get(k, 0.0) + v
        per[RAY_PART_OTHER] = per.get(RAY_PART_OTHER, 0.0) + p["seconds"] - sum(p["stages_s"].values())
    busy = sum(per.values())
    per["not in a task (driver, scheduling, idle)"] = max(workers * wall_s - busy, 0.0)
    total, rows = sum(per.values()), max(summary["rows"], 1)
    return [{"users": users, "engine": f"ray{workers}", "stage": k, "seconds": round(v, 3),
             "share_pct": round(100 * v / total, 1), "us_per_row": round(1e6 * v / rows, 1)} for k, v in per.items()]


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

    text = (format_table(result["rows"], COLUMNS) + "\n\ngrowth, smallest -> largest world:\n"
            + format_table(result["growth"]))
    if result.get("stages"):
        text += ("\n\nwhere the time goes (local: exclusive wall seconds per stage; ray<w>: task-seconds of "
                 "every worker, so us_per_row is CPU per row):\n" + format_table(result["stages"]))
    return text
