"""What a validation decided, as records (:class:`Failure`, :class:`ValidationResult`),
and their JSON form: values made JSON-safe, files written atomically."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Failure:
    """One failed check: a GX expectation (``gx``) or a structural problem (missing table)."""

    name: str
    table: str
    expectation: str
    kwargs: dict
    unexpected_count: int | None = None
    element_count: int | None = None
    observed: Any = None
    sample_values: list = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    exception: str | None = None
    gx: bool = True
    hint: str | None = None  # what the bound was and how to change it, or how to fix the data


@dataclass
class ValidationResult:
    """What :func:`validate_world` / :func:`validate_rows` decided, and where things went.

    ``rows`` maps each table to ``{"in", "accepted", "quarantined"}``; ``location`` is
    where the batch is now (its own folder on pass, the quarantine folder on fail);
    ``data_docs`` is the ``index.html`` of its GX Data Docs site (None when none was
    built: no table was read, or GX failed to render -- a note then says why).
    """

    passed: bool
    batch: str
    kind: str  # "world" | "rows"
    source: str
    location: str
    quarantine: str | None
    rows: dict[str, dict[str, int | None]]
    checks: dict[str, dict[str, int]]  # table -> {"evaluated", "failed", "skipped"}
    failures: list[Failure]
    checked_at: str
    now_ms: int
    seconds: float
    reference: str | None  # where the reference came from ("none" notes why)
    reference_written: str | None
    reports: dict[str, str]
    profile: dict | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: read, derive, gx, docs, decide
    data_docs: str | None = None
    summary: str = ""

    @property
    def failed_names(self) -> list[str]:
        return [f.name for f in self.failures]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed_names"] = self.failed_names
        return _json_safe(d)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (str, int)):
        return x
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    return str(x)


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2, sort_keys=False))
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
