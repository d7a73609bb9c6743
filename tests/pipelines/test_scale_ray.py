"""Scale-out engines: stable partitions; Ray's NN rows and labelled rows equal the local
engine's, column by column; a real local Ray (2 CPUs) and, marked slow, a real Ray head
reached through its Jobs API -- each started and stopped here."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # a declared test dependency: a missing one fails the run

from helpers import write_world
from transact.data.io import SchemaError
from transact.data.partition import partition_of, publishing_folder, read_bucket, stable_hash, write_buckets
from transact.data.world import publishing, seal_world, write_world_json
from transact.features.config import FeatureConfig
from transact.features.nn_logging import TRAIN_END_META, log_nn_features

CFG = FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)
ORDER = [("ts", "ascending"), ("request_id", "ascending"), ("position", "ascending"), ("item_id", "ascending")]
TRAIN_END = 1_700_000_000_000


# ----------------------------------------------------------------------------- no Ray
def test_stable_hash_is_splitmix64_and_parts_are_even():
    assert int(stable_hash(np.array([0]))[0]) == 0xE220A8397B1DCDAF  # splitmix64's first output of seed 0
    ids = np.arange(-5_000, 5_000)
    p = partition_of(ids, 4)
    assert p.min() == 0 and p.max() == 3 and np.array_equal(p, partition_of(ids.copy(), 4))
    assert np.bincount(p).min() > 2_300  # near 2,500 each
    consecutive = partition_of(np.arange(8), 2)
    assert 0 < consecutive.sum() < 8  # not id mod n: neighbours spread
    with pytest.raises(ValueError, match="partitions must be >= 1"):
        partition_of(ids, 0)


def test_buckets_round_trip_and_a_folder_appears_whole(tmp_path):
    t = pa.table({"user_id": pa.array(np.arange(40) % 7, pa.int64()), "v": pa.array(np.arange(40))})
    with publishing_folder(tmp_path / "parts") as stage:
        written = write_buckets(t, "user_id", 3, stage / "b", "c00000")
        back = pa.concat_tables([read_bucket(stage / "b", p, t.schema) for p in range(3)])
        assert sum(written.values()) == back.num_rows == 40
        assert sorted(back.column("v").to_pylist()) == list(range(40))
        assert not (tmp_path / "parts").exists()  # nothing visible until the end
    assert (tmp_path / "parts" / "b").is_dir()

    def killed_midway():
        with publishing_folder(tmp_path / "parts") as stage:
            (stage / "new").mkdir()
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        killed_midway()
    assert (tmp_path / "parts" / "b").is_dir() and not (tmp_path / "parts" / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["parts"]  # no staging left


# ----------------------------------------------------------------------------- a local Ray
@pytest.fixture(scope="module")
def local_ray(s3):
    """A local Ray on 127.0.0.1, 2 CPUs, with its own token (Ray turns token authentication
    on for a new local cluster; the token is this test's, nothing is written to ~/.ray). Its
    workers reach the session's S3 server (started first: they inherit the AWS variables)."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_MODE", raising=False)  # Ray sets it; restored (absent) afterwards
        mp.setenv("RAY_AUTH_TOKEN", uuid.uuid4().hex)
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
                 log_to_driver=False, _temp_dir=temp, _node_ip_address="127.0.0.1")
        yield
        ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def small_world(path: Path, n_users: int = 12, seed: int = 3) -> pa.Table:
    """A sealed world of ``n_users``, tables in row groups of 64 rows (map tasks read runs of
    them), with a train/eval split in its world.json."""
    tables = write_world(path.with_name(path.name + "-src"), seed=seed, n_users=n_users)
    with publishing(path) as stage:
        for name, t in zip(("items", "actions", "impressions", "requests"), tables):
            pq.write_table(t, stage / f"{name}.parquet", row_group_size=64)
        write_world_json(stage, {"train_end_ts": TRAIN_END})
    return tables[3]


def assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    assert got.schema.equals(want.schema, check_metadata=False)
    assert got.num_rows == want.num_rows > 0
    got, want = got.sort_by(ORDER), want.sort_by(ORDER)
    for name in want.column_names:  # byte-identical, column by column
        assert got.column(name).combine_chunks().equals(want.column(name).combine_chunks()), name


def test_ray_rows_equal_the_local_rows_column_by_column(tmp_path, local_ray):
    from transact.components.ray_engine import log_nn_ray, part_name
    from transact.model.dataset import RowDataset, read_feature_config, rows_train_end_ts

    requests = small_world(tmp_path / "w")
    local = log_nn_features(tmp_path / "w", tmp_path / "local.parquet", CFG, progress=False)
    out = tmp_path / "rows"
    summary = log_nn_ray(tmp_path / "w", out, CFG, partitions=3, chunk_rows=50)  # several map tasks per table
    assert summary["rows"] == local["rows"] == requests.num_rows
    assert summary["requests"] == local["requests"]
    assert sorted(p.name for p in out.iterdir()) == [part_name(p) for p in range(3)]  # no shuffle left
    assert [p.name for p in tmp_path.iterdir() if ".staging" in p.name] == []  # no staging left
    want = pq.read_table(tmp_path / "local.parquet")
    assert_same_rows(pq.read_table(out), want)
    for p in range(3):  # each part holds its own users only, with the rows' metadata
        part = pq.read_table(out / part_name(p))
        assert np.all(partition_of(part.column("user_id").to_numpy(), 3) == p)
        assert part.schema.metadata[b"feature_config"] == want.schema.metadata[b"feature_config"]
        assert part.schema.metadata[TRAIN_END_META] == str(TRAIN_END).encode()
    assert len(summary["map_tasks"]) > 3 and all(t["peak_rss_mib"] > 0 for t in summary["parts"])
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == summary["rows"]
    # training reads the folder as it reads the file
    assert read_feature_config(out) == CFG
    assert rows_train_end_ts(out)[0] == TRAIN_END
    assert len(RowDataset(out)) == len(RowDataset(tmp_path / "local.parquet"))


def test_ray_rejects_a_request_with_two_users_like_the_local_engine(tmp_path, local_ray):
    from transact.components.ray_engine import log_nn_ray

    requests = small_world(tmp_path / "w")
    uid = requests.column("user_id").to_numpy().copy()
    uid[1] = uid[0] + 11  # the second candidate of the first request claims another user
    pq.write_table(requests.set_column(1, "user_id", pa.array(uid, pa.int64())), tmp_path / "w" / "requests.parquet")
    seal_world(tmp_path / "w")
    with pytest.raises(SchemaError, match="has rows with different user_id"):
        log_nn_ray(tmp_path / "w", tmp_path / "rows", CFG, partitions=2)
    assert not (tmp_path / "rows").exists()


def test_the_pipeline_step_on_ray_writes_parts_training_reads(tmp_path, local_ray):
    from transact.components import steps
    from transact.model.dataset import RowDataset

    small_world(tmp_path / "w")
    steps.log_nn(str(tmp_path / "w"), str(tmp_path / "run"), progress=False)
    n_local = len(RowDataset(tmp_path / "run"))
    summary = steps.log_nn(str(tmp_path / "w"), str(tmp_path / "run"), progress=False, engine="ray", partitions=2)
    assert summary["engine"] == "ray" and (tmp_path / "run" / steps.ROWS_PARTS).is_dir()
    assert not (tmp_path / "run" / steps.ROWS_FILE).exists()  # one set of rows, never two
    assert len(RowDataset(tmp_path / "run")) == n_local == summary["rows"]
    with pytest.raises(ValueError, match="engine must be one of"):
        steps.log_nn(str(tmp_path / "w"), str(tmp_path / "x"), engine="spark")


def served_log(rows: pa.Table, folder: Path, cfg: FeatureConfig) -> None:
    """Served-log files made from NN rows: labels dropped, predictions added; one request
    served twice (a retry, later), one request never labelled, rows spread over 3 files."""
    from transact.serving.served_log import served_log_schema

    heads = ("click", "repin")
    n = rows.num_rows
    rng = np.random.default_rng(0)
    served = rows.drop_columns([c for c in rows.column_names if c.startswith("label_")])
    served = served.append_column("pred_click", pa.array(rng.random(n), pa.float32()))
    served = served.append_column("pred_repin", pa.array(rng.random(n), pa.float32()))
    served = served.append_column("score", pa.array(rng.random(n), pa.float64()))
    served = served.append_column("model_version", pa.array(["v1"] * n))
    served = served.append_column("served_ts", pa.array(rows.column("ts").to_numpy() + 5, pa.int64()))
    served = served.cast(served_log_schema(cfg, heads))
    rid = served.column("request_id").to_numpy()
    retry = served.filter(pa.array(rid == rid[0]))
    retry = retry.set_column(retry.schema.get_field_index("served_ts"), "served_ts",
                             pa.array(retry.column("served_ts").to_numpy() + 1_000, pa.int64())).cast(served.schema)
    unlabelled = served.slice(0, 2).set_column(0, "request_id", pa.array([10**12, 10**12], pa.int64()))
    unlabelled = unlabelled.cast(served.schema)
    everything = pa.concat_tables([retry, served, unlabelled])
    folder.mkdir()
    for i, idx in enumerate(np.array_split(rng.permutation(everything.num_rows), 3)):
        pq.write_table(everything.take(pa.array(idx)), folder / f"served-2026-{i:06d}.parquet")


def test_attach_labels_on_ray_equals_the_local_join(tmp_path, local_ray):
    from transact.components.ray_engine import attach_labels_local, attach_labels_ray

    requests = small_world(tmp_path / "w")
    log_nn_features(tmp_path / "w", tmp_path / "rows.parquet", CFG, progress=False)
    served_log(pq.read_table(tmp_path / "rows.parquet"), tmp_path / "served", CFG)
    local = attach_labels_local(tmp_path / "served", tmp_path / "w", tmp_path / "local.parquet")
    summary = attach_labels_ray(tmp_path / "served", tmp_path / "w", tmp_path / "train", partitions=3, chunk_rows=40)
    assert summary["rows"] == local["rows"] == requests.num_rows  # unlabelled left out, the retry once
    assert_same_rows(pq.read_table(tmp_path / "train"), pq.read_table(tmp_path / "local.parquet"))
    # and the join is the logged rows themselves (labels and all)
    assert_same_rows(pq.read_table(tmp_path / "train"), pq.read_table(tmp_path / "rows.parquet"))


# ----------------------------------------------------------------------------- Ray on a bucket
def test_ray_reads_a_world_in_a_bucket_and_publishes_its_parts_there(tmp_path, s3, local_ray):
    """No shared volume: the map tasks read row groups of the world's objects, the shuffle and the
    parts are objects, and the output appears only with its manifest -- the same rows, byte for
    byte, as the local engine's; a copy of the bucket's folder is read by training as a folder."""
    from transact.components.ray_engine import log_nn_ray, summary_location
    from transact.data import storage
    from transact.model.dataset import RowDataset, read_feature_config, row_files, rows_train_end_ts

    requests = small_world(tmp_path / "w")
    local = log_nn_features(tmp_path / "w", tmp_path / "local.parquet", CFG, progress=False)
    bucket = s3.bucket()
    world = f"{bucket}/worlds/w"
    storage.upload_tree(tmp_path / "w", world)  # a world folder as it is (as Kubeflow stores an artifact)
    out = f"{bucket}/rows/nn_rows"
    summary = log_nn_ray(world, out, CFG, partitions=3, chunk_rows=50)
    assert summary["rows"] == local["rows"] == requests.num_rows
    manifest = storage.read_manifest(out)
    assert sorted(manifest["files"]) == [f"part-{p:05d}.parquet" for p in range(3)]
    assert storage.listdir(storage.join(out, manifest["prefix"])) == sorted(manifest["files"])  # no shuffle left
    assert storage.read_json(summary_location(out))["rows"] == summary["rows"]
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()  # a URI never became a folder

    # a writer that died mid-way left objects no manifest names: a copy of the folder reads past them
    storage.write_bytes(storage.join(out, "objects", "deadbeef", "part-00000.parquet"),
                        (tmp_path / "local.parquet").read_bytes())
    copy = tmp_path / "copy" / "nn_rows"
    storage.download_tree(out, copy)
    assert len(row_files(copy)) == 3
    assert_same_rows(pa.concat_tables([pq.read_table(f) for f in row_files(copy)]),
                     pq.read_table(tmp_path / "local.parquet"))
    assert read_feature_config(copy) == CFG and rows_train_end_ts(copy)[0] == TRAIN_END
    assert len(RowDataset(copy)) == local["rows"]

    with pytest.raises(FileExistsError, match="already published"):  # a published location never changes
        log_nn_ray(world, out, CFG, partitions=2)


def test_ray_refuses_a_world_in_a_bucket_that_differs_from_its_manifest(tmp_path, s3, local_ray):
    from transact.components.ray_engine import log_nn_ray
    from transact.data import storage
    from transact.data.world import WorldError

    small_world(tmp_path / "w")
    world = f"{s3.bucket()}/w"
    storage.upload_tree(tmp_path / "w", world)
    storage.write_bytes(storage.join(world, "actions.parquet"), (tmp_path / "w" / "items.parquet").read_bytes())
    with pytest.raises(WorldError, match="actions.parquet has .* the manifest says"):
        log_nn_ray(world, f"{s3.bucket()}/rows", CFG, partitions=2)
    storage.remove_tree(storage.join(world, "manifest.json"))
    with pytest.raises(WorldError, match="no manifest.json"):
        log_nn_ray(world, f"{s3.bucket()}/rows", CFG, partitions=2)


def test_attach_labels_on_ray_reads_a_shipped_log_in_a_bucket(tmp_path, s3, local_ray):
    from transact.components.ray_engine import attach_labels_local, attach_labels_ray
    from transact.data import storage

    small_world(tmp_path / "w")
    log_nn_features(tmp_path / "w", tmp_path / "rows.parquet", CFG, progress=False)
    served_log(pq.read_table(tmp_path / "rows.parquet"), tmp_path / "served", CFG)
    local = attach_labels_local(tmp_path / "served", tmp_path / "w", tmp_path / "local.parquet")
    bucket = s3.bucket()
    storage.upload_tree(tmp_path / "served", f"{bucket}/served/host-a")  # shipped: one folder a server
    storage.upload_tree(tmp_path / "w", f"{bucket}/w")
    summary = attach_labels_ray(f"{bucket}/served", f"{bucket}/w", f"{bucket}/train", partitions=2, chunk_rows=40)
    assert summary["rows"] == local["rows"]
    storage.fetch_tree(f"{bucket}/train", tmp_path / "train")
    assert_same_rows(pq.read_table(tmp_path / "train", ignore_prefixes=["MANIFEST"]),
                     pq.read_table(tmp_path / "local.parquet"))


def test_the_pipeline_step_on_ray_publishes_parts_under_its_artifact_uri(tmp_path, s3, local_ray):
    """What the log-nn step does on a cluster with engine=ray: the world read at its artifact URI,
    the parts published under the rows artifact's URI by the workers; the step's own folder gets
    world.json (what Kubeflow uploads beside them); the train step's copy of the artifact reads
    as the local engine's rows. A retried step finds the published rows and does nothing."""
    from transact.components import steps
    from transact.data import storage
    from transact.model.dataset import RowDataset

    small_world(tmp_path / "w")
    n_local = steps.log_nn(str(tmp_path / "w"), str(tmp_path / "local"), progress=False)["rows"]
    bucket = s3.bucket()
    storage.upload_tree(tmp_path / "w", f"{bucket}/ingest/world")
    rows_uri = f"{bucket}/log-nn/rows"
    kw = dict(progress=False, engine="ray", partitions=2, parts_at=storage.join(rows_uri, steps.ROWS_PARTS))
    summary = steps.log_nn(f"{bucket}/ingest/world", str(tmp_path / "step-out"), **kw)
    assert summary["rows"] == n_local
    assert [p.name for p in (tmp_path / "step-out").iterdir()] == ["world.json"]
    storage.upload_tree(tmp_path / "step-out", rows_uri)  # the launcher's upload of the step's folder
    storage.download_tree(rows_uri, tmp_path / "train-in")  # ... and the train step's download
    assert len(RowDataset(tmp_path / "train-in")) == n_local
    again = steps.log_nn(f"{bucket}/ingest/world", str(tmp_path / "step-out"), **kw)
    assert again["rows"] == n_local and len(storage.listdir(storage.join(rows_uri, steps.ROWS_PARTS, "objects"))) == 1


# ----------------------------------------------------------------------------- a Ray head, Jobs API
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A real Ray head on 127.0.0.1 (``ray start --head --block`` in its own process group,
    stopped by that group's id), with token authentication: the token is handed to this
    process the way a KFP step gets it (``RAY_AUTH_TOKEN``). Yields its Jobs API address."""
    import signal
    import time

    from ray.job_submission import JobSubmissionClient

    from transact.components.ray_engine import _auth_headers

    monkeypatch.setenv("RAY_AUTH_TOKEN", uuid.uuid4().hex)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    bin_dir = Path(sys.executable).parent  # the cluster's image: `transact` on its PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    port, dash = free_port(), free_port()
    # every port its own: the defaults (e.g. the job agent's 52365) may be held by another Ray here
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port",
                                                     "ray-client-server-port")]
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
                             "--temp-dir", temp, "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *ports],
                            env=env, stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(600):  # a liveness guard, not a time limit: the head is up or has died
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            try:
                JobSubmissionClient(address, headers=_auth_headers()).list_jobs()
                break
            except ConnectionError:  # not serving yet
                time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and every process it started, by group id
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_log_nn_submitted_to_a_ray_head_through_its_jobs_api(tmp_path, ray_head):
    from transact.components.ray_engine import run_log_nn

    small_world(tmp_path / "w")
    log_nn_features(tmp_path / "w", tmp_path / "local.parquet", CFG, progress=False)
    summary = run_log_nn(tmp_path / "w", tmp_path / "rows", CFG, engine="ray", address=ray_head, partitions=2)
    assert summary["job"].startswith("raysubmit_") and summary["partitions"] == 2
    assert_same_rows(pq.read_table(tmp_path / "rows"), pq.read_table(tmp_path / "local.parquet"))
    with pytest.raises(RuntimeError, match="FAILED"):  # a failing job says so, with its last line
        run_log_nn(tmp_path / "nowhere", tmp_path / "rows2", CFG, engine="ray", address=ray_head)


def test_ray_profile_times_every_part_by_stage_and_writes_the_same_rows(tmp_path, local_ray):
    """`bench scale --profile` on Ray: each part task times the pass's stages in its own
    worker, the rows are the unprofiled ones, and the task-seconds by stage add up to the
    tasks' time."""
    from transact.bench.scale import RAY_PART_OTHER, STAGES, StageTimer, ray_stages
    from transact.components.ray_engine import log_nn_ray

    small_world(tmp_path / "w")
    plain = log_nn_ray(tmp_path / "w", tmp_path / "a", CFG, partitions=2)
    prof = log_nn_ray(tmp_path / "w", tmp_path / "b", CFG, partitions=2, stage_timer=StageTimer)
    assert_same_rows(pq.read_table(tmp_path / "b"), pq.read_table(tmp_path / "a"))
    assert all("stages_s" not in p for p in plain["parts"])
    for p in prof["parts"]:
        assert {"NN search", "sequences", "S_all assembly"} <= set(p["stages_s"]) <= {s for s, _, _ in STAGES}
        assert 0 < sum(p["stages_s"].values()) <= p["seconds"]
    rows = ray_stages(prof, 12, 2, wall_s=prof["seconds"])
    by = {r["stage"]: r for r in rows}
    assert {"map: world tables -> shuffle", RAY_PART_OTHER, "NN search"} <= set(by)
    task_s = sum(m["seconds"] for m in prof["map_tasks"]) + sum(p["seconds"] for p in prof["parts"])
    in_tasks = sum(r["seconds"] for r in rows if not r["stage"].startswith("not in a task"))
    assert in_tasks == pytest.approx(task_s, abs=0.01 * len(rows))
    assert sum(r["share_pct"] for r in rows) == pytest.approx(100, abs=0.5)
