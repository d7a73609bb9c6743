"""Adapters and I/O: clear errors that name the problem, nothing half-written."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_world
from transact.data import schema as S
from transact.data.adapter import import_logs
from transact.data.io import AtomicParquetWriter, SchemaError, conform, read_table


def test_import_round_trip_with_names_and_timestamps(tmp_path):
    items, actions, impressions, requests = write_world(tmp_path / "src")
    # Users' logs: action names, surface names, timestamp columns, emb as a plain list.
    names = ["|".join(a for i, a in enumerate(S.ACTIONS) if v >> i & 1) for v in actions.column("action").to_pylist()]
    a = actions.set_column(3, "action", pa.array(names))
    a = a.set_column(4, "surface", pa.array([S.SURFACES[s] for s in a.column("surface").to_pylist()]))
    a = a.set_column(2, "ts", pa.array(a.column("ts").to_numpy().astype("datetime64[ms]")))
    pq.write_table(a, tmp_path / "src" / "actions.parquet")
    emb = pa.array(items.column("emb").to_pylist(), pa.list_(pa.float32()))
    pq.write_table(pa.table({"item_id": items.column("item_id"), "emb": emb}), tmp_path / "src" / "items.parquet")
    summary = import_logs(tmp_path / "src", tmp_path / "world")
    got = read_table(tmp_path / "world" / "actions.parquet", S.ACTIONS_TABLE)
    assert got.column("action").to_pylist() == actions.column("action").to_pylist()
    assert got.column("ts").to_pylist() == actions.column("ts").to_pylist()
    got_items = read_table(tmp_path / "world" / "items.parquet", S.ITEMS)
    assert got_items.column("emb_q").to_pylist() == items.column("emb_q").to_pylist()
    assert json.loads((tmp_path / "world" / "world.json").read_text())["train_end_ts"] == summary["train_end_ts"]


@pytest.mark.parametrize(("table", "mutate", "message"), [
    ("actions", lambda t: t.drop_columns(["surface"]), "actions: missing column.*surface"),
    ("actions", lambda t: t.set_column(2, "ts", pa.array(["x"] * t.num_rows)), "actions: column 'ts' has type string"),
    ("actions", lambda t: t.set_column(3, "action", pa.array(["click|share"] * t.num_rows)), "unknown value 'share'"),
    ("requests", lambda t: t.set_column(6, "label_click", pa.array([2] * t.num_rows, pa.uint8())), "label_click.*outside"),
    ("impressions", lambda t: t.set_column(0, "user_id", pa.array([-5] * t.num_rows, pa.int64())), "user_id.*outside"),
    ("items", lambda t: t.set_column(2, "emb", pa.array([[0.1] * 16] * t.num_rows, pa.list_(pa.float32()))),
     "width 32; row 0 has width 16"),
    ("items", lambda t: t.set_column(2, "emb", pa.array([[float("nan")] * 32] * t.num_rows, pa.list_(pa.float32()))),
     "non-finite"),
    ("requests", lambda t: t.set_column(1, "user_id", pa.array(np.arange(t.num_rows), pa.int64())), "different user_id"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, table, mutate, message):
    write_world(tmp_path / "src")
    path = tmp_path / "src" / f"{table}.parquet"
    pq.write_table(mutate(pq.read_table(path)), path)
    with pytest.raises(SchemaError, match=message):
        import_logs(tmp_path / "src", tmp_path / "world")
    assert not (tmp_path / "world").exists() or not list((tmp_path / "world").iterdir())


def test_conform_names_missing_and_mistyped_columns():
    t = pa.table({"user_id": pa.array([1], pa.int64())})
    with pytest.raises(SchemaError, match="missing column 'item_id'"):
        conform(t, S.ACTIONS_TABLE, "actions")
    t = pa.table({"item_id": pa.array(["a"]), "topic": pa.array([1], pa.int32())})
    with pytest.raises(SchemaError, match="'item_id' has type string, expected int64"):
        conform(t, pa.schema([S.ITEMS.field("item_id")]), "items")


def test_atomic_writer_publishes_only_on_success(tmp_path):
    path = tmp_path / "t.parquet"

    def fail_midway():
        with AtomicParquetWriter(path, S.ACTIONS_TABLE) as w:
            w.write({"user_id": [1], "item_id": [2], "ts": [3], "action": [1], "surface": [0]})
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    assert list(tmp_path.iterdir()) == []
    with AtomicParquetWriter(path, S.ACTIONS_TABLE) as w:
        w.write({"user_id": [1], "item_id": [2], "ts": [3], "action": [1], "surface": [0]})
    assert pq.read_table(path).num_rows == 1


def test_atomic_writer_skips_dictionaries_for_per_row_blocks_only(tmp_path):
    """Fixed-size binary / list columns (per-row token blocks) are written without a
    dictionary by default; repeated scalars keep theirs; an explicit choice wins."""
    schema = pa.schema([("user_id", pa.int64()), ("tok", pa.binary(64)), ("age", pa.list_(pa.int32(), 4))])
    data = {"user_id": [7] * 50, "tok": [bytes(range(i, i + 64)) for i in range(50)], "age": [[i, 1, 2, 3] for i in range(50)]}

    def encodings(path):
        rg = pq.ParquetFile(path).metadata.row_group(0)
        return {rg.column(i).path_in_schema.split(".")[0]: any("DICTIONARY" in e for e in rg.column(i).encodings)
                for i in range(rg.num_columns)}

    def statistics(path):
        rg = pq.ParquetFile(path).metadata.row_group(0)
        return {rg.column(i).path_in_schema.split(".")[0]: rg.column(i).statistics is not None
                for i in range(rg.num_columns)}

    with AtomicParquetWriter(tmp_path / "a.parquet", schema) as w:
        w.write(data)
    assert encodings(tmp_path / "a.parquet") == {"user_id": True, "tok": False, "age": False}
    # min/max only where a reader can prune by them: not on the per-row blocks
    assert statistics(tmp_path / "a.parquet") == {"user_id": True, "tok": False, "age": False}
    with AtomicParquetWriter(tmp_path / "b.parquet", schema, use_dictionary=True) as w:
        w.write(data)
    assert encodings(tmp_path / "b.parquet")["tok"] is True
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_a_zombie_writer_is_dead():
    """A killed server's worker can stay a zombie (exited, not reaped) for seconds: its
    segments and temporary files belong to nobody, so recovery must not wait for it."""
    import os
    import subprocess
    import sys
    import time

    from transact.data.io import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # exited but not reaped: a zombie
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] == b"Z":
                    break
            time.sleep(0.05)
        assert not pid_alive(child.pid)
    finally:
        child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())


def test_read_table_reads_only_the_columns_asked_for_and_names_a_missing_one(tmp_path):
    """``columns``: only those are read (the store skips the items' fp16 embeddings) and
    checked; a column the file lacks is still refused by name."""
    items = pa.table({"item_id": pa.array([1, 2], pa.int64()), "topic": pa.array([0, 0], pa.int32())})
    pq.write_table(items, tmp_path / "items.parquet")
    got = read_table(tmp_path / "items.parquet", S.ITEMS, columns=["item_id", "topic"], what="items")
    assert got.column_names == ["item_id", "topic"] and got.column("item_id").to_pylist() == [1, 2]
    with pytest.raises(SchemaError, match="items: missing column 'emb_q'"):
        read_table(tmp_path / "items.parquet", S.ITEMS, columns=["item_id", "emb_q"], what="items")
