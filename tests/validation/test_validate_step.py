"""The pipeline's validate step with its quarantine and reference on object storage (issue 25:
on a cluster a quarantined batch went into a pod-local folder and was deleted with the pod).

A failed batch: reports first, then the move to a staging folder, then the publish to the
quarantine URI (files, manifest last), then the local delete -- row counts equal at the end.
A passing batch writes its profile to the reference URI; the next batch is checked against it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from transact.components import steps
from transact.data import storage
from transact.data.io import table_path
from transact.data.schema import TABLES
from transact.data.simulator import get_profile, simulate
from transact.validation.corruption import corrupt


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "world"
    simulate(get_profile("tiny"), out, seed=0, progress=False)
    return out


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3").bucket()


def _rows(world) -> dict[str, int]:
    return {t: pq.ParquetFile(table_path(world, t)).metadata.num_rows for t in TABLES if table_path(world, t).exists()}


def test_a_failed_batch_lands_whole_in_the_quarantine_on_the_storage_root(root, clean, tmp_path):
    where = steps.Layout(root)
    world = tmp_path / "run" / "world"
    corrupt(clean, "future_timestamps", seed=0, out=world)
    before = _rows(world)
    result = steps.validate(str(world), where.quarantine, where.reference)
    assert not result["passed"]
    assert result["quarantine"].startswith(where.quarantine)
    assert not world.exists()  # moved, not copied
    assert not (tmp_path / "run" / ".quarantine-staging").exists()
    if storage.is_remote(root):
        back = tmp_path / "back"
        manifest = storage.fetch_tree(result["quarantine"], back)  # every byte checked
        assert manifest["meta"]["rows"] == result["rows"]
    else:
        back = Path(result["quarantine"])  # locally: one rename
    assert _rows(back) == before  # every row accounted for
    assert (back / "validation_report.md").exists()  # the reasons travel with the batch
    assert not storage.exists(where.reference)  # a failed batch never becomes the reference


def test_a_passing_batch_becomes_the_reference_of_the_next_on_the_storage_root(root, clean, tmp_path):
    where = steps.Layout(root)
    first = shutil.copytree(clean, tmp_path / "b1" / "world")
    r1 = steps.validate(str(first), where.quarantine, where.reference)
    assert r1["passed"], r1["summary"]
    assert r1["reference_written"] == where.reference and storage.exists(where.reference)
    profile = storage.read_json(where.reference)
    second = tmp_path / "b2" / "world"
    corrupt(clean, "action_mix_shift", seed=0, out=second)  # visible only against a reference
    r2 = steps.validate(str(second), where.quarantine, where.reference)
    assert not r2["passed"] and r2["quarantine"].startswith(where.quarantine)
    assert storage.read_json(where.reference) == profile  # unchanged by the failed batch


def test_a_batch_left_in_staging_by_a_killed_step_is_published_by_the_next(s3, clean, tmp_path, monkeypatch):
    """Killed between the move to staging and the publish: the batch waits in staging (with its
    reports), and the next validation beside it publishes it first -- nothing lost."""
    from transact.data.storage import move_tree as real_move

    where = steps.Layout(s3.bucket())
    world = tmp_path / "run" / "world"
    corrupt(clean, "future_timestamps", seed=0, out=world)
    before = _rows(world)

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # the step dies here

    monkeypatch.setattr(storage, "move_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        steps.validate(str(world), where.quarantine, where.reference)
    staged = list((tmp_path / "run" / ".quarantine-staging").iterdir())
    assert len(staged) == 1 and _rows(staged[0]) == before and not world.exists()
    monkeypatch.setattr(storage, "move_tree", real_move)
    second = tmp_path / "run" / "world"
    shutil.copytree(clean, second)
    assert steps.validate(str(second), where.quarantine, where.reference)["passed"]
    published = storage.listdir(where.quarantine)
    assert len(published) == 1 and published[0].startswith("world-")
    back = storage.fetch_tree(storage.join(where.quarantine, published[0]), tmp_path / "back")
    assert back and _rows(tmp_path / "back") == before
    assert not (tmp_path / "run" / ".quarantine-staging").exists()
