"""The validation benchmark (``transact bench validation``): :func:`validate_world` timed
on a synthetic world, clean then corrupted; its table (:func:`format_bench`) and its JSON
naming the machine (:func:`write_bench_json`)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transact.validation.run import validate_world


def bench_validation(n_actions: int = 1_000_000, n_request_rows: int = 200_000,
                     n_items: int = 200_000, workdir: str | os.PathLike | None = None,
                     seed: int = 0) -> dict:
    """Times :func:`validate_world` on a synthetic world of the given size: a clean batch
    (pass, writes the reference), then the same batch with one corruption against that
    reference (fail, quarantined). GX's import is timed apart (paid once per process)."""
    import tempfile

    from transact.validation.corruption import corrupt
    from transact.validation.synthetic import synthetic_world

    with tempfile.TemporaryDirectory(dir=workdir) as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        import great_expectations  # noqa: F401

        t_import = time.perf_counter() - t
        t = time.perf_counter()
        world = synthetic_world(tmp / "world", n_items=n_items, n_actions=n_actions,
                                n_request_rows=n_request_rows, seed=seed)
        t_gen = time.perf_counter() - t
        ok = validate_world(world, tmp / "quarantine", reference=tmp / "reference.json")
        corrupt(world, "unknown_surface", seed=seed)
        bad = validate_world(world, tmp / "quarantine", reference=tmp / "reference.json")
    runs = {}
    for label, r in (("clean", ok), ("corrupted", bad)):
        runs[label] = {"passed": r.passed, "seconds": r.seconds, "timings": r.timings,
                       "expectations": sum(c["evaluated"] for c in r.checks.values()),
                       "failed": r.failed_names}
    return {"rows": {t: r["in"] for t, r in ok.rows.items()},
            "total_rows": sum(r["in"] for r in ok.rows.values()),
            "gx_import_seconds": round(t_import, 3), "generate_seconds": round(t_gen, 3), "runs": runs}


def format_bench(result: dict) -> str:
    rows = ", ".join(f"{t} {n:,}" for t, n in result["rows"].items())
    lines = [f"validation benchmark: {rows} ({result['total_rows']:,} rows)",
             f"  GX import (once per process): {result['gx_import_seconds']:.2f} s",
             "  run        result  expectations  seconds   read  derive     gx  decide"]
    for label, r in result["runs"].items():
        tm = r["timings"]
        lines.append(f"  {label:9s}  {'pass' if r['passed'] else 'FAIL':6s}  {r['expectations']:12d}  "
                     f"{r['seconds']:7.2f}  {tm['read']:5.2f}  {tm['derive']:6.2f}  {tm['gx']:5.2f}  "
                     f"{tm['decide']:6.2f}")
    return "\n".join(lines)


def write_bench_json(result: dict, path: str | os.PathLike) -> Path:
    """Writes ``{"benchmark": "validation", "machine": ..., "result": result}`` to ``path``."""
    from transact.bench.machine import machine_info

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "validation", "machine": machine_info(), "result": result},
                               indent=2))
    return path
