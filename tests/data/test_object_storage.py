"""One storage layer for local folders and object stores: publish (files, manifest last),
fetch (every byte checked), create-only writes (exactly one of two racing writers wins), and
a move that never loses the source -- against a real S3-protocol server (moto) and locally."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import at_once
from transact.data import storage


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * 10)
    (root / "sub" / "b.json").write_text('{"x": 1}')
    return root


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A fresh empty location: a local folder, or a bucket on the session's S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3").bucket()


def test_publish_then_fetch_round_trips_every_byte(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _tree(tmp_path / "src")
    target = storage.join(where, "models", "m1")
    manifest = storage.publish_tree(src, target, meta={"rows": 3})
    assert set(manifest["files"]) == {"a.bin", "sub/b.json"}
    assert storage.listdir(target) == ["MANIFEST.json", "objects"]  # the files under the writer's own prefix
    out = tmp_path / "out"
    storage.fetch_tree(target, out)
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (out / "sub" / "b.json").read_text() == '{"x": 1}'
    assert storage.read_manifest(target)["meta"] == {"rows": 3}
    assert not (tmp_path / "s3:").exists()  # a URI never became a local folder


def test_publish_is_idempotent_and_a_published_location_never_changes(where, tmp_path):
    src = _tree(tmp_path / "src")
    target = storage.join(where, "m")
    first = storage.publish_tree(src, target)
    assert storage.publish_tree(src, target)["files"] == first["files"]
    (src / "a.bin").write_bytes(b"other")
    with pytest.raises(FileExistsError, match="already published with other contents"):
        storage.publish_tree(src, target)
    out = tmp_path / "out"
    storage.fetch_tree(target, out)
    assert (out / "a.bin").read_bytes() == bytes(range(256)) * 10


def test_two_writers_of_one_location_never_mix_their_objects(where, tmp_path):
    """Two publishers with different files race for one location (two runs quarantining a batch
    of the same name in the same second): one manifest wins and names only its writer's objects;
    the loser is told, and its objects are gone."""
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    (b / "a.bin").write_bytes(b"other bytes")
    target = storage.join(where, "quarantine", "world-20261207T000000Z")
    results = at_once(lambda i: storage.publish_tree([a, b][i], target), 2)
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, FileExistsError)]
    assert len(won) == 1 and len(lost) == 1, results
    storage.fetch_tree(target, tmp_path / "out")  # every byte as the winning manifest says
    assert storage.listdir(storage.join(target, "objects")) == [won[0]["prefix"].split("/")[1]]


def test_a_conditional_put_refused_in_any_wording_is_file_exists(monkeypatch, tmp_path):
    """s3fs maps only a 412 whose body names If-None-Match; a bare 412 (other S3-compatible
    stores) or AWS's 409 ConditionalRequestConflict came through as a generic error."""
    import fsspec
    from botocore.exceptions import ClientError

    class Refusing:
        def __init__(self, code: str, status: int):
            self.code, self.status = code, status

        def invalidate_cache(self, path=None):
            pass

        def open(self, path, mode):
            error = ClientError({"Error": {"Code": self.code, "Message": "m"},
                                 "ResponseMetadata": {"HTTPStatusCode": self.status}}, "PutObject")
            raise OSError(22, "Invalid argument") from error

    for code, status in (("PreconditionFailed", 412), ("ConditionalRequestConflict", 409)):
        monkeypatch.setattr(fsspec.core, "url_to_fs", lambda _u, r=Refusing(code, status): (r, "b/k"))
        with pytest.raises(FileExistsError, match="already exists"):
            storage.write_bytes("s3://b/k", b"x", exclusive=True)
        with pytest.raises(OSError, match="Invalid argument"):  # not a create-only write: as it was
            storage.write_bytes("s3://b/k", b"x")


def test_a_store_that_ignores_conditional_writes_is_refused_before_a_promotion(monkeypatch):
    import fsspec

    real = fsspec.core.url_to_fs

    def ignoring(url):
        fs, path = real(url)

        class Overwrites:  # a backend that takes mode "x" and overwrites anyway
            protocol = fs.protocol

            def __getattr__(self, name):
                return getattr(fs, name)

            def open(self, p, mode):
                return fs.open(p, mode.replace("x", "w"))

        return Overwrites(), path

    monkeypatch.setattr(fsspec.core, "url_to_fs", ignoring)
    with pytest.raises(RuntimeError, match="ignores conditional writes"):
        storage.check_exclusive_writes("memory://ignoring-store/registry")


def test_files_without_a_manifest_are_not_published(where, tmp_path):
    """A writer that died before its manifest: readers refuse the location, by name."""
    target = storage.join(where, "half")
    storage.write_bytes(storage.join(target, "a.bin"), b"partial")
    with pytest.raises(storage.Unpublished, match=r"not published \(no MANIFEST.json\)"):
        storage.fetch_tree(target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_changed_object_is_caught_and_nothing_half_fetched_is_left(where, tmp_path):
    src = _tree(tmp_path / "src")
    target = storage.join(where, "m")
    manifest = storage.publish_tree(src, target)
    storage.write_bytes(storage.object_location(target, manifest, "sub/b.json"), b'{"x": 2}')  # same size, other bytes
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="but the manifest says"):
        storage.fetch_tree(target, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize("writers", [2, 8])
def test_exactly_one_of_racing_create_only_writers_wins(where, writers):
    """The conditional write promotion rests on: every writer tries the same new name at once."""
    name = storage.join(where, "champion", "00000001.json")
    results = at_once(lambda i: storage.write_json(name, {"writer": i}, exclusive=True), writers)
    won = [i for i, r in enumerate(results) if r is None]
    lost = [r for r in results if isinstance(r, FileExistsError)]
    assert len(won) == 1 and len(lost) == writers - 1
    assert storage.read_json(name) == {"writer": won[0]}


def test_move_keeps_the_source_until_the_copy_is_published(where, tmp_path, monkeypatch):
    src = _tree(tmp_path / "batch")
    target = storage.join(where, "quarantine", "batch-1")

    def fail(*_a, **_k):
        raise OSError("connection reset")

    with monkeypatch.context() as m:
        m.setattr(storage, "write_json", fail)  # the manifest write fails: nothing is published
        with pytest.raises(OSError, match="connection reset"):
            storage.move_tree(src, target)
    assert (src / "a.bin").exists()
    assert storage.read_manifest(target, missing_ok=True) is None
    storage.move_tree(src, target)  # the retry completes the move
    assert not src.exists()
    storage.fetch_tree(target, tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "b.json").read_text() == '{"x": 1}'


@pytest.mark.parametrize(("base", "parts", "want"), [
    ("s3://b/root", ("a", "b.json"), "s3://b/root/a/b.json"),
    ("s3://b/root/", ("/a/",), "s3://b/root/a"),
    ("s3:/b/root", ("a",), "s3://b/root/a"),  # a URI folded by Path() is restored, never a folder "s3:"
    ("gs://b", ("x",), "gs://b/x"),
    ("runs/x", ("a",), "runs/x/a"),
    ("file:///tmp/x", ("a",), "/tmp/x/a"),
])
def test_join_keeps_uris_uris(base, parts, want):
    assert storage.join(base, *parts) == want


def test_an_unknown_scheme_is_one_clear_line():
    with pytest.raises(ValueError, match="no filesystem for this scheme is installed"):
        storage.exists("nosuchfs://b/x")


def test_a_teams_logs_in_a_bucket_are_imported_by_the_ingest_step(s3, tmp_path, monkeypatch):
    """``source`` on object storage: copied into the step (never half), then imported; a missing
    prefix is one line naming it."""
    from transact.components import steps
    from transact.data.simulator import get_profile, simulate

    monkeypatch.chdir(tmp_path)
    logs = simulate(get_profile("tiny"), tmp_path / "logs", seed=3, progress=False)
    bucket = s3.bucket()
    for path in sorted((tmp_path / "logs").rglob("*")):
        if path.is_file() and path.name != "world.json":  # a team's logs: no world.json
            storage.write_bytes(storage.join(bucket, "logs", path.relative_to(tmp_path / "logs").as_posix()),
                                path.read_bytes())
    summary = steps.ingest(str(tmp_path / "world"), source=f"{bucket}/logs")
    assert summary["rows"] == logs["rows"]
    with pytest.raises(FileNotFoundError, match="nothing/here: no such folder"):
        steps.ingest(str(tmp_path / "w2"), source=f"{bucket}/nothing/here")
    assert not (tmp_path / "w2").exists() and not (tmp_path / "s3:").exists()


def test_kubeflows_minio_artifact_uris_are_read_as_s3_and_globs_reach_any_depth(s3):
    """Kubeflow's default artifact store names its objects ``minio://bucket/key``: MinIO speaks
    S3, so they are read at the S3 endpoint; a glob's ``**/`` spans any depth, none included."""
    bucket = s3.bucket()
    for key in ("log/served-1.parquet", "log/host-a/served-2.parquet", "log/host-a/other.json"):
        storage.write_bytes(f"{bucket}/{key}", b"x")
    minio = bucket.replace("s3://", "minio://")
    assert storage.read_bytes(f"{minio}/log/served-1.parquet") == b"x"
    assert storage.glob(f"{minio}/log", "**/served-*.parquet") == [
        f"{minio}/log/host-a/served-2.parquet", f"{minio}/log/served-1.parquet"]
    assert storage.glob(f"{bucket}/log", "**/served-*.parquet")[1] == f"{bucket}/log/served-1.parquet"


def test_a_rows_folder_holding_a_published_tree_survives_publish_and_fetch(where, tmp_path):
    """What a TrainJob node gets: the step's rows folder (world.json beside Ray's published parts,
    and a dead writer's part beside those) published, then fetched. The parts' own manifest
    travels with it, and readers of rows see the named parts only -- never world.json, never the
    dead writer's part, at whatever place the copy put the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transact.data.parts import parquet_files

    rows = tmp_path / "rows"
    parts = rows / "nn_rows"
    for i in range(2):
        (parts / "objects" / "live").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"x": [i]}), parts / "objects" / "live" / f"part-{i:05d}.parquet")
    (parts / "objects" / "dead").mkdir()
    pq.write_table(pa.table({"x": [9]}), parts / "objects" / "dead" / "part-00000.parquet")
    files = {f"part-{i:05d}.parquet": {"bytes": 0, "sha256": ""} for i in range(2)}
    storage.write_json(parts / storage.MANIFEST, {"format": storage.MANIFEST_FORMAT, "prefix": "objects/live",
                                                  "files": files, "meta": {}})
    (rows / "world.json").write_text("{}")
    want = [parts / "objects" / "live" / f"part-{i:05d}.parquet" for i in range(2)]
    assert parquet_files(rows) == want  # the copy Kubeflow hands the step

    published = storage.publish_tree(rows, storage.join(where, "trainjobs", "j", "rows"))
    assert "nn_rows/MANIFEST.json" in published["files"]  # a nested manifest is one of the files
    node = tmp_path / "node" / "rows"
    storage.fetch_tree(storage.join(where, "trainjobs", "j", "rows"), node)
    got = parquet_files(node)
    assert [p.relative_to(node) for p in got] == [p.relative_to(rows) for p in want]
    assert [pq.read_table(p).column("x")[0].as_py() for p in got] == [0, 1]
    (node / "nn_rows" / "objects" / "live" / "part-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="part-00001.parquet, named by its MANIFEST.json, is not in this copy"):
        parquet_files(node)


def test_sweep_removes_the_prefixes_of_writers_that_never_published(where, tmp_path):
    src = _tree(tmp_path / "src")
    target = storage.join(where, "t")
    assert storage.sweep_unpublished(target) == []  # nothing published: nothing is garbage yet
    storage.write_bytes(storage.join(target, "objects", "dead", "a.bin"), b"x")
    manifest = storage.publish_tree(src, target)
    assert storage.sweep_unpublished(target) == ["objects/dead"]
    assert storage.listdir(storage.join(target, "objects")) == [manifest["prefix"].split("/")[1]]
    storage.fetch_tree(target, tmp_path / "back")  # the published files are untouched
