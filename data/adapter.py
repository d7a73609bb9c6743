"""Adapter for a team's own logs in the generic event schema.

A source folder holds one file per table, ``<table>.parquet`` or ``<table>.csv``:

| table       | columns                                                                    |
|-------------|----------------------------------------------------------------------------|
| items       | item_id int; emb: 32 floats (a list column, or columns emb_0..emb_31); optional topic |
| actions     | user_id, item_id, ts, action, surface                                      |
| impressions | user_id, item_id, ts, surface, request_id, position                        |
| requests    | request_id, user_id, item_id, ts, surface, position, label_click, label_repin, label_hide, label_closeup |

- ids (``user_id``, ``item_id``, ``request_id``): non-negative int64, or strings of digits.
- ``ts``: int milliseconds since the epoch, or a timestamp column (converted to ms UTC,
  time zones included); no event may be older than ``min_ts`` (default 2010-01-01).
- ``emb``: fp32 or fp16; stored as fp16, and the int8 codes ``emb_q`` are quantised
  from the stored fp16 values (an ``emb_q`` column in the source is ignored), so
  validation re-derives exactly the same codes.
- ``action``: the multi-hot bitmask of :data:`transact.data.schema.ACTIONS`, or names
  joined by ``|`` (``"closeup|repin"``).
- ``surface``: an index into :data:`~transact.data.schema.SURFACES`, or its name.

:func:`import_logs` checks everything and writes the canonical world folder
(the tables every step reads plus ``world.json``); any problem raises
:class:`~transact.data.io.SchemaError` naming the table and the column, and nothing
is written unless every table is valid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from transact.data import schema as S
from transact.data.io import SchemaError, conform, table_path, write_table
from transact.data.quantization import SCALE, quantize
from transact.data.times import iso_utc
from transact.data.world import publishing, write_world_json

FP16_MAX: float = float(np.finfo(np.float16).max)


def _read_source(src: Path, name: str) -> pa.Table:
    for ext, reader in ((".parquet", pq.read_table), (".csv", pcsv.read_csv)):
        path = src / f"{name}{ext}"
        if path.exists():
            return reader(path)
    raise SchemaError(f"{name}: no {name}.parquet or {name}.csv in {src}")


def _require(t: pa.Table, name: str, cols) -> None:
    missing = [c for c in cols if c not in t.column_names]
    if missing:
        raise SchemaError(f"{name}: missing column(s) {', '.join(missing)}; "
                          f"found: {', '.join(t.column_names)}")


def _ts_ms(t: pa.Table, name: str) -> pa.Table:
    col = t.column("ts")
    if pa.types.is_timestamp(col.type):
        col = pc.cast(pc.cast(col, pa.timestamp("ms", tz=col.type.tz)), pa.int64())
    elif not pa.types.is_integer(col.type):
        raise SchemaError(f"{name}: column 'ts' has type {col.type}, expected int milliseconds or a timestamp")
    return t.set_column(t.column_names.index("ts"), "ts", col)


def _int_ids(t: pa.Table, name: str, column: str) -> pa.Table:
    """Ids as int64: integer columns as they are, strings of digits parsed; anything else
    is an error that names the column and the fix."""
    col = t.column(column)
    if pa.types.is_integer(col.type):
        return t
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            parsed = pc.cast(col, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            sample = next((v for v in col.to_pylist() if v is not None and not str(v).lstrip("-").isdigit()), None)
            raise SchemaError(f"{name}: column '{column}' holds strings that are not integers (e.g. {sample!r}); "
                              f"ids must be int64: map them to integers (a dictionary or a stable 63-bit "
                              f"hash) before import") from None
        return t.set_column(t.column_names.index(column), column, parsed)
    raise SchemaError(f"{name}: column '{column}' has type {col.type}, expected int64 ids")


def _check_min_ts(t: pa.Table, name: str, min_ts: int) -> None:
    v = t.column("ts").to_numpy()
    old = np.flatnonzero(v < min_ts)
    if len(old):
        raise SchemaError(f"{name}: column 'ts' has {len(old)} values before min_ts {min_ts} "
                          f"({iso_utc(min_ts)}), e.g. row {old[0]} = {v[old[0]]} ({iso_utc(int(v[old[0]]))}); "
                          f"pass --min-ts with the start of your logs if they are this old, else "
                          f"check the unit (ts must be milliseconds)")


def _names_to_codes(t: pa.Table, name: str, column: str, vocab: tuple[str, ...], multi: bool) -> pa.Table:
    col = t.column(column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return t
    values = col.to_pylist()
    out = np.zeros(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        parts = (v or "").split("|") if multi else [v]
        for p in parts:
            if p not in vocab:
                raise SchemaError(f"{name}: column '{column}' row {i} has unknown value {p!r}; "
                                  f"allowed: {', '.join(vocab)}")
            out[i] |= (1 << vocab.index(p)) if multi else vocab.index(p)
    return t.set_column(t.column_names.index(column), column, pa.array(out))


def _check_range(t: pa.Table, name: str, column: str, lo: int, hi: int) -> None:
    v = t.column(column).to_numpy()
    bad = np.flatnonzero((v < lo) | (v > hi))
    if len(bad):
        raise SchemaError(f"{name}: column '{column}' has {len(bad)} values outside [{lo}, {hi}], "
                          f"e.g. row {bad[0]} = {v[bad[0]]}")


def _items(t: pa.Table) -> pa.Table:
    _require(t, "items", ["item_id"])
    t = _int_ids(t, "items", "item_id")
    _check_range(t, "items", "item_id", 0, np.iinfo(np.int64).max)
    if "emb" in t.column_names:
        col = t.column("emb").combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type)
                or pa.types.is_large_list(col.type)):
            raise SchemaError(f"items: column 'emb' has type {col.type}, expected a list of {S.EMB_DIM} floats")
        widths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(widths) and (widths != S.EMB_DIM).any():
            bad = int(np.flatnonzero(widths != S.EMB_DIM)[0])
            raise SchemaError(f"items: column 'emb' must have width {S.EMB_DIM}; row {bad} has width {widths[bad]}")
        emb = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, S.EMB_DIM)
    else:
        cols = [f"emb_{i}" for i in range(S.EMB_DIM)]
        if not any(c in t.column_names for c in cols):
            raise SchemaError(f"items: missing column 'emb' (a list of {S.EMB_DIM} floats, or emb_0..emb_{S.EMB_DIM - 1})")
        _require(t, "items", cols)
        emb = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in cols], 1).astype(np.float32)
    if not np.isfinite(emb).all():
        raise SchemaError(f"items: column 'emb' has non-finite values in {int((~np.isfinite(emb)).any(1).sum())} rows")
    too_big = np.abs(emb) > FP16_MAX
    if too_big.any():
        raise SchemaError(f"items: column 'emb' has values beyond ±{FP16_MAX:.0f} (the fp16 range) in "
                          f"{int(too_big.any(1).sum())} rows, e.g. row {int(np.flatnonzero(too_big.any(1))[0])}; "
                          f"scale the embeddings (|e| <= {SCALE} quantises without saturating)")
    # The stored fp16 values are the one source of truth: the int8 codes are quantised
    # from them (not from the fp32 input), so every later reader that re-quantises the
    # stored embedding -- validation, a re-import -- finds the same codes.
    emb16 = emb.astype(np.float16)  # [I, D]
    q = quantize(emb16)  # [I, D] int8
    topic = t.column("topic") if "topic" in t.column_names else pa.array(np.full(len(emb), -1), pa.int32())
    return conform(pa.table({
        "item_id": t.column("item_id"), "topic": topic,
        "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb16.ravel()), S.EMB_DIM),
        "emb_q": pa.FixedSizeListArray.from_arrays(pa.array(q.ravel()), S.EMB_DIM),
    }), S.ITEMS, "items")


def _events(t: pa.Table, name: str, min_ts: int = S.DEFAULT_MIN_TS_MS) -> pa.Table:
    schema = S.TABLES[name]
    _require(t, name, schema.names)
    for c in ("user_id", "item_id", "request_id"):
        if c in schema.names:
            t = _int_ids(t, name, c)
    t = _ts_ms(t, name)
    _check_min_ts(t, name, min_ts)
    t = _names_to_codes(t, name, "surface", S.SURFACES, multi=False)
    _check_range(t, name, "surface", 0, len(S.SURFACES) - 1)
    if name == "actions":
        t = _names_to_codes(t, name, "action", S.ACTIONS, multi=True)
        _check_range(t, name, "action", 1, S.EXPLICIT_MASK)
    for c in S.LABEL_COLUMNS if name == "requests" else ():
        _check_range(t, name, c, 0, 1)
    for c in ("user_id", "item_id", "request_id"):
        if c in schema.names:
            _check_range(t, name, c, 0, np.iinfo(np.int64).max)
    return conform(t, schema, name)


def import_logs(src: str | Path, out: str | Path, eval_fraction: float = 0.2,
                min_ts: int | None = None, label_window_ms: int | None = None) -> dict:
    """Validates a source folder of logs and writes the canonical world folder ``out``.

    ``min_ts`` (epoch ms): no event may be older; ``label_window_ms``: how long after a
    request its labelled engagement may be logged. Both are recorded in ``world.json``,
    where validation reads them. When not given, they come from a ``world.json`` in the
    source (a world exported by this system declares how its labels were made -- a retrain
    re-imports one), else the defaults (2010-01-01, one hour).
    """
    from transact.data.requests import sorted_requests
    from transact.data.world import read_world_json

    declared = read_world_json(src)
    if min_ts is None:
        min_ts = int(declared.get("min_ts", S.DEFAULT_MIN_TS_MS))
    if label_window_ms is None:
        label_window_ms = int(declared.get("label_window_ms", S.DEFAULT_LABEL_WINDOW_MS))
    if not 0 < eval_fraction < 1:
        raise SchemaError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if label_window_ms <= 0:
        raise SchemaError(f"label_window_ms must be > 0, got {label_window_ms}")
    src, out = Path(src), Path(out)
    tables = {"items": _items(_read_source(src, "items"))}
    for name in ("actions", "impressions", "requests"):
        tables[name] = _events(_read_source(src, name), name, int(min_ts))
    sorted_requests(tables["requests"])  # one user and one ts per request
    known = tables["items"].column("item_id")
    for name in ("actions", "impressions", "requests"):
        unknown = pc.invert(pc.is_in(tables[name].column("item_id"), value_set=known))
        n = pc.sum(unknown).as_py() or 0
        if n:
            raise SchemaError(f"{name}: {n} rows reference item_id values missing from items")
    req_ts = tables["requests"].column("ts").to_numpy()
    summary = {
        "source": str(src),
        "rows": {n: t.num_rows for n, t in tables.items()},
        "train_end_ts": int(np.quantile(req_ts, 1 - eval_fraction)) if len(req_ts) else 0,
        "min_ts": int(min_ts),
        "label_window_ms": int(label_window_ms),
    }
    with publishing(out) as stage:  # the world and its manifest are swapped in as one unit
        for name, table in tables.items():
            write_table(table_path(stage, name), table, S.TABLES[name])
        write_world_json(stage, summary, indent=2)
    return summary
