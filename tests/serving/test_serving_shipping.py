"""Shipping the served log to the storage root (issue 25: the served log, the next training set
and the monitor's input, stayed on the serving pod's disk). Report, copy, verify, delete: a
failure at any point leaves each file local or shipped and verified, never neither."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transact.data import storage
from transact.serving import shipping
from transact.serving.served_log import read_served_log
from transact.serving.shipping import LEDGER, Shipper, ship_served


def _log(folder, n_files: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    tables = []
    for i in range(n_files):
        t = pa.table({"request_id": pa.array(range(i * 10, i * 10 + 5 + i), pa.int64())})
        pq.write_table(t, folder / f"served-20261207T0000{i:02d}Z-1-{i:06d}.parquet")
        tables.append(t)
    (folder / "served-20261207T000099Z-1-000099.parquet.tmp-1").write_bytes(b"being written")
    (folder / "wal-1.seg").write_bytes(b"segment")
    return pa.concat_tables(tables)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3").bucket()


def test_sealed_files_move_to_the_storage_root_and_nothing_else_does(where, tmp_path):
    rows = _log(tmp_path / "log")
    done = ship_served(tmp_path / "log", storage.join(where, "served"), source="pod-a")
    assert (done["files"], done["rows"]) == (3, rows.num_rows) and done["to"] == storage.join(where, "served", "pod-a")
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == sorted([
        LEDGER, "served-20261207T000099Z-1-000099.parquet.tmp-1", "wal-1.seg"])
    ledger = [json.loads(x) for x in (tmp_path / "log" / LEDGER).read_text().splitlines()]
    assert [r["rows"] for r in ledger] == [5, 6, 7] and all(r["to"].startswith(done["to"]) for r in ledger)
    back = storage.download_tree(storage.join(where, "served"), tmp_path / "back")
    assert read_served_log(back).equals(rows)
    assert ship_served(tmp_path / "log", storage.join(where, "served"), source="pod-a")["files"] == 0


def test_a_copy_that_fails_keeps_the_file_and_the_next_pass_ships_it_once(where, tmp_path, monkeypatch):
    rows = _log(tmp_path / "log")
    real, calls = storage.put_file, []

    def flaky(src, location):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("connection reset by peer")
        real(src, location)

    monkeypatch.setattr(storage, "put_file", flaky)
    with pytest.raises(OSError, match="connection reset"):
        ship_served(tmp_path / "log", storage.join(where, "served"), source="p")
    assert len(shipping.sealed_files(tmp_path / "log")) == 2  # the first went; the failed one stays
    monkeypatch.setattr(storage, "put_file", real)
    assert ship_served(tmp_path / "log", storage.join(where, "served"), source="p")["files"] == 2
    back = storage.download_tree(storage.join(where, "served"), tmp_path / "back")
    assert read_served_log(back).equals(rows)  # every row once


def test_a_copy_that_reads_back_different_keeps_the_local_file(where, tmp_path, monkeypatch):
    _log(tmp_path / "log", n_files=1)
    monkeypatch.setattr(storage, "sha256_of", lambda _loc: (1, "0" * 64))
    with pytest.raises(RuntimeError, match="the local file is kept"):
        ship_served(tmp_path / "log", storage.join(where, "served"), source="p")
    assert len(shipping.sealed_files(tmp_path / "log")) == 1


def test_the_shipper_ships_on_close(where, tmp_path):
    (tmp_path / "log").mkdir()
    shipper = Shipper(tmp_path / "log", storage.join(where, "served"), every_s=3600, source="p")
    rows = _log(tmp_path / "log", n_files=2)  # written after the shipper started, before it stops
    assert shipper.close()["rows"] == rows.num_rows == shipper.shipped["rows"]
    assert shipping.sealed_files(tmp_path / "log") == []


def test_ship_served_command_for_a_sidecar(s3, tmp_path):
    from typer.testing import CliRunner

    from transact.cli import app

    rows = _log(tmp_path / "log", n_files=2)
    bucket = s3.bucket()
    r = CliRunner().invoke(app, ["ship-served", "--log-dir", str(tmp_path / "log"), "--to", f"{bucket}/served",
                                 "--source", "pod-b"])
    assert r.exit_code == 0, r.output
    assert f"shipped 2 files, {rows.num_rows:,} rows" in r.output and f"{bucket}/served/pod-b" in r.output
    r = CliRunner().invoke(app, ["ship-served", "--log-dir", "s3://b/log", "--to", f"{bucket}/served"])
    assert r.exit_code == 2 and "--log-dir: s3://b/log is an object-store URI" in r.output
