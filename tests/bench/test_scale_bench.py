"""``transact bench scale --profile``: where the time of an NN-logging pass goes, by stage."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from helpers import write_world


def test_stage_timer_counts_nested_stages_once_and_restores_the_functions():
    """A stage's time excludes the stages timed inside it; leaving the timer puts every
    wrapped function back (the pass runs unwrapped outside a profile)."""
    import transact.data.io as io
    import transact.features.nn_logging as nn_logging
    import transact.features.sequences as seqs
    from transact.bench.scale import STAGES, StageTimer
    from transact.kernels import dispatch

    before = {(where, attr): _raw(where, attr) for _, where, attr in STAGES}
    clock = iter(range(100))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("transact.bench.scale.time.perf_counter", lambda: float(next(clock)))
        mp.setattr(dispatch, "nn_search", lambda: None)  # 1 s inside build_s_all
        mp.setattr(nn_logging, "build_s_all", lambda: dispatch.nn_search())
        with StageTimer() as timer:
            nn_logging.build_s_all()  # clock: outer 0 -> 3, inner 1 -> 2
        assert timer.seconds == {"NN search": 1.0, "S_all assembly": 2.0}
    after = {(where, attr): _raw(where, attr) for _, where, attr in STAGES}
    assert after == before
    assert seqs.EventStore.__dict__["sequences"] is before[("transact.features.sequences:EventStore", "sequences")]
    assert io.AtomicParquetWriter.__dict__["write"] is before[("transact.data.io:AtomicParquetWriter", "write")]


def _raw(where: str, attr: str):
    import importlib

    mod, _, cls = where.partition(":")
    owner = importlib.import_module(mod)
    return (getattr(owner, cls) if cls else owner).__dict__[attr]


def test_profiled_local_run_reports_every_stage_and_writes_the_same_rows(tmp_path):
    """The profiled child writes the rows an unprofiled one writes, byte for byte, and its
    stages (with "other") add up to the run's seconds."""
    from transact.bench.scale import STAGES, _local_child

    write_world(tmp_path / "world")
    plain = _local_child(str(tmp_path / "world"), str(tmp_path / "a.parquet"), 200)
    prof = _local_child(str(tmp_path / "world"), str(tmp_path / "b.parquet"), 200, profile=True)
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    assert "stages_s" not in plain and plain["rows"] == prof["rows"] > 0
    stages = prof["stages_s"]
    assert {s for s, _, _ in STAGES} | {"other (requests, batching, summary)"} == set(stages)
    assert all(v >= 0 for k, v in stages.items() if not k.startswith("other"))
    assert sum(stages.values()) == pytest.approx(prof["seconds"], abs=0.01)
