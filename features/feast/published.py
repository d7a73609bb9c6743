"""A Feast repo on object storage: built in a step's own folder, published whole, fetched anywhere.

Feast's file offline store and its SQLite registry read local files (its S3 registry needs boto3
and rewrites one object in place), so the features step builds the whole repo in a folder of its
own -- definitions, ``feature_store.yaml``, ``data/registry.db``, the offline parquet sources,
and ``data/online.db`` with SQLite -- and publishes it as one unit:

    <location>/versions/<UTC stamp>-<8 hex>/   the repo (files first, MANIFEST.json last)
    <location>/CURRENT.json                    {"version": ...}: one PUT, after the version is whole

A reader fetches the current version (every byte checked against its manifest) into a local
folder and opens it as a plain repo (:func:`fetch_repo`). With Redis online (the cluster
setting) the online rows live in Redis and the copy carries the registry and definitions; its
``feature_store.yaml`` keeps ``${TRANSACT_REDIS}`` unexpanded, so no password is published.
With SQLite the copy's ``online.db`` is the snapshot the step wrote.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from transact.data import storage

CURRENT = "CURRENT.json"
VERSIONS = "versions"
_SKIP = ("__pycache__",)


def publish_repo(repo: str | Path, location: str) -> dict:
    """Publishes the local repo at ``location`` as a new version, then points CURRENT at it."""
    repo = Path(repo)
    if not (repo / "feature_store.yaml").is_file():
        raise FileNotFoundError(f"{repo} is not a Feast repo (no feature_store.yaml)")
    version = f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"  # microseconds: in order
    files = [p.relative_to(repo).as_posix() for p in sorted(repo.rglob("*"))
             if p.is_file() and not any(part in _SKIP for part in p.parts) and not p.name.startswith(".")]
    where = storage.join(location, VERSIONS, version)
    storage.publish_tree(repo, where, meta={"version": version}, only=files)
    # CURRENT only moves forward: a slower run that started earlier never puts an older repo back
    # (versions sort by their UTC stamp, to the microsecond)
    try:
        current = storage.read_json(storage.join(location, CURRENT))["version"]
    except FileNotFoundError:
        current = ""
    moved = version > current
    if moved:
        storage.write_json(storage.join(location, CURRENT), {"version": version, "location": where})
    return {"location": location, "version": version, "files": len(files), "current": max(version, current)}


def current_version(location: str) -> str:
    try:
        return storage.read_json(storage.join(location, CURRENT))["version"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no published Feast repo ({CURRENT} missing): run the "
                                "pipeline's features step with this storage root first") from None


def fetch_repo(location: str, cache: str | Path | None = None) -> Path:
    """The current published version of the repo at ``location`` as a local repo folder
    (``<cache>/<version>``; a version already fetched there is reused)."""
    version = current_version(location)
    root = Path(cache) if cache else Path(tempfile.gettempdir()) / f"transact-feast-{os.getuid()}"
    dest = root / version
    storage.fetch_tree(storage.join(location, VERSIONS, version), dest)
    return dest


def local_repo(location: str, cache: str | Path | None = None) -> Path:
    """A local repo path as it is; an object-store location fetched (:func:`fetch_repo`)."""
    return fetch_repo(location, cache) if storage.is_remote(location) else storage.local_path(location)


def build_and_publish(build, location: str) -> dict:
    """Runs ``build(local_repo_folder) -> summary`` in a scratch folder, then publishes the repo."""
    with tempfile.TemporaryDirectory(prefix="transact-feast-build-") as tmp:
        repo = Path(tmp) / "repo"
        summary = build(repo)
        summary["published"] = publish_repo(repo, location)
    return summary
