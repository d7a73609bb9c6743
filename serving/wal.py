"""Write-ahead segments of the served log: what the service answered survives a crash.

The served log is training data and the monitor's input, so a killed server must not
take it along. Every served batch is appended -- on the model thread, *before* its
responses go out -- to the current segment ``<log_dir>/wal/seg-<pid>-<n>.arrows`` (an
Arrow IPC stream of the batch's rows in the served-log schema, uncompressed: a memcpy
and one ``write``). The background writer turns batches into parquet files as before;
each file records in its schema metadata (``wal``) which batches of which segment it
holds. A segment is deleted once it is closed and each of its batches is in a file.

Recovery (:func:`recover`, run when a writer starts): segments of processes that are no
longer alive are read back; their batches that no parquet file holds are written to one
``served-recovered-*.parquet`` (same metadata), then the segment goes. Only a batch the
kill cut short inside its ``write`` can be lost, and that batch's requests were never
answered.

Guarantee: a process crash (SIGKILL, the OOM killer) loses no row of an answered request.
A machine crash (power loss) loses at most what was appended since the last ``fsync``,
which the writer thread does at every flush (every ``flush_s`` seconds, default 5 s).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from transact.data.io import pid_alive

log = logging.getLogger("transact.serving")

WAL_DIR = "wal"
#: parquet schema metadata key: ``{segment name: [first batch, last batch]}``
WAL_META = b"wal"
_SEGMENT = re.compile(r"^seg-(?P<pid>\d+)-(?P<n>\d+)\.arrows$")


@dataclass
class _Segment:
    name: str
    path: Path
    sink: Any = None  # pa.OSFile, set when the segment opens
    writer: Any = None  # pa.ipc.RecordBatchStreamWriter
    batches: int = 0  # appended
    rows: int = 0
    written: int = 0  # batches in parquet files
    closed: bool = False


@dataclass
class WalStats:
    segments_recovered: int = 0
    batches_recovered: int = 0
    rows_recovered: int = 0
    files: list[str] = field(default_factory=list)


class WriteAheadLog:
    """The current process's segments: :meth:`append` on the request path,
    :meth:`written` and :meth:`sync` from the parquet writer thread.

    Args:
        log_dir: the served log's folder (segments go to ``log_dir/wal``).
        schema: the served-log schema (every batch has it).
        segment_rows: a segment is closed (and a new one started) past this many rows.
    """

    def __init__(self, log_dir: str | os.PathLike, schema: pa.Schema, segment_rows: int = 8192) -> None:
        self.folder = Path(log_dir) / WAL_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.segment_rows = segment_rows
        self._lock = threading.Lock()
        self._n = 0
        self._segments: dict[str, _Segment] = {}
        self._current: _Segment | None = None

    def append(self, table: pa.Table) -> tuple[str, int]:
        """Appends one batch (durable against a process crash when it returns);
        returns (segment name, batch index)."""
        batch = table.combine_chunks().to_batches()
        rb = batch[0] if batch else pa.RecordBatch.from_pylist([], schema=self.schema)
        with self._lock:
            seg = self._current
            if seg is None or seg.rows >= self.segment_rows:
                seg = self._open()
            seg.writer.write_batch(rb)
            seg.sink.flush()
            idx = seg.batches
            seg.batches += 1
            seg.rows += rb.num_rows
            return seg.name, idx

    def written(self, batches: list[tuple[str, int]]) -> None:
        """The parquet writer wrote these batches: segments closed and complete go."""
        done = []
        with self._lock:
            for name, _ in batches:
                seg = self._segments.get(name)
                if seg is not None:
                    seg.written += 1
            for seg in list(self._segments.values()):
                if seg.closed and seg.written >= seg.batches:
                    done.append(self._segments.pop(seg.name))
        for seg in done:
            seg.path.unlink(missing_ok=True)

    def sync(self) -> None:
        """fsync of the open segment: bounds what a machine crash can take."""
        with self._lock:
            seg = self._current
            if seg is not None and seg.sink is not None and not seg.closed:
                os.fsync(seg.sink.fileno())

    def close(self) -> None:
        """Closes the open segment (deleted when its batches are written, see :meth:`written`)."""
        with self._lock:
            if self._current is not None:
                self._close(self._current)
                self._current = None
            done = [s for s in self._segments.values() if s.closed and s.written >= s.batches]
            for s in done:
                self._segments.pop(s.name)
        for s in done:
            s.path.unlink(missing_ok=True)

    def _open(self) -> _Segment:
        if self._current is not None:
            self._close(self._current)
            if self._current.written >= self._current.batches:
                self._segments.pop(self._current.name, None)
                self._current.path.unlink(missing_ok=True)
        self._n += 1
        name = f"seg-{os.getpid()}-{self._n:06d}.arrows"
        seg = _Segment(name, self.folder / name)
        seg.sink = pa.OSFile(str(seg.path), "wb")
        seg.writer = pa.ipc.new_stream(seg.sink, self.schema)
        self._segments[name] = self._current = seg
        return seg

    @staticmethod
    def _close(seg: _Segment) -> None:
        if not seg.closed:
            seg.writer.close()
            seg.sink.close()
            seg.closed = True


def wal_metadata(batches: list[tuple[str, int]]) -> dict[bytes, bytes]:
    """``{WAL_META: {segment: [first, last]}}`` of the batches one parquet file holds."""
    ranges: dict[str, list[int]] = {}
    for name, idx in batches:
        lo_hi = ranges.setdefault(name, [idx, idx])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], idx), max(lo_hi[1], idx)
    return {WAL_META: json.dumps(ranges).encode()}


def _covered(log_dir: Path, pid: int) -> dict[str, list[tuple[int, int]]]:
    """Batches of ``pid``'s segments already in parquet files of ``log_dir``."""
    out: dict[str, list[tuple[int, int]]] = {}
    for f in log_dir.glob("served-*.parquet"):
        meta = pq.read_schema(f).metadata or {}
        raw = meta.get(WAL_META)
        if raw is None:
            continue
        for name, (lo, hi) in json.loads(raw).items():
            m = _SEGMENT.match(name)
            if m and int(m["pid"]) == pid:
                out.setdefault(name, []).append((lo, hi))
    return out


def _read_segment(path: Path) -> list[pa.RecordBatch]:
    """The complete batches of a segment; a batch cut short by a kill ends the list."""
    batches: list[pa.RecordBatch] = []
    try:
        with pa.OSFile(str(path), "rb") as f:
            reader = pa.ipc.open_stream(f)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except (pa.ArrowInvalid, OSError) as e:  # a torn tail (or an empty file): what came before stays
        log.info("served log: %s ends in an incomplete batch (%s)", path.name, e)
    return batches


def recover(log_dir: str | os.PathLike,
            write: Callable[[pa.Table, dict[bytes, bytes], str], None]) -> WalStats:
    """Writes the batches of dead processes' segments that no parquet file holds, then
    removes the segments. ``write(table, metadata, stem)`` writes one parquet file."""
    log_dir = Path(log_dir)
    stats = WalStats()
    folder = log_dir / WAL_DIR
    found = [(p, m) for p in folder.glob("seg-*.arrows") if (m := _SEGMENT.match(p.name))] if folder.is_dir() else []
    by_pid: dict[int, list[Path]] = {}
    for p, m in sorted(found, key=lambda pm: pm[0]):
        pid = int(m["pid"])
        if pid != os.getpid() and not pid_alive(pid):
            by_pid.setdefault(pid, []).append(p)
    for pid, paths in by_pid.items():
        covered = _covered(log_dir, pid)
        for path in paths:
            batches = _read_segment(path)
            have = covered.get(path.name, [])
            missing = [(i, b) for i, b in enumerate(batches) if not any(lo <= i <= hi for lo, hi in have)]
            missing = [(i, b) for i, b in missing if b.num_rows]
            if missing:
                table = pa.Table.from_batches([b for _, b in missing])
                stem = f"served-recovered-{pid}-{path.stem.split('-')[-1]}"
                write(table, wal_metadata([(path.name, i) for i, _ in missing]), stem)
                stats.batches_recovered += len(missing)
                stats.rows_recovered += table.num_rows
                stats.files.append(stem)
            stats.segments_recovered += 1
            path.unlink(missing_ok=True)
    if stats.segments_recovered:
        log.warning("served log: recovered %d rows (%d batches) from %d segment(s) of stopped processes",
                    stats.rows_recovered, stats.batches_recovered, stats.segments_recovered)
    return stats
