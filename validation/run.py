"""Validating a batch, table by table: :func:`validate_world` (a world folder: items,
actions, impressions, requests) and :func:`validate_rows` (a file of logged NN-feature
rows). Each reads its tables, derives their frames, runs their suites through GX, then
leaves the decision to :func:`~transact.validation.decide.decide` (which also has the
batch's GX Data Docs built from the same GX context)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from transact.data.io import table_path
from transact.validation.batch import _manifest_failures, open_batch
from transact.validation.decide import _parquet_rows, decide
from transact.validation.derive import derive_frame
from transact.validation.gx import _GX, _validate_frame
from transact.validation.params import (
    DEFAULT_MAX_DUPLICATE_RATE,
    ROWS_TABLE,
    WORLD_TABLES,
    Tolerance,
)
from transact.validation.results import Failure, ValidationResult
from transact.validation.suites import build_checks


def validate_world(world_dir: str | os.PathLike, quarantine_dir: str | os.PathLike,
                   reference: str | os.PathLike | dict | None = None, now: Any = None, *,
                   reference_out: str | os.PathLike | None = None, update_reference: bool = True,
                   max_candidates: int | None = None,
                   max_duplicate_rate: float = DEFAULT_MAX_DUPLICATE_RATE,
                   min_ts: int | None = None, tolerance: Tolerance | None = None,
                   label_window_ms: int | None = None) -> ValidationResult:
    """Validates the four tables of a world folder and decides.

    Args:
        world_dir: the batch (a world folder); its name is the batch name.
        quarantine_dir: where a failed batch is moved (``<batch>-<UTC stamp>/``).
        reference: the previous accepted batch's profile (a JSON path or a dict); None
            skips the distribution checks. A path that does not exist yet is the first
            batch: no distribution checks, and the profile is written there on pass.
        now: "the future" starts here (see :func:`now_ms`); default: the wall clock.
        reference_out: where a passing batch writes its profile as the new reference
            (default: the ``reference`` path when one was given). The profile is always
            also written to ``<world>/validation_profile.json``.
        update_reference: False never writes ``reference_out``.
        max_candidates: rows per request allowed; default ``chunk_size`` from
            ``world.json``, else :data:`DEFAULT_MAX_CANDIDATES`.
        max_duplicate_rate: share of duplicated events allowed per event table.
        min_ts: lower bound of every ``ts`` (epoch ms); default ``min_ts`` from
            ``world.json``, else :data:`MIN_TS_MS` (2010-01-01).
        tolerance: bands of the distribution checks.
        label_window_ms: how long after its request a label's engagement may be logged;
            default ``label_window_ms`` from ``world.json``, else one hour.

    Returns:
        A :class:`ValidationResult`; on fail the batch is no longer at ``world_dir``
        but at ``result.quarantine``. Reports: ``validation_report.md``,
        ``validation_results.json`` (GX results) and the GX Data Docs site
        ``data_docs/index.html`` (``result.data_docs``) in the batch's folder (wherever it is).
    """
    b = open_batch("world", world_dir, quarantine_dir, reference, now, reference_out, update_reference,
                   max_candidates=max_candidates, max_duplicate_rate=max_duplicate_rate, min_ts=min_ts,
                   tolerance=tolerance, label_window_ms=label_window_ms)
    world, params, ref = b.path, b.params, b.reference

    failures: list[Failure] = []
    rows_in: dict[str, int | None] = {}
    tables: dict[str, pa.Table] = {}
    timings = {"read": 0.0, "derive": 0.0, "gx": 0.0}
    t = time.perf_counter()
    for name in WORLD_TABLES:
        path = table_path(world, name)
        if not path.exists():
            rows_in[name] = 0
            failures.append(Failure(f"world: {name} table is present", name, "table present",
                                    {"path": str(path)}, gx=False,
                                    exception=f"no file {path.name} in the batch"))
            continue
        try:
            tables[name] = pq.read_table(path)
            rows_in[name] = tables[name].num_rows
        except Exception as e:  # noqa: BLE001 - any unreadable file fails the batch
            rows_in[name] = _parquet_rows(path)
            failures.append(Failure(f"world: {name} table is readable", name, "table readable",
                                    {"path": str(path)}, gx=False, exception=f"{type(e).__name__}: {e}"))
    assert b.manifest is not None  # a world batch has one: open_batch refuses a folder without it
    failures += _manifest_failures(world, b.manifest)

    known = None
    if "items" in tables and "item_id" in tables["items"].column_names:
        known = np.unique(tables["items"].column("item_id").drop_null().to_numpy())
    timings["read"] = time.perf_counter() - t
    gxr = _GX(b.name) if tables else None
    frames: dict[str, pd.DataFrame] = {}
    gx_results: dict[str, Any] = {}
    checks_stats: dict[str, dict[str, int]] = {}
    for name in WORLD_TABLES:
        if name not in tables:
            continue
        assert gxr is not None  # made whenever a table was read
        t = time.perf_counter()
        df = derive_frame(name, tables[name], known, others=tables, params=params)
        frames[name] = df
        timings["derive"] += time.perf_counter() - t
        t = time.perf_counter()
        checks = build_checks(name, params, ref, len(df), with_items=known is not None)
        vr, fails, stats = _validate_frame(gxr, name, df, checks)
        failures += fails
        gx_results[name] = vr.to_json_dict()
        checks_stats[name] = stats
        timings["gx"] += time.perf_counter() - t
    return decide(b, failures, checks_stats, frames, gx_results, rows_in, timings=timings,
                  docs=gxr.build_docs if gxr else None)


def _rows_config(pf: pq.ParquetFile, cfg):
    from transact.features.config import FeatureConfig

    if cfg is not None:
        return cfg, None
    meta = pf.schema_arrow.metadata or {}
    raw = meta.get(b"feature_config")
    if raw is None:
        return FeatureConfig(), "the row file has no feature_config metadata: checked against the default FeatureConfig"
    return FeatureConfig.from_dict(json.loads(raw)), None


def validate_rows(rows_path: str | os.PathLike, quarantine_dir: str | os.PathLike,
                  reference: str | os.PathLike | dict | None = None, now: Any = None, *,
                  cfg=None, items: str | os.PathLike | None = None,
                  reference_out: str | os.PathLike | None = None, update_reference: bool = True,
                  min_ts: int | None = None, tolerance: Tolerance | None = None) -> ValidationResult:
    """Validates a file of logged NN-feature rows (:func:`~transact.features.nn_features.nn_rows_schema`).

    Checks ids, labels, surfaces, timestamps, the widths of the token blocks, segment
    lengths within their sizes (``seg_len``), padding (padding slots: emb 0, action 0,
    surface 0, age -1; valid slots: age >= 0, a known action and surface), int8 range,
    and label rates against ``reference["nn_rows"]``. ``cfg`` defaults to the file's
    ``feature_config`` metadata. ``items``: a world folder or items parquet, to check that
    candidates are known items (optional). On fail the row file (and its ``<stem>.json``
    summary) moves to ``quarantine_dir/<stem>-<UTC stamp>/``; on pass the reports are
    written beside it as ``<stem>.validation_report.md`` etc. (the Data Docs site:
    ``<stem>.data_docs/index.html``).
    """
    b = open_batch("rows", rows_path, quarantine_dir, reference, now, reference_out, update_reference,
                   min_ts=min_ts, tolerance=tolerance)
    path, params, ref = b.path, b.params, b.reference
    failures: list[Failure] = []
    notes: list[str] = []
    known = None
    if items is not None:
        ip = Path(items)
        ip = table_path(ip, "items") if ip.is_dir() else ip
        known = np.unique(pq.read_table(ip, columns=["item_id"]).column("item_id").drop_null().to_numpy())
    frames, gx_results, checks_stats = {}, {}, {}
    gxr = None
    try:
        pf = pq.ParquetFile(path)
        table = pf.read()
        n_in: int | None = table.num_rows
    except Exception as e:  # noqa: BLE001
        table, n_in = None, _parquet_rows(path)
        failures.append(Failure(f"{ROWS_TABLE}: file is readable", ROWS_TABLE, "table readable",
                                {"path": str(path)}, gx=False, exception=f"{type(e).__name__}: {e}"))
    if table is not None:
        cfg, note = _rows_config(pf, cfg)
        if note:
            notes.append(note)
        df = derive_frame(ROWS_TABLE, table, known, cfg)
        frames[ROWS_TABLE] = df
        checks = build_checks(ROWS_TABLE, params, ref, len(df), cfg, with_items=known is not None)
        gxr = _GX(b.name)
        vr, fails, stats = _validate_frame(gxr, ROWS_TABLE, df, checks)
        failures += fails
        gx_results[ROWS_TABLE] = vr.to_json_dict()
        checks_stats[ROWS_TABLE] = stats
    return decide(b, failures, checks_stats, frames, gx_results, {ROWS_TABLE: n_in}, notes=notes,
                  docs=gxr.build_docs if gxr else None)
