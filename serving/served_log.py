"""Served NN-feature log (paper §3.4.1): what the model saw, for training and monitoring.

Every served (request, candidate) becomes one row with the SAME columns, types and byte
layout as the offline NN-logging step (:func:`transact.features.nn_features.nn_rows_schema`,
built by the same :func:`~transact.features.nn_features.s_all_to_arrow`), except:

- no ``label_*`` columns: labels are unknown when a request is served;
- added: ``pred_<head>`` (float32, one per model head), ``score`` (float64, the S used
  to rank), ``model_version`` (string) and ``served_ts`` (int64 ms, server clock).

:func:`attach_labels` joins labels later -- from the ``requests`` table of a world, the
impression/engagement join of a real system -- on (``request_id``, ``position``) and
returns exact training rows in :func:`nn_rows_schema` (sorted like the offline step:
by ts, request_id, position). ``position`` is the candidate's index in the request's
``item_ids``; the caller's ``request_id`` is what ties a served request to its labels.

Nothing answered is lost on a crash: :meth:`ServedLogWriter.submit` converts a batch to
Arrow and appends it to a write-ahead segment (:mod:`transact.serving.wal`) on the
calling (model) thread, before the batch's responses are sent; the rows are then durable
against a process crash, and only then counted in ``transact_logged_rows_total``. The
parquet encoding stays off the request path: a bounded queue (in rows; when full, new
rows are dropped and counted -- serving never blocks on the log) feeds one background
thread that writes one parquet file per ``flush_rows`` rows or per ``flush_s`` seconds,
whichever comes first, each atomically (temporary name, then rename), and fsyncs the
segment at each flush. A writer that starts recovers the segments of stopped processes
into ``served-recovered-*.parquet`` files. ``close()`` flushes everything queued before it
returns; the service calls it on shutdown.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from transact.data.io import AtomicParquetWriter, SchemaError
from transact.data.schema import LABEL_COLUMNS
from transact.features.config import FeatureConfig
from transact.features.nn_features import SAll, nn_rows_schema, s_all_to_arrow
from transact.serving.wal import WalStats, WriteAheadLog, recover, wal_metadata

log = logging.getLogger("transact.serving")

#: nice value of the writer thread when it has to catch up (see :class:`WriterPriority`)
WRITER_NICE = 10

META_COLUMNS = ("request_id", "user_id", "item_id", "ts", "surface", "position")


def served_log_schema(cfg: FeatureConfig, heads: tuple[str, ...] | list[str]) -> pa.Schema:
    """:func:`nn_rows_schema` without labels, plus predictions, score, version, served time."""
    base = nn_rows_schema(cfg)
    fields = [f for f in base if f.name not in LABEL_COLUMNS]
    fields += [pa.field(f"pred_{h}", pa.float32(), nullable=False) for h in heads]
    fields += [pa.field("score", pa.float64(), nullable=False),
               pa.field("model_version", pa.string(), nullable=False),
               pa.field("served_ts", pa.int64(), nullable=False)]
    meta = dict(base.metadata or {})
    meta[b"heads"] = json.dumps(list(heads)).encode()
    meta[b"format"] = b"transact-served-log/1"
    return pa.schema(fields, metadata=meta)


@dataclass
class LogRecord:
    """One served batch's rows (CPU tensors / numpy), converted to Arrow by the writer."""

    s_all: SAll  # [n, S, ...]
    cand_emb_q: torch.Tensor  # int8 [n, D]
    request_id: np.ndarray  # int64 [n]
    user_id: np.ndarray
    item_id: np.ndarray
    ts: np.ndarray
    surface: np.ndarray  # int8 [n]
    position: np.ndarray  # int16 [n]
    probs: np.ndarray  # float32 [n, H]
    score: np.ndarray  # float64 [n]
    model_version: str
    served_ts: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.item_id)


def record_to_arrow(rec: LogRecord, cfg: FeatureConfig, heads) -> pa.Table:
    n = len(rec)
    meta = pa.table({
        "request_id": pa.array(rec.request_id, pa.int64()),
        "user_id": pa.array(rec.user_id, pa.int64()),
        "item_id": pa.array(rec.item_id, pa.int64()),
        "ts": pa.array(rec.ts, pa.int64()),
        "surface": pa.array(rec.surface, pa.int8()),
        "position": pa.array(rec.position, pa.int16()),
        **{c: pa.array(np.zeros(n, np.uint8), pa.uint8()) for c in LABEL_COLUMNS},  # dropped below
    })
    rows = s_all_to_arrow(rec.s_all, rec.cand_emb_q, meta, cfg).drop_columns(list(LABEL_COLUMNS))
    for j, h in enumerate(heads):
        rows = rows.append_column(f"pred_{h}", pa.array(np.ascontiguousarray(rec.probs[:, j]), pa.float32()))
    rows = rows.append_column("score", pa.array(rec.score, pa.float64()))
    rows = rows.append_column("model_version", pa.array([rec.model_version] * n, pa.string()))
    rows = rows.append_column("served_ts", pa.array(rec.served_ts, pa.int64()))
    return rows.cast(served_log_schema(cfg, heads))


class ServedLogWriter:
    """Bounded queue + background parquet writer of served rows.

    Args:
        out_dir: folder of ``served-*.parquet`` files.
        cfg, heads: feature contract and model heads (the schema).
        max_queue_rows: rows waiting to be written; beyond this, rows are dropped.
        flush_rows: rows per file.
        flush_s: a queued row is written within about this many seconds.
        on_logged: callback with a row count once rows are durable (in the write-ahead
            segment); on_written: once in a parquet file; on_dropped: rows not logged.
        wal: keep write-ahead segments (off: a crash loses what is queued).
    """

    def __init__(self, out_dir: str | Path, cfg: FeatureConfig, heads, max_queue_rows: int = 32_768,
                 flush_rows: int = 8192, flush_s: float = 5.0,
                 on_written: Callable[[int], None] | None = None,
                 on_dropped: Callable[[int], None] | None = None,
                 on_logged: Callable[[int], None] | None = None, wal: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.heads = cfg, tuple(heads)
        self.schema = served_log_schema(cfg, self.heads)
        self.max_queue_rows, self.flush_rows, self.flush_s = max_queue_rows, flush_rows, flush_s
        self._on_written, self._on_dropped, self._on_logged = on_written, on_dropped, on_logged
        # segments of stopped processes first: their rows were answered and must reach a file
        self.recovered: WalStats = recover(self.out_dir, self._write_recovered) if wal else WalStats()
        self.wal = WriteAheadLog(self.out_dir, self.schema, segment_rows=flush_rows) if wal else None
        self.logged_rows = 0  # durable: in a write-ahead segment (or a file)
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # rows queued, not yet written
        self.written_rows = 0
        self.dropped_rows = 0
        self.files: list[Path] = []
        self._seq = 0
        self._closed = False
        self.priority: WriterPriority | None = None  # set by the writer thread, on itself
        self._thread = threading.Thread(target=self._run, name="served-log-writer", daemon=True)
        self._thread.start()

    # --- request path -------------------------------------------------------------------------

    def submit(self, rec: LogRecord) -> bool:
        """Makes a record durable (write-ahead segment) and queues it for the parquet
        writer, without waiting for it; False (and counted) when the queue is full."""
        n = len(rec)
        with self._lock:
            if self._closed or self._pending + n > self.max_queue_rows:
                self.dropped_rows += n
                dropped = True
            else:
                self._pending += n
                dropped = False
        if dropped:
            if self._on_dropped:
                self._on_dropped(n)
            return False
        try:
            table = record_to_arrow(rec, self.cfg, self.heads)
            where = self.wal.append(table) if self.wal is not None else None
        except Exception:  # a bad record or a full disk costs log rows, never requests
            log.exception("served log: could not log %d rows; dropped", n)
            with self._lock:
                self._pending -= n
            self._count_dropped(n)
            return False
        with self._lock:
            self.logged_rows += n
        if self._on_logged:
            self._on_logged(n)
        self._q.put((table, where))
        if self.priority is not None:  # a starved idle-priority writer cannot wake itself up
            self.priority.update(self._pending)
        return True

    @property
    def pending_rows(self) -> int:
        return self._pending

    def flush(self, timeout: float = 60.0) -> None:
        """Blocks until every record queued before the call is on disk."""
        done = threading.Event()
        self._q.put(done)
        if not done.wait(timeout):
            raise TimeoutError(f"served log: flush did not finish in {timeout} s")

    def close(self, timeout: float = 60.0) -> None:
        """Flushes and stops the writer thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._q.put(None)
        self._thread.join(timeout)

    # --- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        self.priority = WriterPriority(self.max_queue_rows)
        buf: list[pa.Table] = []
        batches: list[tuple[str, int]] = []  # (segment, batch) of each buffered table
        rows = 0
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                item = "tick"
            self.priority.update(self._pending)
            if isinstance(item, tuple):
                table, where = item
                buf.append(table)
                if where is not None:
                    batches.append(where)
                rows += table.num_rows
                if deadline is None:
                    deadline = time.monotonic() + self.flush_s
                if rows < self.flush_rows:
                    continue
            # a tick, a flush request, shutdown, or enough rows: write what is buffered
            if rows:
                self._write(buf, rows, batches)
                buf, batches, rows, deadline = [], [], 0, None
            if self.wal is not None:
                self._sync_wal()
            if isinstance(item, threading.Event):
                item.set()
            elif item is None:
                if self.wal is not None:
                    self.wal.close()
                return

    def _sync_wal(self) -> None:
        assert self.wal is not None
        try:
            self.wal.sync()
        except OSError:  # durability against power loss only; keep serving
            log.exception("served log: fsync of the write-ahead segment failed")

    def _write(self, tables: list[pa.Table], rows: int, batches: list[tuple[str, int]] | None = None) -> None:
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.out_dir / f"served-{stamp}-{os.getpid()}-{self._seq:06d}.parquet"
        schema = self.schema.with_metadata({**self.schema.metadata, **wal_metadata(batches or [])})
        try:
            with AtomicParquetWriter(path, schema, row_group_size=max(rows, 1)) as w:
                w.write(pa.concat_tables(tables))
            self.files.append(path)
            self.written_rows += rows
            if self.wal is not None and batches:
                self.wal.written(batches)  # their segment may go
            if self._on_written:
                self._on_written(rows)
        except Exception:  # disk trouble costs log rows, never requests
            # the batches stay in their write-ahead segment: the next start recovers them
            log.exception("served log: writing %s failed; %d rows not in a file (kept in the "
                          "write-ahead segment for recovery at the next start)", path, rows)
            self._count_dropped(rows)
        finally:
            with self._lock:
                self._pending -= rows

    def _write_recovered(self, table: pa.Table, meta: dict[bytes, bytes], stem: str) -> None:
        schema = table.schema.with_metadata({**(table.schema.metadata or {}), **meta})
        with AtomicParquetWriter(self.out_dir / f"{stem}.parquet", schema,
                                 row_group_size=max(table.num_rows, 1)) as w:
            w.write(table)

    def _count_dropped(self, n: int) -> None:
        with self._lock:
            self.dropped_rows += n
        if self._on_dropped:
            self._on_dropped(n)


class WriterPriority:
    """The writer thread's CPU priority: idle while it keeps up, nice 10 when it falls behind.

    On 2 cores the model's forward runs one OpenMP thread per core, and its parallel regions
    end in barriers: whenever another thread takes one core, the forward stops on both.
    A flush encodes thousands of rows (zstd, ~0.1 s of CPU); even at nice 10 that showed up
    as a +20-40% slower forward for the ~0.5 s it took (the bench's p99). Linux's
    ``SCHED_IDLE`` runs the writer only on a core nothing else wants -- the gaps between
    batches and the forward's serial stretches -- which under the bench's load still wrote
    every row. Should the queue fill past half its bound anyway (a saturated CPU never
    idles), the submitting thread moves the writer to the normal policy at nice 10 until it
    is down to a quarter, so rows are not dropped to spare latency (measured: 3 clients
    saturating the bench machine for 24 s, 0 rows dropped). Where a policy cannot be set (not
    Linux, not permitted), the thread keeps what it has and says so once.
    """

    def __init__(self, max_queue_rows: int) -> None:
        self.high, self.low = max_queue_rows // 2, max_queue_rows // 4
        self.tid = threading.get_native_id()  # created on the writer thread: its id
        self.idle = False
        self.switching = True  # False once the OS refused: the thread keeps what it has
        self._lock = threading.Lock()
        if not self._set(idle=True):
            with contextlib.suppress(AttributeError, OSError):  # no SCHED_IDLE: at least nice 10
                os.setpriority(os.PRIO_PROCESS, self.tid, WRITER_NICE)

    def update(self, pending_rows: int) -> None:
        """Switches policy on the queue's fill (hysteresis between a quarter and a half).

        Called by the submitting thread (a writer starved at ``SCHED_IDLE`` never runs to
        raise itself) and by the writer (which, once raised, lowers itself when caught up).
        """
        with self._lock:
            if self.switching and self.idle and pending_rows > self.high:
                self._set(idle=False)
            elif self.switching and not self.idle and pending_rows < self.low:
                self._set(idle=True)

    def _set(self, idle: bool) -> bool:
        try:
            if idle:
                os.sched_setscheduler(self.tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.sched_setscheduler(self.tid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, self.tid, WRITER_NICE)  # Linux: a thread's own nice
        except (AttributeError, OSError) as e:
            log.info("served log: writer thread priority left as it is (%s)", e)
            self.switching = False
            return False
        self.idle = idle
        return True


def read_served_log(path: str | Path) -> pa.Table:
    """All rows of a served-log folder (or one file), in file order; a folder's subfolders too
    (the shipped log: one per server, :mod:`transact.serving.shipping`)."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.rglob("served-*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no served-*.parquet files")
    return pa.concat_tables([pq.read_table(f) for f in files])


#: :func:`label_index` of a served row whose (request_id, position) has no label row (yet)
UNLABELLED = -1
#: :func:`label_index` of a later served copy of a (request_id, position) served more than once
REPEATED = -2


def label_index(served: pa.Table, requests: pa.Table) -> np.ndarray:
    """The join of served rows with their labels: int64 [served rows], for each served row the
    row of ``requests`` holding its labels, :data:`UNLABELLED` or :data:`REPEATED`.

    The rule (the training rows of :func:`attach_labels` and the monitor's calibration,
    :mod:`transact.monitoring.calibration`, both read it here): a served row and a label row
    match on (``request_id``, ``position``); a key served more than once (a retried request)
    is labelled on its first served copy only (earliest ``served_ts``; equal times: by
    model_version, then score -- never by file or row order); ``user_id`` and ``item_id``
    must agree between the matched rows (SchemaError otherwise), and one key has at most one
    label row (SchemaError otherwise).
    """
    for c in ("request_id", "position", "user_id", "item_id", *LABEL_COLUMNS):
        if c not in requests.column_names:
            raise SchemaError(f"requests: missing column '{c}'")
    n_s, n_r = served.num_rows, requests.num_rows
    pairs = np.empty(n_s + n_r, dtype=[("r", "<i8"), ("p", "<i8")])
    pairs["r"][:n_s] = served.column("request_id").to_numpy()
    pairs["p"][:n_s] = served.column("position").to_numpy()
    pairs["r"][n_s:] = requests.column("request_id").to_numpy()
    pairs["p"][n_s:] = requests.column("position").to_numpy()
    uniq, inv = np.unique(pairs, return_inverse=True)  # dense id of each (request_id, position)
    inv = inv.reshape(-1)
    s_key, r_key = inv[:n_s], inv[n_s:]
    if len(np.unique(r_key)) != n_r:
        raise SchemaError("requests: a (request_id, position) pair has more than one label row")
    label_row = np.full(len(uniq), UNLABELLED, np.int64)
    label_row[r_key] = np.arange(n_r)
    # The first served copy of each key: earliest served_ts, ties by model_version and
    # score -- a choice by content, never by file or row order (recovered files included).
    version = served.column("model_version").to_numpy(zero_copy_only=False).astype(str)
    order = np.lexsort((served.column("score").to_numpy(), version,
                        served.column("served_ts").to_numpy(), s_key))
    first = order[np.concatenate([[True], s_key[order][1:] != s_key[order][:-1]])] if n_s else order
    index = np.full(n_s, REPEATED, np.int64)
    index[first] = label_row[s_key[first]]
    joined = np.flatnonzero(index >= 0)
    for c in ("user_id", "item_id"):
        a = served.column(c).to_numpy()[joined]
        b = requests.column(c).to_numpy()[index[joined]]
        bad = np.flatnonzero(a != b)
        if len(bad):
            rid = int(served.column("request_id")[int(joined[bad[0]])].as_py())
            raise SchemaError(f"labels: {len(bad)} rows disagree on {c} between the served log and "
                              f"the requests (e.g. request_id {rid})")
    return index


def attach_labels(served: pa.Table, requests: pa.Table, cfg: FeatureConfig | None = None) -> pa.Table:
    """Training rows (:func:`nn_rows_schema`) from served rows plus labelled requests.

    Args:
        served: served-log rows (:func:`served_log_schema`).
        requests: labelled (request_id, position) rows with ``label_*`` columns, e.g. a
            world's ``requests`` table; extra rows (never served) are ignored.
        cfg: feature contract (default: the one stored in the served log's schema).

    Rows are joined by :func:`label_index` (on request_id, position); a served row without a
    label row is left out (its outcome is unknown yet). When one (request_id, position) was
    served more than once (a retried request), the first served row is kept (earliest
    ``served_ts``; equal times: by model_version, then score -- never by file order).
    ``user_id`` and ``item_id`` must agree between the two tables (SchemaError otherwise).
    Output is sorted by (ts, request_id, position), like the offline logging step.
    """
    if cfg is None:
        meta = (served.schema.metadata or {}).get(b"feature_config")
        if meta is None:
            raise SchemaError("served log has no feature_config metadata; pass cfg")
        cfg = FeatureConfig.from_dict(json.loads(meta))
    index = label_index(served, requests)
    s_rows = np.flatnonzero(index >= 0)
    out = served.take(pa.array(s_rows))
    lab = requests.take(pa.array(index[s_rows]))
    schema = nn_rows_schema(cfg)
    cols = []
    for f in schema:
        col = lab.column(f.name) if f.name in LABEL_COLUMNS else out.column(f.name)
        cols.append(col.cast(f.type))
    table = pa.Table.from_arrays(cols, schema=schema)
    return table.sort_by([("ts", "ascending"), ("request_id", "ascending"), ("position", "ascending")])
