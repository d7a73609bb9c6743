"""Parquet I/O shared by every step: streamed, atomic writes and schema-checked reads.

Writers stream row groups so memory stays bounded, write to ``<path>.tmp-<pid>`` and
rename on success: a crashed or interrupted step never leaves a half-written table
that a later step could mistake for a complete one.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

#: ``<name>.tmp-<pid>``: a file being written by process ``pid``.
TMP_SUFFIX = re.compile(r"\.tmp-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this host: a writer on another host sharing
    the folder would look dead). A zombie -- exited, not yet reaped by its parent -- is dead:
    it will never write again, and a killed server's worker can stay one for seconds."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # Linux: the state is the field after the parenthesised command name
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def clean_stale_tmp(folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Removes ``<prefix>*.tmp-<pid>`` files in ``folder`` whose writer is dead (a kill
    skips every cleanup; nothing else would ever remove them)."""
    folder, removed = Path(folder), []
    for p in folder.glob(f"{glob_escape(prefix)}*.tmp-*") if folder.is_dir() else ():
        m = TMP_SUFFIX.search(p.name)
        if m and p.is_file() and not pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


class SchemaError(ValueError):
    """A table does not match the schema it must follow; the message names the column."""


class AtomicParquetWriter:
    """Streams record batches into one parquet file, published atomically on close.

    Use as a context manager; on an exception the temporary file is removed and the
    destination is left untouched.

    ``use_dictionary`` defaults to every column except fixed-size binary and fixed-size
    list ones: those hold per-row blocks (a row's S_all tokens, KBs of packed bytes) that
    never repeat, and trying a dictionary on them cost ~20% of a write's CPU for nothing.
    The same blocks get no min/max statistics: no reader prunes row groups by the bytes of
    an embedding, and comparing 6 KiB values row by row cost ~10% of an NN-row write.
    (pyarrow matches both settings' names against leaf paths, ``x.list.element`` for a list
    column: nested columns of any kind get neither; the scalar columns get both.)
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, compression: str = "zstd",
                 row_group_size: int = 65_536, use_dictionary: bool | list[str] | None = None) -> None:
        if use_dictionary is None:
            use_dictionary = dictionary_columns(schema)
        self.path = Path(path)
        self.schema = schema
        self.row_group_size = row_group_size
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(self.path.parent, prefix=self.path.name)  # left by killed writers
        self._tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._writer = pq.ParquetWriter(self._tmp, schema, compression=compression, use_dictionary=use_dictionary,
                                        write_statistics=dictionary_columns(schema))

    def write(self, data: pa.Table | pa.RecordBatch | dict) -> None:
        if isinstance(data, dict):
            data = pa.table(data, schema=self.schema)
        elif isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if not data.schema.equals(self.schema, check_metadata=False):
            data = conform(data, self.schema, what=str(self.path.name))
        if data.num_rows:
            self._writer.write_table(data, row_group_size=self.row_group_size)
            self.rows += data.num_rows

    def close(self) -> Path:
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth a dictionary and min/max statistics: all but fixed-size binary /
    fixed-size list ones (per-row blocks)."""
    return [f.name for f in schema
            if not (pa.types.is_fixed_size_binary(f.type) or pa.types.is_fixed_size_list(f.type))]


def write_table(path: str | os.PathLike, table: pa.Table, schema: pa.Schema | None = None) -> Path:
    """Writes a whole table atomically (see :class:`AtomicParquetWriter`)."""
    schema = schema or table.schema
    with AtomicParquetWriter(path, schema) as w:
        w.write(table)
    return Path(path)


def conform(table: pa.Table, schema: pa.Schema, what: str = "table") -> pa.Table:
    """Returns ``table`` with exactly ``schema``'s columns and types.

    Extra columns are dropped. Missing columns and types that cannot be cast safely
    raise :class:`SchemaError` naming the column, the expected and the found type.
    """
    cols = []
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(
                f"{what}: missing column '{field.name}' (expected {field.type}); "
                f"found columns: {', '.join(table.column_names) or 'none'}"
            )
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaError(
                    f"{what}: column '{field.name}' has type {col.type}, expected {field.type} ({e})"
                ) from None
        if not field.nullable and col.null_count:
            raise SchemaError(f"{what}: column '{field.name}' has {col.null_count} null values")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def read_table(path: str | os.PathLike, schema: pa.Schema, columns: Iterable[str] | None = None,
               what: str | None = None) -> pa.Table:
    """Reads a parquet file (or directory of parts) and conforms it to ``schema``; with
    ``columns``, only those columns are read and checked (the items' fp16 embeddings, which
    no feature reads, were 80% of reading a world's items table)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what or path.name}: no such file {path}")
    if columns is not None:
        columns = list(columns)
        schema = pa.schema([schema.field(c) for c in columns])
        try:
            table = pq.read_table(path, columns=columns)
        except pa.ArrowInvalid:  # a column is missing: read all, so conform names it as always
            table = pq.read_table(path)
    else:
        table = pq.read_table(path)
    return conform(table, schema, what=what or path.name)


def table_path(root: str | os.PathLike, name: str) -> Path:
    """``<root>/<name>.parquet``: where a world's table lives."""
    return Path(root) / f"{name}.parquet"
