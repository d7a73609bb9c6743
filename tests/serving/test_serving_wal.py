"""The served log survives a crash (issue 18, item 1).

A writer process is SIGKILLed with batches queued and not yet in a parquet file; the next
writer on the same folder recovers every batch submitted before the kill, none twice.
The real service is killed under load in ``test_serving_crash.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from transact.data.schema import EMB_DIM
from transact.features.config import FeatureConfig
from transact.features.nn_features import SAll
from transact.serving.served_log import LogRecord, ServedLogWriter, read_served_log
from transact.serving.wal import WAL_DIR, WAL_META

CFG = FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)
HEADS = ("click", "repin")
ROWS_PER_RECORD = 5


def random_record(request_id: int, n: int = ROWS_PER_RECORD, seed: int = 0) -> LogRecord:
    g = torch.Generator().manual_seed(seed + request_id)
    S = CFG.seq_len
    s_all = SAll(emb_q=torch.randint(-127, 128, (n, S, EMB_DIM), generator=g, dtype=torch.int8),
                 action=torch.randint(0, 16, (n, S), generator=g, dtype=torch.uint8),
                 surface=torch.randint(0, 4, (n, S), generator=g, dtype=torch.int8),
                 age_s=torch.randint(-1, 10**6, (n, S), generator=g, dtype=torch.int32),
                 seg_len=torch.full((n, 4), 2, dtype=torch.int16))
    return LogRecord(s_all=s_all, cand_emb_q=torch.randint(-127, 128, (n, EMB_DIM), generator=g, dtype=torch.int8),
                     request_id=np.full(n, request_id, np.int64), user_id=np.full(n, 7, np.int64),
                     item_id=np.arange(n, dtype=np.int64) + 100, ts=np.full(n, 1_700_000_000_000, np.int64),
                     surface=np.zeros(n, np.int8), position=np.arange(n, dtype=np.int16),
                     probs=np.full((n, len(HEADS)), 0.5, np.float32), score=np.linspace(0, 1, n),
                     model_version="m:1", served_ts=np.full(n, 1_700_000_000_123, np.int64))


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_serving_wal import CFG, HEADS, random_record
    from transact.serving.served_log import ServedLogWriter
    w = ServedLogWriter({log!r}, CFG, HEADS, flush_rows={flush_rows}, flush_s=3600)
    for rid in range({n}):
        w.submit(random_record(rid))
        if {flush_rows} < 10**6:
            w.flush()  # files for the batches so far (those segments may go)
        print(rid, flush=True)
    time.sleep(600)
""")


def kill_writer_after(tmp_path, n: int, flush_rows: int) -> None:
    code = CHILD.format(tests=os.path.dirname(__file__), log=str(tmp_path / "log"), n=n, flush_rows=flush_rows)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = [p.stdout.readline() for _ in range(n)]
        assert seen[-1].strip() == str(n - 1), p.stderr.read()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def rows_by_request(log) -> dict[int, list[int]]:
    t = read_served_log(log)
    out: dict[int, list[int]] = {}
    for r, pos in zip(t.column("request_id").to_pylist(), t.column("position").to_pylist()):
        out.setdefault(r, []).append(pos)
    return out


def test_a_killed_writer_loses_no_submitted_row(tmp_path):
    kill_writer_after(tmp_path, n=12, flush_rows=10**9)  # nothing reached a parquet file
    assert not list((tmp_path / "log").glob("served-*.parquet"))
    w = ServedLogWriter(tmp_path / "log", CFG, HEADS)
    w.close()
    assert w.recovered.rows_recovered == 12 * ROWS_PER_RECORD and w.recovered.segments_recovered >= 1
    got = rows_by_request(tmp_path / "log")
    assert got == {rid: list(range(ROWS_PER_RECORD)) for rid in range(12)}
    assert not list((tmp_path / "log" / WAL_DIR).iterdir())  # recovered segments are gone


def test_recovery_writes_only_what_no_file_holds(tmp_path):
    """Files were written for every batch (some segments closed and deleted, the last
    one still open): recovery adds nothing, and nothing twice."""
    kill_writer_after(tmp_path, n=7, flush_rows=2 * ROWS_PER_RECORD)
    before = sorted(p.name for p in (tmp_path / "log").glob("served-*.parquet"))
    assert before and all(WAL_META in (pq.read_schema(tmp_path / "log" / f).metadata or {}) for f in before)
    w = ServedLogWriter(tmp_path / "log", CFG, HEADS)
    w.close()
    assert w.recovered.rows_recovered == 0
    got = rows_by_request(tmp_path / "log")
    assert got == {rid: list(range(ROWS_PER_RECORD)) for rid in range(7)}


def test_a_batch_torn_by_the_kill_is_dropped_the_complete_ones_kept(tmp_path):
    kill_writer_after(tmp_path, n=3, flush_rows=10**9)
    seg = sorted((tmp_path / "log" / WAL_DIR).glob("seg-*.arrows"))[-1]
    with open(seg, "ab") as f:  # a batch cut short inside its write
        f.write(b"\xff\xff\xff\xff\x10\x02\x00\x00" + os.urandom(300))
    w = ServedLogWriter(tmp_path / "log", CFG, HEADS)
    w.close()
    assert rows_by_request(tmp_path / "log") == {rid: list(range(ROWS_PER_RECORD)) for rid in range(3)}


def test_rows_count_as_logged_once_durable_and_segments_go_once_written(tmp_path):
    logged, written = [], []
    w = ServedLogWriter(tmp_path / "log", CFG, HEADS, flush_rows=2 * ROWS_PER_RECORD, flush_s=3600,
                        on_logged=logged.append, on_written=written.append)
    for rid in range(5):
        w.submit(random_record(rid))
        assert sum(logged) == (rid + 1) * ROWS_PER_RECORD  # before the writer thread ran
    w.close()
    assert sum(written) == 5 * ROWS_PER_RECORD == w.written_rows == w.logged_rows
    assert not list((tmp_path / "log" / WAL_DIR).iterdir())
    meta = [json.loads(pq.read_schema(f).metadata[WAL_META]) for f in w.files]
    assert sum(hi - lo + 1 for m in meta for lo, hi in m.values()) == 5  # every batch in exactly one file


def test_attach_labels_keeps_the_earliest_served_copy_whatever_the_file_order(tmp_path):
    from transact.data.schema import LABEL_COLUMNS, REQUESTS
    from transact.serving.served_log import attach_labels, record_to_arrow

    a, b = random_record(1, seed=0), random_record(1, seed=50)  # one request served twice
    b.served_ts = b.served_ts - 1  # the second file holds the earlier copy
    ta, tb = (record_to_arrow(r, CFG, HEADS) for r in (a, b))
    n = ROWS_PER_RECORD
    labels = pa.table({"request_id": np.full(n, 1, np.int64), "user_id": np.full(n, 7, np.int64),
                       "item_id": np.arange(n, dtype=np.int64) + 100, "ts": np.full(n, 1_700_000_000_000, np.int64),
                       "surface": np.zeros(n, np.int8), "position": np.arange(n, dtype=np.int16),
                       **{c: np.ones(n, np.uint8) for c in LABEL_COLUMNS}}, schema=REQUESTS)
    one = attach_labels(pa.concat_tables([ta, tb]), labels, CFG)
    other = attach_labels(pa.concat_tables([tb, ta]), labels, CFG)
    assert one.equals(other) and one.column("tok_emb_q").equals(tb.column("tok_emb_q"))
