"""Which parquet files a path of rows holds: a file, a folder of parts, or a published copy.

One rule for every reader of rows (training, evaluation, the drift monitor):

- a file is itself;
- a folder holds the ``.parquet`` files under it, at any depth, except hidden and ``_`` names
  (a writer's staging folder, a shuffle, ``_SUCCESS``: never rows);
- a folder holding a ``MANIFEST.json`` is a published tree copied whole (as Kubeflow hands a
  step an artifact, or :func:`transact.data.storage.fetch_tree` fetches one): only the files
  its manifest names count -- objects of a writer that died, or lost the race, may lie beside
  them -- and a folder among them with a manifest of its own is read by the same rule.
"""
from __future__ import annotations

import os
from pathlib import Path

from transact.data.storage import MANIFEST, published_files


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """The parquet files of a row path, sorted by path; FileNotFoundError when there are none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(_under(path))
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"row file {path} does not exist")
    return [path]


def _hidden(p: Path) -> bool:
    return p.name.startswith((".", "_"))


def _under(folder: Path) -> list[Path]:
    named = published_files(folder)
    if named is not None:
        nested = [p.parent for p in named if p.name == MANIFEST]  # published trees inside this one
        mine = [p for p in named if p.suffix == ".parquet" and not any(p.is_relative_to(n) for n in nested)
                and not any(_hidden(q) for q in p.relative_to(folder).parents if q != Path("."))
                and not _hidden(p)]
        for n in nested:
            mine += _under(n)
        return mine
    out: list[Path] = []
    for p in folder.iterdir():
        if _hidden(p):
            continue
        if p.is_dir():
            out += _under(p)
        elif p.suffix == ".parquet":
            out.append(p)
    return out
