"""Stable hash partitions of a table, and a folder of parts published as one unit.

What a scale-out step needs from storage, free of any scheduler:

- :func:`partition_of`: part of each id, ``splitmix64(id) mod n`` -- the same on every
  machine, process and Python (never the salted built-in ``hash``);
- :func:`row_group_chunks`: a parquet file cut into runs of whole row groups, so a reader
  holds one run, never the file;
- :func:`write_buckets` / :func:`read_bucket`: a shuffle through files. A map task writes
  its rows of part ``p`` to ``<folder>/<table>/p<p>/<chunk>.parquet``; the task of part
  ``p`` reads that folder alone (a dataset scan of only its files);
- :func:`publishing_folder`: parts are written into ``.<name>.staging-<pid>`` beside the
  target and the folder is swapped in whole at the end (as worlds are: :mod:`transact.data.world`).

Every location may be a local path or an object-store URI (:mod:`transact.data.storage`): a
task reads the row groups of an object where it lies and writes its shuffle files as whole
objects, so Ray workers share a bucket instead of a volume.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transact.data import storage
from transact.data.io import write_table

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def stable_hash(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of int64 ids (uint64 [n]); ``stable_hash([0])[0] == 0xE220A8397B1DCDAF``."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def partition_of(ids: np.ndarray, n: int) -> np.ndarray:
    """int64 [len(ids)]: the part in [0, n) of each id."""
    if n < 1:
        raise ValueError(f"partitions must be >= 1, got {n}")
    return (stable_hash(ids) % np.uint64(n)).astype(np.int64)


@contextlib.contextmanager
def _parquet_file(location: str | os.PathLike) -> Iterator[pq.ParquetFile]:
    """A parquet file at a local path or a URI (its footer read; row groups on demand), closed after."""
    fs, path = storage.arrow_fs(location)
    with fs.open_input_file(path) as f:
        yield pq.ParquetFile(f)


def row_group_chunks(path: str | os.PathLike, max_rows: int) -> list[list[int]]:
    """Row-group indices of a parquet file in runs of at most ``max_rows`` rows (a run
    holds at least one group, however large); one empty run for a file without groups."""
    with _parquet_file(path) as pf:
        md = pf.metadata
    runs: list[list[int]] = [[]]
    rows = 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if runs[-1] and rows + n > max_rows:
            runs.append([])
            rows = 0
        runs[-1].append(g)
        rows += n
    return runs


def read_row_groups(path: str | os.PathLike, groups: list[int]) -> pa.Table:
    with _parquet_file(path) as pf:
        return pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()


def write_buckets(table: pa.Table, key: str, n: int, folder: str | os.PathLike, name: str) -> dict[int, int]:
    """Writes the rows of each part of ``table[key]`` to ``<folder>/p<part>/<name>.parquet``
    (only non-empty parts, each file atomically: a rename locally, one whole object in a
    bucket); returns {part: rows}."""
    part = partition_of(table.column(key).to_numpy(), n)
    order = np.argsort(part, kind="stable")  # row order inside a part is kept
    sorted_part = part[order]
    table = table.take(pa.array(order))
    bounds = np.searchsorted(sorted_part, np.arange(n + 1))
    written = {}
    for p in range(n):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        if hi > lo:
            write_parquet(storage.join(bucket_dir(folder, p), f"{name}.parquet"), table.slice(lo, hi - lo))
            written[p] = hi - lo
    return written


def write_parquet(location: str, table: pa.Table) -> None:
    """``table`` as one parquet file at a local path or a URI, whole or not at all (a bucket's
    object is written from a local temporary file in one upload)."""
    if not storage.is_remote(location):
        write_table(location, table)
        return
    with tempfile.TemporaryDirectory(prefix="transact-part-") as tmp:
        write_table(Path(tmp) / "part.parquet", table)
        storage.put_file(Path(tmp) / "part.parquet", location)


def read_parquet(location: str | os.PathLike) -> pa.Table:
    fs, path = storage.arrow_fs(location)
    return pq.read_table(path, filesystem=fs)


def bucket_dir(folder: str | os.PathLike, part: int) -> str:
    return storage.join(folder, f"p{part:05d}")


def read_bucket(folder: str | os.PathLike, part: int, schema: pa.Schema) -> pa.Table:
    """All rows the map tasks wrote for ``part`` (an empty ``schema`` table when none),
    in file-name order."""
    d = bucket_dir(folder, part)
    files = [storage.join(d, n) for n in storage.listdir(d) if n.endswith(".parquet") and not n.startswith(".")]
    if not files:
        return schema.empty_table()
    return pa.concat_tables([read_parquet(f) for f in files], promote_options="permissive")


def filter_in(path: str | os.PathLike, column: str, values: np.ndarray) -> pa.Table:
    """Rows of a parquet file whose ``column`` is in ``values``, scanned batch by batch (a
    reader holds the matches and one batch, never the file)."""
    import pyarrow.dataset as ds

    fs, where = storage.arrow_fs(path)
    wanted = pa.array(np.unique(np.asarray(values)))
    return ds.dataset(where, format="parquet", filesystem=fs).to_table(filter=pc.field(column).isin(wanted))


@contextlib.contextmanager
def publishing_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging folder beside ``target``; on success it replaces ``target``
    whole (aside, rename, remove the old one), on an error it is removed and ``target``
    is left as it was. Folders of dead writers beside ``target`` are removed first."""
    from transact.data.world import _aside, clean_stale, swap_in

    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    staging = _aside(target, "staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, target)
