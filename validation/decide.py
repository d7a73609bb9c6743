"""The one decision for a whole batch (:func:`decide`, shared by ``validate_world`` and
``validate_rows``): pass -- its profile becomes the new reference and the reports go
beside it; fail -- it is quarantined whole, reports first and move last, so a kill at
any point leaves the batch at its place or in quarantine, always with its reasons.
Rows are never dropped one by one: per table ``rows in = accepted + quarantined``
(written in the report, checked after the move). The GX Data Docs site is one of the
reports: built into the batch before the move, so it moves with it."""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from transact.data.io import table_path
from transact.validation.batch import Batch
from transact.validation.docs import site_dir
from transact.validation.params import ROWS_TABLE, _utc_stamp
from transact.validation.profile import world_profile
from transact.validation.report import PROFILE_JSON, _finish
from transact.validation.results import Failure, ValidationResult, _write_json


def decide(batch: Batch, failures: list[Failure], checks: dict[str, dict[str, int]],
           frames: dict[str, pd.DataFrame], gx_results: dict[str, Any], rows_in: dict[str, int | None],
           notes: list[str] | None = None, timings: dict[str, float] | None = None,
           docs: Callable[[Path], Path] | None = None) -> ValidationResult:
    """The batch passes when nothing failed. Pass: its profile is written as the new
    reference (when asked) and the reports beside it; fail: :func:`_quarantine`.
    ``timings`` (seconds per phase) gets ``docs`` and ``decide`` and goes into the result.
    ``docs(site folder)`` builds the GX Data Docs there (None: no GX ran, no site)."""
    t_decide = time.perf_counter()
    passed = not failures
    result = ValidationResult(
        passed=passed, batch=batch.name, kind=batch.kind, source=str(batch.path), location=str(batch.path),
        quarantine=None, rows={}, checks=checks, failures=failures, checked_at=batch.checked_at,
        now_ms=batch.params.now_ms, seconds=0.0, reference=batch.reference_note, reference_written=None,
        reports={}, notes=[*batch.notes, *(notes or [])])
    if passed:
        result.profile = world_profile(frames, batch.name, batch.checked_at)
        result.rows = {t: {"in": n, "accepted": n, "quarantined": 0} for t, n in rows_in.items()}
        if batch.reference_out is not None and batch.update_reference:
            result.reference_written = str(_write_json(Path(batch.reference_out), result.profile))
        report_dir, stem = batch.report_dir, batch.report_stem
        _build_docs(result, docs, site_dir(report_dir, stem), timings)
    else:
        report_dir, stem = _quarantine(batch, result, gx_results, rows_in, docs, timings), ""
    if timings is not None:
        timings["decide"] = time.perf_counter() - t_decide - timings.get("docs", 0.0)
        result.timings = {k: round(v, 3) for k, v in timings.items()}
    result.seconds = round(time.perf_counter() - batch.t0, 3)
    _finish(result, gx_results, batch.params, report_dir, stem)
    return result


def _quarantine(batch: Batch, result: ValidationResult, gx_results: dict,
                rows_in: dict[str, int | None], docs: Callable[[Path], Path] | None = None,
                timings: dict[str, float] | None = None) -> Path:
    """Moves the failed batch to ``<quarantine>/<batch>-<UTC stamp>/``: the reports first
    (into a world, which then moves in one rename; or into the quarantine folder, which
    the row file and its ``<stem>.json`` summary then join), the move last. Returns the
    quarantine folder."""
    from transact.data.world import fault_point

    dest = _quarantine_dest(batch.quarantine, result.batch, _utc_stamp(int(time.time() * 1000)))
    result.quarantine = str(dest)
    result.rows = {t: {"in": n, "accepted": 0, "quarantined": n} for t, n in rows_in.items()}
    if batch.kind == "world":
        result.location = str(dest)
        (batch.path / PROFILE_JSON).unlink(missing_ok=True)  # a stale profile from an earlier pass
        report_dir = batch.path
    else:
        dest.mkdir(parents=True)
        result.location = str(dest / batch.path.name)
        report_dir = dest
    _build_docs(result, docs, site_dir(report_dir), timings)
    _finish(result, gx_results, batch.params, report_dir)  # the reasons first, then the move
    fault_point("quarantine-reported")
    if batch.kind == "world":
        _move_dir(batch.path, dest)
    else:
        _move_rows_file(batch.path, dest)
    fault_point("quarantine-moved")
    _check_moved(batch, dest, rows_in)
    return dest


def _build_docs(result: ValidationResult, docs: Callable[[Path], Path] | None, site: Path,
                timings: dict[str, float] | None) -> None:
    """Builds the Data Docs site into ``site`` (``result.data_docs``: its index). A GX
    rendering error must not stand between a batch and its decision (or its quarantine),
    so it becomes a note and the batch goes on without a site."""
    t = time.perf_counter()
    result.data_docs = None
    if docs is None:
        shutil.rmtree(site, ignore_errors=True)  # a stale site of an earlier validation
        return
    try:
        result.data_docs = str(docs(site))
    except Exception as e:  # noqa: BLE001 - the HTML is a convenience, the decision is not
        shutil.rmtree(site, ignore_errors=True)
        result.notes.append(f"GX Data Docs not built ({type(e).__name__}: {e})")
    if timings is not None:
        timings["docs"] = time.perf_counter() - t


def _quarantine_dest(quarantine_dir: Path, batch: str, stamp: str) -> Path:
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    dest = quarantine_dir / f"{batch}-{stamp}"
    i = 1
    while dest.exists():
        dest = quarantine_dir / f"{batch}-{stamp}-{i}"
        i += 1
    return dest


def _parquet_rows(path: Path) -> int | None:
    try:
        return int(pq.ParquetFile(path).metadata.num_rows) if path.is_file() else \
            int(pq.ParquetDataset(path).read(columns=[]).num_rows)
    except Exception:  # noqa: BLE001 - unreadable: count unknown
        return None


def _move_dir(src: Path, dest: Path) -> None:
    """Moves a folder in one rename; across file systems copies into a hidden folder
    beside ``dest`` first, so ``dest`` appears whole or not at all."""
    import errno

    try:
        os.rename(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    incoming = dest.with_name(f".{dest.name}.incoming-{os.getpid()}")
    shutil.copytree(src, incoming)
    os.rename(incoming, dest)
    shutil.rmtree(src)


def _move_rows_file(path: Path, dest: Path) -> None:
    """Moves a row file and its ``<stem>.json`` summary (when there) into ``dest``."""
    shutil.move(str(path), str(dest / path.name))
    side = path.with_suffix(".json")
    if side.exists():
        shutil.move(str(side), str(dest / side.name))


def _check_moved(batch: Batch, dest: Path, rows_in: dict[str, int | None]) -> None:
    """The whole batch moved: every row is accounted for (same row counts as before)."""
    if batch.kind == "rows":
        n_in = rows_in[ROWS_TABLE]
        if n_in is not None and _parquet_rows(dest / batch.path.name) != n_in:
            raise RuntimeError(f"quarantine of {batch.path.name}: row count changed in the move")
        return
    for t, n in rows_in.items():
        p = table_path(dest, t)
        if p.exists() and n is not None and _parquet_rows(p) != n:
            raise RuntimeError(f"quarantine of {batch.name}: table {t} has {_parquet_rows(p)} rows "
                               f"after the move, {n} before")
