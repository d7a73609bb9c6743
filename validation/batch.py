"""The shared set-up of :func:`~transact.validation.run.validate_world` and
:func:`~transact.validation.run.validate_rows` (:func:`open_batch`): locate the batch (a
sealed world folder -- anything else is refused, nothing moved -- or a file of NN rows),
then its parameters, its reference and the clock; and the world's manifest checks."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transact.data import schema as S
from transact.data.io import table_path
from transact.validation.gx import _import_gx
from transact.validation.params import (
    DEFAULT_MAX_CANDIDATES,
    DEFAULT_MAX_DUPLICATE_RATE,
    WORLD_TABLES,
    Params,
    Tolerance,
    _iso,
    _make_params,
    world_meta,
)
from transact.validation.profile import load_reference
from transact.validation.results import Failure


@dataclass
class Batch:
    """A located batch and what its checks and its decision are built from."""

    kind: str  # "world" | "rows"
    path: Path  # the world folder, or the row file
    name: str  # the batch name: the folder's name, or the row file's stem
    quarantine: Path
    params: Params
    reference: dict | None
    reference_note: str  # where the reference came from ("none" notes why)
    reference_out: str | os.PathLike | None  # where a pass writes the new reference
    update_reference: bool
    checked_at: str
    t0: float  # perf_counter at the start: the batch's time
    manifest: dict | None = None  # a world's manifest
    notes: list[str] = field(default_factory=list)  # said in the report whatever the decision

    @property
    def report_dir(self) -> Path:
        """Where a passing batch's reports go: into the world, or beside the row file."""
        return self.path if self.kind == "world" else self.path.parent

    @property
    def report_stem(self) -> str:
        """Prefix of a passing batch's report files (``<stem>.`` beside a row file)."""
        return "" if self.kind == "world" else f"{self.path.stem}."


def open_batch(kind: str, source: str | os.PathLike, quarantine_dir: str | os.PathLike,
               reference: str | os.PathLike | dict | None, now: Any,
               reference_out: str | os.PathLike | None, update_reference: bool, *,
               max_candidates: int | None = DEFAULT_MAX_CANDIDATES,
               max_duplicate_rate: float = DEFAULT_MAX_DUPLICATE_RATE, min_ts: int | None = None,
               tolerance: Tolerance | None = None, label_window_ms: int | None = None) -> Batch:
    """Locates the batch ``source`` of ``kind`` ("world": a world folder; "rows": a row
    file, or a folder holding ``nn_rows.parquet``) and sets up its validation. Raises
    (nothing touched) when it is not there or not a sealed world, when the quarantine
    folder lies inside a world, or on a bad parameter or reference."""
    _import_gx()  # paid once per process; not part of the batch's time
    t0 = time.perf_counter()
    path = Path(source).resolve()
    manifest = None
    no_meta = ""
    if kind == "world":
        manifest = _world_manifest(path)
        quarantine = Path(quarantine_dir).resolve()
        if quarantine.is_relative_to(path):
            raise ValueError(f"validate: the quarantine folder {quarantine} must not be inside the batch {path}")
        meta = world_meta(path)
        no_meta = _missing_world_json(path)
        name = path.name
    elif kind == "rows":
        if path.is_dir():
            path = path / "nn_rows.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"validate: no row file {path}")
        quarantine = Path(quarantine_dir).resolve()
        meta = world_meta(path.parent)  # rows live beside a copy of their world.json
        name = path.stem
    else:
        raise ValueError(f"unknown batch kind {kind!r}; valid: world, rows")
    params = _make_params(now, min_ts, max_candidates, max_duplicate_rate, tolerance, meta, label_window_ms,
                          no_meta=no_meta)
    notes = [_defaults_note(path, params)] if no_meta else []
    ref, ref_note = load_reference(reference)
    if reference_out is None and update_reference and reference is not None \
            and not isinstance(reference, dict) and str(reference):
        reference_out = reference
    return Batch(kind=kind, path=path, name=name, quarantine=quarantine, params=params, reference=ref,
                 reference_note=ref_note, reference_out=reference_out, update_reference=update_reference,
                 checked_at=_iso(int(time.time() * 1000)), t0=t0, manifest=manifest, notes=notes)


def _missing_world_json(world: Path) -> str:
    """Why the world has no readable world.json ("" when it has one)."""
    from transact.data.world import WORLD_JSON

    if not (world / WORLD_JSON).is_file():
        return f"no {WORLD_JSON} in the batch"
    return "" if world_meta(world) else f"{WORLD_JSON} is unreadable or not a JSON object"


def _defaults_note(world: Path, p: Params) -> str:
    """One line: the world has no world.json, and which defaults the checks used instead."""
    used = [what for what, source in (
        (f"the label window label_window_ms = {p.label_window_ms:,} ms", p.label_window_source),
        (f"min_ts {_iso(p.min_ts_ms)}", p.min_ts_source)) if source.startswith("the default")]
    return (f"{_missing_world_json(world)} ({world}): the checks use "
            + (" and ".join(used) + " (defaults)" if used else "the values given on the command line")
            + "; `transact import-logs` writes world.json (--label-window-ms, --min-ts)")


def _world_manifest(world: Path) -> dict:
    """The batch's manifest; refuses (one line, nothing touched) a folder that is not a
    sealed world, so validation never moves a folder of something else to quarantine."""
    from transact.data.world import SEAL_HINT, has_world_tables, read_manifest, recover

    if not world.exists():
        recover(world)  # a publish killed between its two renames
    if not world.is_dir():
        raise FileNotFoundError(f"validate: no world folder {world}")
    manifest = read_manifest(world)
    if manifest is None and not has_world_tables(world):
        raise ValueError(f"validate: {world} is not a world folder (no manifest.json, no "
                         f"{', '.join(WORLD_TABLES)} tables); nothing was moved")
    if manifest is None:
        raise ValueError(f"validate: {world} has no manifest.json (tables written by hand?); "
                         f"{SEAL_HINT.format(dir=world)}; nothing was moved")
    return manifest


def _manifest_failures(world: Path, manifest: dict) -> list[Failure]:
    """A present table (or world.json) that differs from the manifest: the batch changed
    after it was published. Missing tables are the "table is present" failures."""
    from transact.data.world import WORLD_JSON, manifest_differences

    out = []
    for name, what in manifest_differences(world, manifest).items():
        path = world / (WORLD_JSON if name == WORLD_JSON else f"{name}.parquet")
        if name == WORLD_JSON and not path.exists() and manifest.get("world_json"):
            out.append(_world_json_missing(world, path))
            continue
        if not path.exists():
            continue
        table = name if name in WORLD_TABLES else "world"
        out.append(Failure(f"world: {name} matches the manifest", table, "matches manifest",
                           {"path": str(path)}, gx=False, exception=what,
                           hint="the batch was changed after it was published; re-publish it "
                                "(or `transact seal-world` for tables written by hand)"))
    for name in WORLD_TABLES:
        if table_path(world, name).exists() and name not in manifest["tables"]:
            out.append(Failure(f"world: {name} matches the manifest", name, "matches manifest",
                               {"path": str(table_path(world, name))}, gx=False,
                               exception=f"{name}.parquet is not in the manifest"))
    return out



def _world_json_missing(world: Path, path: Path) -> Failure:
    """The world was published with a world.json that is gone: named as such, because every
    check that reads it (the label window first) would otherwise run on a default."""
    return Failure("world: world.json is present", "world", "world.json present", {"path": str(path)}, gx=False,
                   exception=f"world.json is missing from {world} (its manifest.json lists it)",
                   hint="world.json declares the world's label window (label_window_ms), min_ts and "
                        "train_end_ts; restore it, or re-import the logs with `transact import-logs` "
                        "(which writes it) -- without it the label checks would use the default "
                        f"label window label_window_ms = {S.DEFAULT_LABEL_WINDOW_MS:,} ms")
