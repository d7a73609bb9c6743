"""Paths a user gives: a local path, a ``file://`` URI, or an object-store URI -- never confused.

``pathlib.Path("s3://bucket/world")`` is the *local* path ``s3:/bucket/world``: code that takes
a URI as a path writes a folder named ``s3:`` in the working directory and reports success,
and the bucket stays empty. Every path that reaches the system from a person (the CLI's
options, pipeline parameters, the service's settings) goes through :func:`local_path` first:

    "runs/w", "/abs/w"              -> that local path
    "file:///abs/w"                  -> /abs/w
    "s3://b/w", "gs://b/w", ...      -> ObjectStoreURI (a ValueError naming the setting): this
                                        code path reads and writes local files only
    "s3:/b/w" (a URI after Path())   -> the same refusal: a local folder named "s3:" is never meant

A scheme is two or more letters (``C:/x`` stays a Windows drive path).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

#: ``scheme:/`` at the start: a URI, or one that ``Path()`` folded to a single slash
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/")


class ObjectStoreURI(ValueError):
    """An object-store URI where this code path needs a local one (one line, names the setting)."""


def uri_scheme(value: str | os.PathLike) -> str | None:
    """The URI scheme of ``value`` (lower case), or None for a plain path."""
    m = _URI.match(os.fspath(value))
    return m.group("scheme").lower() if m else None


def local_path(value: str | os.PathLike, setting: str = "path") -> Path:
    """``value`` as a local :class:`~pathlib.Path` (``file://`` URIs unwrapped); an object-store
    URI raises :class:`ObjectStoreURI` naming ``setting`` -- before anything is written."""
    text = os.fspath(value)
    scheme = uri_scheme(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        parsed = urlparse(text if "://" in text else text.replace(":/", ":///", 1))
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{setting}: {text} names another host; a file:// URI must be local")
        return Path(unquote(parsed.path))
    shown = text if "://" in text else text.replace(":/", "://", 1)
    raise ObjectStoreURI(f"{setting}: {shown} is an object-store URI; this reads and writes local paths only, "
                         "so nothing was written -- give a local path or a file:// URI")


# --- object storage: one layer over fsspec (s3fs for s3://, gcsfs/adlfs when installed) ---------
#
# Every location below is a string: a local path, a file:// URI or an object-store URI. Local
# paths go through the os module (rename and O_EXCL give the atomicity); the rest through
# fsspec, with credentials and endpoint read by the backend the standard way (AWS_ENDPOINT_URL,
# AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a pod's IAM role; GOOGLE_APPLICATION_CREDENTIALS).
#
# Objects cannot be renamed, so a folder is *published*: its files are written under a prefix
# of this writer's own (``objects/<nonce>/``), then MANIFEST.json -- the prefix, names, sizes,
# sha256 -- last, with a create-only write. A reader trusts only what a manifest names and checks
# every byte it fetches against it; a writer that dies mid-way, or loses the race for the
# manifest, leaves objects no manifest names (removed by a loser, never read by anyone): two
# writers never mix their objects under one manifest.

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "transact-manifest/1"
_CHUNK = 8 << 20


class Unpublished(FileNotFoundError):
    """A location with no manifest: never published, or its writer died before finishing."""


def is_remote(value: str | os.PathLike) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``, ...); False for local paths and file://."""
    scheme = uri_scheme(value)
    return scheme is not None and scheme != "file"


def _remote(uri: str):
    """(fsspec filesystem, path within it) of an object-store URI."""
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec comes with s3fs, a dependency
        raise RuntimeError("object storage needs fsspec (and s3fs for s3://): pip install s3fs") from e
    text = uri if "://" in uri else uri.replace(":/", "://", 1)
    if uri_scheme(text) == "minio":  # Kubeflow's default artifact store: MinIO, which speaks S3
        text = "s3://" + text.split("://", 1)[1]  # (its endpoint: AWS_ENDPOINT_URL, as for any S3 server)
    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{text}: no filesystem for this scheme is installed ({e})") from None
    # fsspec keeps one client per store and caches its listings: another process (another pod)
    # may have written here since, so every call starts from what the store holds now
    fs.invalidate_cache(path)
    return fs, path


def arrow_fs(location: str | os.PathLike):
    """(pyarrow filesystem, path in it) of a local path or an object-store URI: what pyarrow's
    parquet and dataset readers take, so a task reads row groups of an object where it lies
    (only the byte ranges it needs) instead of copying the file to its disk first."""
    import pyarrow.fs as pafs

    if is_remote(location):
        fs, path = _remote(os.fspath(location))
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), str(local_path(location).absolute())


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI alike (a URI never passes through pathlib)."""
    text = os.fspath(base)
    if is_remote(text):
        text = text if "://" in text else text.replace(":/", "://", 1)
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(local_path(text).joinpath(*parts))


def exists(location: str | os.PathLike) -> bool:
    if is_remote(location):
        fs, path = _remote(os.fspath(location))
        return bool(fs.exists(path))
    return local_path(location).exists()


def read_bytes(location: str | os.PathLike) -> bytes:
    if is_remote(location):
        fs, path = _remote(os.fspath(location))
        try:
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{os.fspath(location)}: no such object") from None
    return local_path(location).read_bytes()


def read_json(location: str | os.PathLike) -> dict:
    return json.loads(read_bytes(location))


def write_bytes(location: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    """Writes ``data`` whole or not at all: a local file through a temporary name and a rename,
    an object in one PUT. ``exclusive``: fail with :class:`FileExistsError` when ``location``
    exists -- atomically (a hard link locally; a conditional ``If-None-Match: *`` PUT on S3).
    Two writers racing for the same name: exactly one succeeds."""
    if is_remote(location):
        fs, path = _remote(os.fspath(location))
        try:
            with fs.open(path, "xb" if exclusive else "wb") as f:
                f.write(data)
        except OSError as e:
            if exclusive and _precondition_failed(e):
                raise FileExistsError(f"{os.fspath(location)}: already exists") from None
            raise
        return
    path = local_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    try:
        if exclusive:
            os.link(tmp, path)  # fails when path exists: the create-only write
        else:
            os.replace(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists") from None
    except OSError as e:
        if exclusive and e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(e.errno, f"{path}: create-only writes need hard links, which this file system "
                                   "refuses; put the storage root on a local disk, NFS, or an object store") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _precondition_failed(e: BaseException) -> bool:
    """A conditional PUT refused because the object exists, however the client words it: s3fs maps
    only a 412 whose body names If-None-Match to FileExistsError; other stores answer a bare 412
    (PreconditionFailed) or, when two conditional PUTs race on AWS, 409 ConditionalRequestConflict."""
    seen: BaseException | None = e
    while seen is not None:
        response = getattr(seen, "response", None) or {}  # botocore's ClientError, under s3fs's OSError
        code = (response.get("Error") or {}).get("Code", "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_EXCLUSIVE_CHECKED: set[str] = set()


def check_exclusive_writes(location: str | os.PathLike) -> None:
    """Proves, once per process and store, that create-only writes at ``location`` are honoured:
    writes a probe object twice with ``exclusive`` and needs the second to be refused. A store
    that silently overwrites (an S3-compatible server that ignores ``If-None-Match``, an fsspec
    backend without mode "x") would let two racing writers both win: refused in one line."""
    key = os.fspath(location)
    if not is_remote(key):
        return  # hard links: refused loudly by write_bytes where missing
    fs, _ = _remote(key)
    store = f"{fs.protocol}:{key.split('://', 1)[1].split('/', 1)[0]}"
    if store in _EXCLUSIVE_CHECKED:
        return
    probe = join(key, ".probe", uuid.uuid4().hex)
    write_bytes(probe, b"1", exclusive=True)
    try:
        write_bytes(probe, b"2", exclusive=True)
    except FileExistsError:
        _EXCLUSIVE_CHECKED.add(store)
        return
    finally:
        remove_tree(probe)
    raise RuntimeError(f"{key}: this object store ignores conditional writes (If-None-Match), so two runs "
                       "could both replace the champion; use a store that honours them (AWS S3, GCS, a recent MinIO)")


def write_json(location: str | os.PathLike, obj: dict, *, exclusive: bool = False) -> None:
    write_bytes(location, json.dumps(obj, indent=2, default=str).encode(), exclusive=exclusive)


def listdir(location: str | os.PathLike) -> list[str]:
    """Names directly under ``location`` (empty when it does not exist)."""
    if is_remote(location):
        fs, path = _remote(os.fspath(location))
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
    path = local_path(location)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def remove_tree(location: str | os.PathLike) -> None:
    """Deletes ``location`` and everything under it (nothing there: nothing done)."""
    if is_remote(location):
        fs, path = _remote(os.fspath(location))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    path = local_path(location)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a local file (hex)."""
    return _sha256(Path(path))


def sha256_of(location: str | os.PathLike) -> tuple[int, str]:
    """(bytes, sha256) of the file or object at ``location``, read back in chunks."""
    if not is_remote(location):
        path = local_path(location)
        return path.stat().st_size, _sha256(path)
    fs, path = _remote(os.fspath(location))
    h, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def put_file(src: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copies the local file ``src`` to ``location``: whole or not at all (a temporary name and a
    rename locally; one PUT, or a multipart upload completed at once, on an object store)."""
    _put_file(Path(src), os.fspath(location))


def _files(folder: Path, only: Collection[str] | None = None) -> dict[str, dict]:
    """Relative name -> size and sha256 of every file under ``folder`` (or of the names ``only``)."""
    paths = [folder / n for n in only] if only is not None else sorted(folder.rglob("*"))
    # the folder's own manifest is not one of its files; a published tree inside it keeps its own
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in paths if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}


def _put_file(src: Path, location: str) -> None:
    if is_remote(location):
        fs, path = _remote(location)
        fs.put_file(str(src), path)
        return
    dest = local_path(location)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _get_file(location: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(location):
        fs, path = _remote(location)
        fs.get_file(path, str(dest))
    else:
        shutil.copyfile(local_path(location), dest)


def publish_tree(folder: str | os.PathLike, location: str | os.PathLike, meta: dict | None = None,
                 progress: Callable[[str], None] | None = None, only: Collection[str] | None = None) -> dict:
    """Publishes the local ``folder`` (or its files ``only``) at ``location`` (files first,
    :data:`MANIFEST` last, create-only).

    Publishing the same files again is a no-op (the manifests agree); other files at a published
    location raise :class:`FileExistsError` -- a published location never changes. Returns the manifest.
    """
    src = local_path(folder, "folder")
    target = os.fspath(location)
    files = _files(src, only)
    if only is not None and len(files) != len(only):
        raise FileNotFoundError(f"{src}: {', '.join(sorted(set(only) - set(files)))} not found")
    prefix = new_prefix()
    existing = read_manifest(target, missing_ok=True)
    if existing is not None:
        if existing["files"] == files:
            return existing
        raise FileExistsError(f"{target}: already published with other contents (published locations never change)")
    for i, rel in enumerate(files, 1):
        if progress:
            progress(f"{target}: {i}/{len(files)} {rel}")
        _put_file(src / rel, join(target, prefix, rel))
    return seal(target, prefix, files, meta)


def new_prefix() -> str:
    """A writer's own prefix under a location (``objects/<nonce>``): the objects it writes there
    are never mixed with another writer's."""
    return f"objects/{uuid.uuid4().hex[:16]}"


def seal(location: str | os.PathLike, prefix: str, files: dict[str, dict], meta: dict | None = None) -> dict:
    """Writes the manifest naming ``files`` (relative name -> bytes, sha256), already written under
    ``location/prefix`` by this writer (from one process, or from many tasks), create-only: the
    step that makes them visible. Losing the race to a concurrent writer removes this writer's
    objects and raises :class:`FileExistsError` unless the winner published the same files."""
    target = os.fspath(location)
    manifest = {"format": MANIFEST_FORMAT, "prefix": prefix, "files": files, "meta": meta or {},
                "published_at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        write_json(join(target, MANIFEST), manifest, exclusive=True)
    except FileExistsError:  # a concurrent publisher won (its objects stand, ours go) -- or our own
        winner = read_manifest(target)  # PUT landed and its retry was refused: then it names our prefix
        if winner is not None and winner.get("prefix") == prefix:
            return winner
        remove_tree(join(target, prefix))
        if winner is None or winner.get("files") != files:
            raise FileExistsError(f"{target}: published concurrently with other contents") from None
        return winner
    return manifest


def published_files(folder: str | os.PathLike) -> list[Path] | None:
    """The files the manifest of the local ``folder`` names, where they lie, or None when
    ``folder`` has no manifest. A tree copied whole (as Kubeflow hands a step an artifact) holds
    them under the writer's prefix; one fetched by :func:`fetch_tree` holds them at their names.
    A reader of such a folder reads these and nothing else: objects of a writer that died, or
    lost the race, may lie beside them. A named file missing from the copy raises."""
    folder = local_path(folder, "folder")
    manifest = read_manifest(folder, missing_ok=True) if (folder / MANIFEST).is_file() else None
    if manifest is None:
        return None
    out = []
    for rel in sorted(manifest["files"]):
        at = [local_path(object_location(folder, manifest, rel)), folder / rel]
        found = next((p for p in at if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{folder}: {rel}, named by its {MANIFEST}, is not in this copy")
        out.append(found)
    return out


def sweep_unpublished(location: str | os.PathLike) -> list[str]:
    """Removes the writer prefixes under a published ``location`` that its manifest does not name
    (writers that died before publishing, or lost the race): safe once a manifest stands, since no
    writer can publish there any more. Returns the prefixes removed."""
    manifest = read_manifest(location, missing_ok=True)
    if manifest is None:
        return []
    gone = [f"objects/{n}" for n in listdir(join(location, "objects")) if f"objects/{n}" != manifest.get("prefix")]
    for prefix in gone:
        remove_tree(join(location, prefix))
    return gone


def object_location(location: str | os.PathLike, manifest: dict, rel: str) -> str:
    """Where the published file ``rel`` of ``manifest`` lies (under its writer's prefix)."""
    return join(location, manifest.get("prefix", ""), rel) if manifest.get("prefix") else join(location, rel)


def read_manifest(location: str | os.PathLike, *, missing_ok: bool = False) -> dict | None:
    """The manifest of a published location; :class:`Unpublished` (or None) when there is none."""
    where = join(location, MANIFEST)
    try:
        manifest = read_json(where)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise Unpublished(f"{os.fspath(location)}: not published (no {MANIFEST}): never written, "
                          "or its writer stopped before finishing") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{where}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def fetch_tree(location: str | os.PathLike, folder: str | os.PathLike) -> dict:
    """Copies what the manifest at ``location`` names into the local ``folder``, checking every
    file's size and sha256 (a mismatch raises, and the folder is not left half-filled: files
    are fetched into a temporary sibling, which is renamed into place last). Files already in
    ``folder`` with the manifest's contents make this a no-op. Returns the manifest."""
    manifest = read_manifest(location)
    assert manifest is not None
    dest = local_path(folder, "folder")
    if dest.is_dir() and _files(dest) == manifest["files"]:
        return manifest
    with _staged(dest, "fetch") as tmp:
        for rel, want in manifest["files"].items():
            where = object_location(location, manifest, rel)
            _get_file(where, tmp / rel)
            got = {"bytes": (tmp / rel).stat().st_size, "sha256": _sha256(tmp / rel)}
            if got != want:
                raise ValueError(f"{where}: {got['bytes']} bytes, sha256 {got['sha256'][:12]}…, "
                                 f"but the manifest says {want['bytes']} bytes, {want['sha256'][:12]}…")
        write_json(tmp / MANIFEST, {**manifest, "prefix": ""})  # this copy holds the files at their names
    return manifest


@contextlib.contextmanager
def _staged(dest: Path, what: str) -> Iterator[Path]:
    """A temporary sibling of the local folder ``dest`` to fill; renamed into place (replacing
    ``dest``) when the block ends normally, removed when it raises: ``dest`` is never half-filled."""
    tmp = dest.with_name(f".{dest.name}.{what}-{uuid.uuid4().hex[:8]}")
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # aside in one rename, then the new one in: dest is missing for an instant only
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def move_tree(folder: str | os.PathLike, location: str | os.PathLike, meta: dict | None = None) -> dict:
    """Moves the local ``folder`` to ``location`` with nothing lost at any point: publish (copy,
    manifest last), fetch the manifest back and check it names every file, then delete the source.
    A kill before the delete leaves both copies, never neither."""
    src = local_path(folder, "folder")
    manifest = publish_tree(src, location, meta=meta)
    for rel, want in _files(src).items():  # every object read back before the source goes
        got = sha256_of(object_location(location, manifest, rel))
        if want.get("bytes") != got[0] or want.get("sha256") != got[1] or manifest["files"].get(rel) != want:
            raise RuntimeError(f"move of {src} to {os.fspath(location)}: {rel} differs in the published copy; "
                               "source kept")
    shutil.rmtree(src)
    return manifest


def download_tree(location: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Copies everything under ``location`` (a team's own files: no manifest expected) into the
    local ``folder``, through a temporary sibling renamed into place last, so ``folder`` never
    holds half a copy. Returns ``folder``."""
    dest = local_path(folder, "folder")
    with _staged(dest, "download") as tmp:
        if is_remote(location):
            fs, path = _remote(os.fspath(location))
            if not fs.isdir(path):
                raise FileNotFoundError(f"{os.fspath(location)}: no such folder")
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        else:
            shutil.copytree(local_path(location), tmp)
    return dest


def glob(folder: str | os.PathLike, pattern: str) -> list[str]:
    """Sorted locations of the files under ``folder`` (a local path or a URI) matching
    ``pattern`` relative to it (``**/`` spans any depth, none included)."""
    text = os.fspath(folder)
    if not is_remote(text):
        return [str(p) for p in sorted(local_path(text).glob(pattern)) if p.is_file()]
    fs, path = _remote(text)
    scheme = text.split("://", 1)[0] if "://" in text else text.split(":/", 1)[0]
    found = [p for p in fs.glob(path.rstrip("/") + "/" + pattern) if fs.isfile(p)]
    return sorted(f"{scheme}://{p}" for p in found)


def is_folder(location: str | os.PathLike) -> bool:
    if is_remote(location):
        fs, path = _remote(os.fspath(location))
        return bool(fs.isdir(path))
    return local_path(location).is_dir()


def download(location: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A file or a folder at ``location`` copied to the local ``dest`` (whole, or not at all)."""
    if is_folder(location):
        return download_tree(location, dest)
    dest = local_path(dest, "dest")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.download{os.getpid()}")
    try:
        _get_file(os.fspath(location), tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def upload_tree(folder: str | os.PathLike, location: str | os.PathLike) -> int:
    """Copies every file under the local ``folder`` to ``location`` (each file whole, as
    :func:`put_file`; files there that ``folder`` lacks are left alone). Returns the file count."""
    src = local_path(folder, "folder")
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    for p in files:
        _put_file(p, join(location, p.relative_to(src).as_posix()))
    return len(files)
