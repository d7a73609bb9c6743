"""The demo run: every step of the system on one machine, each artefact under one folder.

Steps are skipped when their output already exists for the same inputs, so a re-run
after an interruption picks up where it stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def _step(title: str) -> float:
    typer.secho(f"\n== {title}", bold=True)
    return time.perf_counter()


def run_demo(out: Path, profile: str = "demo", seed: int = 0) -> dict:
    from transact.components.nn_logging import log_nn_features
    from transact.data.simulator import get_profile, simulate
    from transact.model.config import FeatureConfig

    out = Path(out)
    world = out / "world"
    paths: dict[str, str] = {}
    t_all = time.perf_counter()

    t = _step(f"simulate the '{profile}' world (seed {seed})")
    meta = world / "world.json"
    done = meta.exists() and json.loads(meta.read_text()).get("seed") == seed \
        and json.loads(meta.read_text()).get("profile", profile) == profile
    if not done:
        simulate(get_profile(profile), world, seed=seed)
    summary = json.loads(meta.read_text())
    typer.echo(f"rows: {summary.get('rows')}  ({time.perf_counter() - t:.1f} s)")
    paths["world"] = str(world)

    t = _step("log NN features (one row per request x candidate)")
    rows = world / "nn_rows.parquet"
    if not rows.exists():
        log_nn_features(world, rows, FeatureConfig())
    typer.echo(f"{json.loads(rows.with_suffix('.json').read_text())['rows']:,} rows "
               f"({time.perf_counter() - t:.1f} s)")
    paths["nn_rows"] = str(rows)

    typer.secho(f"\n== done in {time.perf_counter() - t_all:.0f} s; results:", bold=True)
    for name, p in paths.items():
        typer.echo(f"  {name:<10} {p}")
    (out / "demo.json").write_text(json.dumps(paths, indent=2))
    return paths
