"""A world folder is published as one unit and every reader checks it first.

A world is ``items, actions, impressions, requests`` (``.parquet``) plus ``world.json``.
Renaming four files one by one is not atomic: a kill between two renames leaves new
requests beside old actions. So a writer builds the whole new world in a staging folder
beside the target, writes ``manifest.json`` *last* (it marks the staging complete) and
swaps the folder in::

    <parent>/.<name>.staging-<pid>/   tables, world.json, then manifest.json
    rename <name>  -> .<name>.old-<pid>      (only when a world is already there)
    rename staging -> <name>
    remove .<name>.old-<pid>

A reader calls :func:`check_world`: the manifest must exist and each table's rows and
bytes (and, on request, sha256) must match it. When the target is missing because a
writer died between the two renames, the reader recovers: a sealed staging folder of a
dead writer is the new world (rolled forward), else the aside folder is the old one
(rolled back). Either way it sees the old world or the new one, never a mix.

``TRANSACT_FAULT_AT=<step>`` makes the process SIGKILL itself at that step (see
:data:`STEPS`): the crash tests kill the writer at every step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from transact.data import storage
from transact.data.io import TMP_SUFFIX as _TMP, SchemaError, clean_stale_tmp, pid_alive

MANIFEST = "manifest.json"
WORLD_JSON = "world.json"
MANIFEST_VERSION = 1
#: Version of the table schemas in :mod:`transact.data.schema` a manifest vouches for.
SCHEMA_VERSION = 1
WORLD_TABLES: tuple[str, ...] = ("items", "actions", "impressions", "requests")
FAULT_ENV = "TRANSACT_FAULT_AT"
#: The steps a publish (and a quarantine) passes, in order; each is a fault point.
STEPS: tuple[str, ...] = ("world-json-staged", "staged", "manifest-staged", "old-aside",
                          "swapped", "done")
SEAL_HINT = "run `transact seal-world {dir}` to seal tables written by hand"

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)$")


class WorldError(SchemaError):
    """A world folder is incomplete, unsealed or differs from its manifest."""


# ----------------------------------------------------------------------------- helpers
def fault_point(step: str) -> None:
    """Kills this process (SIGKILL, no cleanup) when ``TRANSACT_FAULT_AT`` names ``step``."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _aside(target: Path, kind: str, pid: int | None = None) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid() if pid is None else pid}"


def _siblings(target: Path, kind: str) -> list[tuple[Path, int]]:
    """The ``.<name>.<kind>-<pid>`` folders beside ``target``, with their pids."""
    out = []
    if target.parent.is_dir():
        for p in target.parent.iterdir():
            m = _STALE.match(p.name)
            if m and m["name"] == target.name and m["kind"] == kind:
                out.append((p, int(m["pid"])))
    return out


# ----------------------------------------------------------------------------- manifest
def table_entry(path: Path) -> dict:
    return {"rows": int(pq.ParquetFile(path).metadata.num_rows), "bytes": path.stat().st_size,
            "sha256": _sha256(path)}


def write_manifest(folder: Path) -> dict:
    """Writes ``folder/manifest.json`` for the tables and ``world.json`` found there
    (atomically, fsynced): the last file of a world, its seal."""
    folder = Path(folder)
    tables = {n: table_entry(folder / f"{n}.parquet") for n in WORLD_TABLES
              if (folder / f"{n}.parquet").is_file()}
    if not tables:
        raise WorldError(f"{folder}: no world tables ({', '.join(WORLD_TABLES)}.parquet) to seal")
    wj = folder / WORLD_JSON
    manifest = {"version": MANIFEST_VERSION, "schema_version": SCHEMA_VERSION, "tables": tables,
                "world_json": {"bytes": wj.stat().st_size, "sha256": _sha256(wj)} if wj.is_file() else None}
    for p in [*(folder / f"{n}.parquet" for n in tables), *([wj] if wj.is_file() else [])]:
        with open(p, "rb") as f:  # the data must be durable before the seal that vouches for it
            os.fsync(f.fileno())
    tmp = folder / f"{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync_dir(folder)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise WorldError(f"world {folder}: manifest.json is unreadable ({e}); {SEAL_HINT.format(dir=folder)}") from None
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or not isinstance(m.get("tables"), dict):
        raise WorldError(f"world {folder}: manifest.json is not a version-{MANIFEST_VERSION} world manifest")
    return m


def has_world_tables(folder: Path) -> bool:
    return any((Path(folder) / f"{n}.parquet").exists() for n in WORLD_TABLES)


def manifest_differences(folder: Path, manifest: dict, checksum: bool = False) -> dict[str, str]:
    """``{table or "world.json": what differs}``; empty when the folder matches its manifest.
    Rows and bytes always (cheap: the parquet footer, a stat), sha256 with ``checksum``."""
    folder, out = Path(folder), {}
    for name, want in manifest["tables"].items():
        p = folder / f"{name}.parquet"
        if not p.is_file():
            out[name] = f"{p.name} is missing"
            continue
        size = p.stat().st_size
        if size != want.get("bytes"):
            out[name] = f"{p.name} has {size} bytes, the manifest says {want.get('bytes')}"
            continue
        try:
            rows = pq.ParquetFile(p).metadata.num_rows
        except Exception as e:  # noqa: BLE001 - an unreadable footer is a difference
            out[name] = f"{p.name} is unreadable ({type(e).__name__})"
            continue
        if rows != want.get("rows"):
            out[name] = f"{p.name} has {rows} rows, the manifest says {want.get('rows')}"
        elif checksum and _sha256(p) != want.get("sha256"):
            out[name] = f"{p.name} has a different sha256 than the manifest"
    wj, want = folder / WORLD_JSON, manifest.get("world_json")
    if want is None and wj.exists():
        out[WORLD_JSON] = "world.json is not in the manifest"
    elif want is not None and (not wj.is_file() or _sha256(wj) != want.get("sha256")):
        out[WORLD_JSON] = "world.json is missing" if not wj.is_file() else "world.json differs from the manifest"
    return out


# ----------------------------------------------------------------------------- readers
def recover(target: Path) -> bool:
    """Completes or undoes a swap a dead writer left half done; True when ``target`` is
    back. A sealed staging folder (new world) wins over an aside folder (old world)."""
    target = Path(target)
    if target.exists():
        return True
    for kind in ("staging", "old"):
        for folder, pid in _siblings(target, kind):
            if pid_alive(pid):
                raise WorldError(f"world {target} is being published by process {pid}; retry when it ends")
            try:
                m = read_manifest(folder)
            except WorldError:
                continue
            if m is None or manifest_differences(folder, m):
                continue  # not sealed: never a world
            try:
                os.rename(folder, target)
            except OSError:  # another reader recovered it first
                pass
            if target.exists():
                return True
    return False


def check_world(world: str | os.PathLike, tables: Iterable[str] | None = None,
                checksum: bool = False) -> dict:
    """What every reader of a world calls first: returns the manifest, or raises a
    one-line :class:`WorldError` naming the table, what differs and what to run.

    ``tables``: the tables this reader needs (default: those of the manifest).
    """
    world = Path(world)
    if not world.exists() and not recover(world):
        raise FileNotFoundError(f"world: no world folder {world}")
    m = read_manifest(world)
    if m is None:
        what = "tables written without a manifest" if has_world_tables(world) else "not a world folder"
        raise WorldError(f"world {world}: no manifest.json ({what}); a world is written by "
                         f"`transact simulate` or `transact import-logs`, or {SEAL_HINT.format(dir=world)}")
    for name in tables or ():
        if name not in m["tables"]:
            raise WorldError(f"world {world}: the manifest has no {name} table")
    diff = manifest_differences(world, m, checksum)
    if diff:
        name, what = next(iter(diff.items()))
        raise WorldError(f"world {world}: {name} does not match manifest.json ({what}); the world "
                         f"was changed after it was published: re-publish it, or {SEAL_HINT.format(dir=world)}")
    return m


def check_world_at(world: str | os.PathLike, tables: Iterable[str] | None = None) -> dict:
    """:func:`check_world` of a world at a local path or an object-store URI (a world folder
    copied as it is, e.g. the artifact Kubeflow stored for the step that made it): the manifest,
    each table's bytes and rows (its parquet footer, a ranged read), and world.json's sha256."""
    if not storage.is_remote(world):
        return check_world(storage.local_path(world, "world"), tables)
    where = os.fspath(world)
    try:
        m = json.loads(storage.read_bytes(storage.join(where, MANIFEST)))
    except FileNotFoundError:
        raise WorldError(f"world {where}: no {MANIFEST} (not a world folder, or its copy is incomplete); "
                         "a world is written by `transact simulate` or `transact import-logs`") from None
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or not isinstance(m.get("tables"), dict):
        raise WorldError(f"world {where}: {MANIFEST} is not a version-{MANIFEST_VERSION} world manifest")
    for name in tables or ():
        if name not in m["tables"]:
            raise WorldError(f"world {where}: the manifest has no {name} table")
    for name, want in m["tables"].items():
        fs, path = storage.arrow_fs(storage.join(where, f"{name}.parquet"))
        try:
            with fs.open_input_file(path) as f:
                got = {"bytes": f.size(), "rows": pq.ParquetFile(f).metadata.num_rows}
        except FileNotFoundError:
            got = None
        if got is None or got["bytes"] != want.get("bytes") or got["rows"] != want.get("rows"):
            what = "is missing" if got is None else f"has {got['bytes']} bytes, {got['rows']} rows"
            raise WorldError(f"world {where}: {name}.parquet {what}, the manifest says {want.get('bytes')} "
                             f"bytes, {want.get('rows')} rows; the world was changed after it was published")
    want = m.get("world_json")
    if want is not None:
        try:
            same = hashlib.sha256(storage.read_bytes(storage.join(where, WORLD_JSON))).hexdigest() == want.get("sha256")
        except FileNotFoundError:
            same = False
        if not same:
            raise WorldError(f"world {where}: {WORLD_JSON} is missing or differs from the manifest")
    return m


# ----------------------------------------------------------------------------- writers
def clean_stale(target: Path) -> None:
    """Removes what dead writers left beside and inside ``target``: staging folders,
    aside folders (only once the target is back) and ``*.tmp-<pid>`` files."""
    target = Path(target)
    recover(target)
    for kind in ("staging", "old"):
        for folder, pid in _siblings(target, kind):
            if not pid_alive(pid) and (kind == "staging" or target.exists()):
                shutil.rmtree(folder, ignore_errors=True)
    clean_stale_tmp(target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # a later in-place write replaces the file (rename), never the shared inode
    except OSError:
        shutil.copy2(src, dst)


def _carry_extras(target: Path, staging: Path) -> None:
    """Files of ``target`` that are not part of the world (reports, row files) stay with it."""
    world_files = {f"{n}.parquet" for n in WORLD_TABLES} | {WORLD_JSON, MANIFEST}
    for p in target.iterdir() if target.is_dir() else ():
        if p.name in world_files or _TMP.search(p.name) or (staging / p.name).exists():
            continue
        if p.is_dir():
            shutil.copytree(p, staging / p.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(p), str(staging / p.name))


def swap_in(staging: Path, target: Path) -> None:
    """Replaces ``target`` by the sealed ``staging`` folder (aside, rename, remove old)."""
    old = _aside(target, "old")
    had_old = target.exists()
    if had_old:
        os.rename(target, old)
        fault_point("old-aside")
    os.rename(staging, target)
    _fsync_dir(target.parent)
    fault_point("swapped")
    if had_old:
        shutil.rmtree(old, ignore_errors=True)
    fault_point("done")


@contextlib.contextmanager
def publishing(target: str | os.PathLike, copy_from: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yields a staging folder to write the world into; on success seals and swaps it in
    place of ``target``; on an error removes it and leaves ``target`` untouched.

    ``copy_from``: start from this world's files (copy-on-write, for in-place rewrites of
    one table). Files of ``target`` that are not world files are kept.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    staging = _aside(target, "staging")
    shutil.rmtree(staging, ignore_errors=True)
    if copy_from is not None:
        shutil.copytree(copy_from, staging, copy_function=_link_or_copy,
                        ignore=lambda d, names: [n for n in names if n == MANIFEST or _TMP.search(n)])
    else:
        staging.mkdir()
    try:
        yield staging
        fault_point("staged")
        _carry_extras(target, staging)
        write_manifest(staging)
        fault_point("manifest-staged")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, target)


def write_world_json(folder: Path, summary: dict, **dumps) -> Path:
    path = Path(folder) / WORLD_JSON
    tmp = path.with_name(f"{WORLD_JSON}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, **dumps))
    os.replace(tmp, path)
    fault_point("world-json-staged")
    return path


def read_world_json(folder: str | os.PathLike) -> dict:
    """``world.json`` of a world folder (a local path or a URI); {} when absent or unreadable
    (the defaults apply)."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(folder, WORLD_JSON)))
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


#: world.json keys that end the training window, in order of preference
TRAIN_END_KEYS: tuple[str, ...] = ("train_end_ts", "eval_start_ts")


def train_end_of(meta: dict) -> int | None:
    """The world's train/eval split instant from its world.json, if it names one."""
    for key in TRAIN_END_KEYS:
        if key in meta:
            return int(meta[key])
    return None


def seal_world(world: str | os.PathLike) -> dict:
    """Writes the manifest of a world whose tables were written by hand (validates nothing)."""
    world = Path(world)
    if not world.is_dir():
        raise FileNotFoundError(f"seal-world: no folder {world}")
    clean_stale_tmp(world)
    return write_manifest(world)
