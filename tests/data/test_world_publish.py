"""A world is published as one unit; a killed writer or quarantine never leaves a mix
(issue 16, items 4 and 5).

The writer is a real `transact simulate` process that SIGKILLs itself at each step of a
publish (``TRANSACT_FAULT_AT``); readers must then see the old world or the new one,
sealed and whole, and the next publish removes what the dead writer left.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from transact.cli import app
from transact.data.io import AtomicParquetWriter
from transact.data.world import FAULT_ENV, STEPS, WorldError, check_world, read_manifest, seal_world

#: from this step on the old world is aside and the sealed new one takes its place (a
#: reader rolls forward); before it the old world is still in place, whole
NEW_FROM = STEPS.index("old-aside")


def simulate(out: Path, seed: int, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "transact.cli", "simulate", "--profile", "tiny",
                           "--seed", str(seed), "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True)


def fingerprint(world: Path) -> dict:
    """sha256 of every table and of world.json, as the manifest vouches for them."""
    m = check_world(world, checksum=True)
    return {"tables": {n: e["sha256"] for n, e in m["tables"].items()}, "world_json": m["world_json"]["sha256"]}


def leftovers(world: Path) -> list[str]:
    beside = [p.name for p in world.parent.iterdir() if p.name.startswith(f".{world.name}.")]
    inside = [p.name for p in world.iterdir() if ".tmp-" in p.name] if world.is_dir() else []
    return beside + inside


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Fingerprints of the seed-0 (old) and seed-1 (new) tiny worlds, each published whole."""
    d = tmp_path_factory.mktemp("worlds")
    for seed in (0, 1):
        r = simulate(d / f"w{seed}", seed)
        assert r.returncode == 0, r.stderr[-2000:]
    return {"old": fingerprint(d / "w0"), "new": fingerprint(d / "w1")}


@pytest.mark.parametrize("step", STEPS)
def test_a_writer_killed_at_any_step_leaves_the_old_world_or_the_new(worlds, tmp_path, step):
    world = tmp_path / "world"
    assert simulate(world, 0).returncode == 0
    r = simulate(world, 1, fault=step)
    assert r.returncode == -signal.SIGKILL, (step, r.returncode, r.stderr[-2000:])
    seen = fingerprint(world)  # a reader: recovers a half-done swap, then checks the manifest
    want = "new" if STEPS.index(step) >= NEW_FROM else "old"
    assert seen == worlds[want], (step, want)
    # the next publish cleans what the dead writer left, and publishes whole
    assert simulate(world, 1).returncode == 0
    assert fingerprint(world) == worlds["new"] and leftovers(world) == [], leftovers(world)


def test_a_first_publish_killed_before_its_seal_leaves_no_world(tmp_path):
    world = tmp_path / "world"
    assert simulate(world, 0, fault="staged").returncode == -signal.SIGKILL
    with pytest.raises(FileNotFoundError, match="no world folder"):
        check_world(world)
    assert simulate(world, 0).returncode == 0 and leftovers(world) == []


def test_a_table_changed_after_publishing_is_refused_by_name(tmp_path):
    world = tmp_path / "world"
    assert simulate(world, 0).returncode == 0
    t = pq.read_table(world / "actions.parquet")
    pq.write_table(t.slice(0, t.num_rows - 1), world / "actions.parquet")
    with pytest.raises(WorldError, match=r"actions does not match manifest\.json .*bytes.*seal-world"):
        check_world(world)
    (world / "manifest.json").unlink()
    with pytest.raises(WorldError, match="no manifest.json"):
        check_world(world)
    r = CliRunner().invoke(app, ["seal-world", str(world)])
    assert r.exit_code == 0, r.output
    assert read_manifest(world)["tables"]["actions"]["rows"] == t.num_rows - 1


def test_stale_tmp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import pyarrow as pa

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f"rows.parquet.tmp-{dead_pid}"
        busy = tmp_path / f"rows.parquet.tmp-{live.pid}"
        other = tmp_path / f"other.parquet.tmp-{dead_pid}"
        for p in (stale, busy, other):
            p.write_bytes(b"half a file")
        schema = pa.schema([("x", pa.int64())])
        with AtomicParquetWriter(tmp_path / "rows.parquet", schema) as w:
            w.write(pa.table({"x": [1, 2]}, schema=schema))
        assert not stale.exists() and busy.exists() and other.exists()
        assert pq.read_table(tmp_path / "rows.parquet").num_rows == 2
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------- quarantine (item 5)

def validate(world: Path, quarantine: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "transact.cli", "validate", str(world),
                           "--quarantine", str(quarantine)], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def bad_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    assert simulate(d / "w", 0).returncode == 0
    r = CliRunner().invoke(app, ["corrupt", str(d / "w"), "--kind", "null_user_id"])
    assert r.exit_code == 0, r.output
    return d / "w"


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "where"), [("quarantine-reported", "batch"), ("quarantine-moved", "quarantine")])
def test_a_quarantine_killed_midway_keeps_its_reasons(bad_world, tmp_path, fault, where):
    import shutil

    world = shutil.copytree(bad_world, tmp_path / "w")
    q = tmp_path / "q"
    r = validate(world, q, fault)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    folder = world if where == "batch" else next(q.iterdir())
    assert folder.is_dir() and (where == "quarantine") != world.exists()
    report = json.loads((folder / "validation_results.json").read_text())
    assert report["passed"] is False and any("user_id" in json.dumps(f) for f in report["failures"])
    assert pq.read_table(folder / "actions.parquet").num_rows > 0  # the rows went with it


def test_validate_refuses_a_folder_that_is_not_a_world_and_moves_nothing(tmp_path):
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "notes.txt").write_text("not data")
    q = tmp_path / "q"
    r = CliRunner().invoke(app, ["validate", str(folder), "--quarantine", str(q)])
    assert r.exit_code != 0 and "not a world folder" in r.output and "nothing was moved" in r.output, r.output
    assert (folder / "notes.txt").read_text() == "not data" and not q.exists()


def test_validate_refuses_tables_without_a_manifest_and_names_seal_world(tmp_path):
    world = tmp_path / "w"
    assert simulate(world, 0).returncode == 0
    (world / "manifest.json").unlink()
    q = tmp_path / "q"
    r = CliRunner().invoke(app, ["validate", str(world), "--quarantine", str(q)])
    assert r.exit_code != 0 and "seal-world" in r.output and "nothing was moved" in r.output, r.output
    assert (world / "actions.parquet").exists() and not q.exists()
    seal_world(world)
