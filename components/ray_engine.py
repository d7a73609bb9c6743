"""log-nn and attach-labels past one machine: partitions by a stable hash, run as Ray tasks.

Two stages of plain Ray tasks over files (only small summaries pass through Ray):

1. map -- each task reads one run of row groups of one table (or one served-log file) and
   writes its rows of every part into the shuffle folder (:mod:`transact.data.partition`);
2. reduce -- the task of part ``p`` reads only its part's files and builds its rows with
   the functions the local engine uses: NN logging through
   :func:`transact.features.nn_logging.write_nn_rows` over an :class:`EventStore` of its users,
   label attachment through :func:`transact.serving.served_log.attach_labels`.

log-nn parts users by ``user_id`` (a user's requests and events meet in one task); a
narrow copy of the requests parted by ``request_id`` lets each task check that its
requests each have one user and one ts, as :func:`sorted_requests` does for the whole
world. attach-labels parts served rows and labels by ``request_id``. A task holds its
part plus one run of row groups, never the world; each returns its peak RSS (VmHWM, reset
when it starts). The parts go to a staging folder swapped in whole at the end, with the
rows' parquet metadata (feature_config, train_end_ts); concatenated and sorted by (ts,
request_id, position, item_id) they equal the local engine's rows byte for byte.

Every location -- the world, the served log, the output, and so the shuffle between the two
stages -- may be a local path on storage every worker shares or an object-store URI
(``s3://``, ``gs://``, Kubeflow's ``minio://`` artifacts): tasks read row groups of objects where
they lie, and an output URI is published as a tree (:mod:`transact.data.storage`: each part an
object under this run's own prefix, the manifest last), so no shared volume is needed.

Ray: :func:`ray_session` joins the cluster of a Ray job (``RAY_ADDRESS``) or an ``address``,
else starts a local one; an ``http(s)://`` address is a cluster's Jobs API, where
:func:`submit_job` runs the same ``transact`` command as a Ray job.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeGuard

import numpy as np
import pyarrow as pa

from transact.components.procmem import reset_peak_rss, rss_mib
from transact.data import schema as S, storage
from transact.data.io import conform, read_table, table_path
from transact.data.partition import (
    filter_in,
    publishing_folder,
    read_bucket,
    read_parquet,
    read_row_groups,
    row_group_chunks,
    write_buckets,
)
from transact.data.requests import sorted_requests
from transact.data.world import check_world, check_world_at
from transact.features.config import FeatureConfig

#: rows a map task reads at once (whole row groups; one group at least)
CHUNK_ROWS = 1 << 20
#: object store of a local Ray: tasks exchange file paths and summaries only
LOCAL_OBJECT_STORE = 256 * 2**20
SHUFFLE = "_shuffle"
#: submissions tried while a new head's job agent is not up yet (poll_s apart)
AGENT_WAIT_TRIES = 60
#: the columns a request-integrity check needs (requests parted by request_id)
REQUEST_KEY = pa.schema([S.REQUESTS.field(c) for c in ("request_id", "user_id", "ts", "position", "item_id")])


# ----------------------------------------------------------------------------- Ray runtime
@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the duration: the one already connected; else ``address`` (``auto``,
    ``host:port``, ``ray://...``) or the cluster of a Ray job (``RAY_ADDRESS``); else a local
    Ray on this machine with ``num_cpus`` (default: all), no dashboard. Shuts down only
    what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def is_jobs_address(address: str | None) -> TypeGuard[str]:
    """An ``http(s)://`` address is a cluster's dashboard: work goes there as a Ray job."""
    return address is not None and address.startswith(("http://", "https://"))


def submit_job(address: str, argv: list[str], poll_s: float = 1.0, timeout_s: float | None = None) -> dict:
    """Runs ``transact <argv>`` on the cluster behind ``address`` (its Jobs API) and waits
    for it; returns {job, status, logs}; RuntimeError with the job's last log line when it
    does not succeed. Paths in ``argv`` must be on storage the cluster shares."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address, headers=_auth_headers())
    for attempt in range(AGENT_WAIT_TRIES):  # a head just started has no job agent for a few seconds
        try:
            job = client.submit_job(entrypoint=shlex.join(["transact", *argv]))
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == AGENT_WAIT_TRIES - 1:
                raise
            time.sleep(poll_s)
    start = time.monotonic()
    while not (status := client.get_job_status(job)).is_terminal():
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            client.stop_job(job)
            raise TimeoutError(f"ray job {job} still {status} after {timeout_s:.0f} s; stopped")
        time.sleep(poll_s)
    logs = client.get_job_logs(job)
    if status != JobStatus.SUCCEEDED:
        last = next((ln for ln in reversed(logs.splitlines()) if ln.strip()), "no output")
        raise RuntimeError(f"ray job {job} {status} on {address}: {last}")
    return {"job": job, "status": str(status), "logs": logs}


def _auth_headers() -> dict[str, str] | None:
    """The cluster's token (Ray's token authentication), looked up where Ray looks:
    ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else None


def default_partitions() -> int:
    """One part per CPU of the connected cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _get(refs: list) -> list:
    """ray.get, re-raising a task's own exception (one line) instead of Ray's wrapper."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:  # a task's own error, or its worker or node lost (OOM, a crash)
        for r in refs:  # the others stop; every task has ended before its staging folder goes
            ray.cancel(r)
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, Exception):
            raise e.cause from None
        raise


def _remote(fn):
    import ray

    return ray.remote(num_cpus=1, max_retries=1)(fn)


# ----------------------------------------------------------------------------- memory of a task
@contextlib.contextmanager
def _measured(stats: dict) -> Iterator[None]:
    """Fills ``stats`` with seconds, the RSS at the start and the peak RSS of the block."""
    stats["peak_reset"] = reset_peak_rss()
    stats["rss_start_mib"] = round(rss_mib("VmRSS"), 1)
    t0 = time.perf_counter()
    yield
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["peak_rss_mib"] = round(rss_mib("VmHWM"), 1)
    stats["pid"] = os.getpid()
    _release_memory()


def _release_memory() -> None:
    """Hands freed memory back to the OS: Ray reuses a worker for the next task, which
    would otherwise start from the previous task's high-water mark (malloc and Arrow keep
    what they freed)."""
    import ctypes

    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------------------- map tasks
def _map_table(path: str, groups: list[int], table: str, n: int, shuffle: str, chunk: int) -> dict:
    """One run of row groups of a world table -> its rows of every part (by user_id); the
    requests also by request_id (for the integrity check)."""
    stats: dict = {"table": table, "chunk": chunk}
    with _measured(stats):
        t = conform(read_row_groups(path, groups), S.TABLES[table], what=table)
        write_buckets(t, "user_id", n, storage.join(shuffle, table), f"c{chunk:05d}")
        if table == "requests":
            write_buckets(t.select(REQUEST_KEY.names), "request_id", n, storage.join(shuffle, "request_ids"),
                          f"c{chunk:05d}")
        stats["rows"] = t.num_rows
    return stats


def _map_by_request(path: str, groups: list[int] | None, what: str, n: int, shuffle: str, chunk: int) -> dict:
    """Served rows (a whole served-log file) or labelled requests -> parts by request_id."""
    stats: dict = {"table": what, "chunk": chunk}
    with _measured(stats):
        t = read_parquet(path) if groups is None else read_row_groups(path, groups)
        write_buckets(t, "request_id", n, storage.join(shuffle, what), f"c{chunk:05d}")
        stats["rows"] = t.num_rows
    return stats


def _table(world: str, name: str) -> str:
    return storage.join(world, f"{name}.parquet")


def _map_world_tables(world: str, tables: tuple[str, ...], n: int, shuffle: str, chunk_rows: int) -> list:
    task = _remote(_map_table)
    return [task.remote(_table(world, name), groups, name, n, shuffle, c)
            for name in tables for c, groups in enumerate(row_group_chunks(_table(world, name), chunk_rows))]


# ----------------------------------------------------------------------------- where parts go
class _Parts:
    """Where a run's parts go: ``part(p)`` is the location a reduce task writes part ``p`` to,
    ``shuffle`` the map stage's folder. Local: a staging folder swapped in whole at the end
    (:func:`publishing_folder`). A URI: objects under this run's own prefix, then the manifest
    naming each part's bytes and sha256 (:func:`transact.data.storage.seal`); a run that dies
    leaves objects no manifest names, never a half-published output."""

    def __init__(self, out: str, staging: str, prefix: str = ""):
        self.out, self.staging, self.prefix = out, staging, prefix
        self.shuffle = storage.join(staging, SHUFFLE)

    def part(self, p: int) -> str:
        return storage.join(self.staging, part_name(p))


@contextlib.contextmanager
def _publishing_parts(out: str) -> Iterator[_Parts]:
    if not storage.is_remote(out):
        with publishing_folder(out) as staging:
            parts = _Parts(str(staging), str(staging))
            yield parts
            shutil.rmtree(parts.shuffle, ignore_errors=True)
        return
    if storage.read_manifest(out, missing_ok=True) is not None:
        raise FileExistsError(f"{out}: already published (a published location never changes); give a new --out")
    prefix = storage.new_prefix()
    parts = _Parts(out, storage.join(out, prefix), prefix)
    try:
        yield parts
    except BaseException:
        with contextlib.suppress(Exception):
            storage.remove_tree(parts.staging)
        raise


def _seal(parts: _Parts, done: list[dict], meta: dict) -> None:
    """Makes a URI output visible: the shuffle goes first (nothing but the parts stays under the
    output), then the manifest of the parts the reduce tasks reported, then the objects of runs
    that died before theirs (once a manifest stands no other run can publish there)."""
    if parts.prefix:
        storage.remove_tree(parts.shuffle)
        storage.seal(parts.out, parts.prefix, {part_name(d["part"]): d["file"] for d in done}, meta)
        storage.sweep_unpublished(parts.out)


@contextlib.contextmanager
def _part_file(location: str) -> Iterator[Path]:
    """A local path to write a part at; the part is then at ``location`` (uploaded whole when a
    URI). Yields the local path; its bytes and sha256 go into the task's stats."""
    if not storage.is_remote(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="transact-part-") as tmp:
        local = Path(tmp) / Path(location).name
        yield local
        storage.put_file(local, location)


def _write_part(location: str, stats: dict, write) -> None:
    """``write(local_path)`` builds one part; its size and sha256 are recorded in ``stats``."""
    with _part_file(location) as local:
        write(local)
        stats["file"] = {"bytes": local.stat().st_size, "sha256": storage.sha256_file(local)}


# ----------------------------------------------------------------------------- log-nn
def _reduce_log_nn(shuffle: str, part: int, items_path: str, out: str, schema: pa.Schema,
                   cfg: FeatureConfig, batch_requests: int, stage_timer=None) -> dict:
    """The NN rows of one part's users, built by the local engine's own functions.
    ``stage_timer``: a context-manager class whose instance times the pass's stages
    (``.seconds``, e.g. the bench's StageTimer), reported as ``stages_s``."""
    from transact.features.nn_logging import write_nn_rows
    from transact.features.sequences import EventStore

    stats: dict = {"part": part}
    timer = stage_timer() if stage_timer is not None else None
    with _measured(stats), timer or contextlib.nullcontext():
        sorted_requests(read_bucket(storage.join(shuffle, "request_ids"), part, REQUEST_KEY))  # one user, one ts
        actions = read_bucket(storage.join(shuffle, "actions"), part, S.ACTIONS_TABLE)
        impressions = read_bucket(storage.join(shuffle, "impressions"), part, S.IMPRESSIONS)
        requests = read_bucket(storage.join(shuffle, "requests"), part, S.REQUESTS)
        ids = np.concatenate([t.column("item_id").to_numpy() for t in (actions, impressions, requests)])
        items = conform(filter_in(items_path, "item_id", ids), S.ITEMS, what="items")
        store = EventStore(items, actions, impressions, cfg)
        done: dict = {}

        def write(local: Path) -> None:
            done["rows"], done["requests"] = write_nn_rows(store, requests, local, schema, cfg, batch_requests,
                                                           num_threads=1)
        _write_part(out, stats, write)
        stats.update(rows=done["rows"], requests=done["requests"], events=actions.num_rows + impressions.num_rows,
                     items=items.num_rows)
    if timer is not None:
        stats["stages_s"] = {k: round(v, 4) for k, v in timer.seconds.items()}
    return stats


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def log_nn_ray(world: str | Path, out: str | Path, cfg: FeatureConfig | None = None,
               partitions: int | None = None, batch_requests: int = 256,
               chunk_rows: int = CHUNK_ROWS, stage_timer=None) -> dict:
    """The NN rows of ``world`` as a folder ``out`` of ``partitions`` parts (default: one per
    cluster CPU), built on the connected Ray (see :func:`ray_session`). Returns the summary
    (also written to ``<out>.json``), with each map and part task's stats; ``stage_timer``
    (:func:`_reduce_log_nn`) adds each part's time by stage."""
    from transact.features.nn_logging import rows_schema

    t0 = time.perf_counter()
    cfg = cfg or FeatureConfig()
    world, out = _location(world), _location(out)
    check_world_at(world, S.TABLES)  # a sealed world, never a mix of two
    n = partitions or default_partitions()
    schema = rows_schema(world, cfg)
    with _publishing_parts(out) as dest:
        maps = _get(_map_world_tables(world, ("actions", "impressions", "requests"), n, dest.shuffle, chunk_rows))
        task = _remote(_reduce_log_nn)
        parts = _get([task.remote(dest.shuffle, p, _table(world, "items"), dest.part(p), schema, cfg, batch_requests,
                                  stage_timer) for p in range(n)])
        summary = _summary(out, "log-nn", n, t0, maps, parts, feature_config=cfg.to_dict())
        _seal(dest, parts, {"step": "log-nn", "feature_config": cfg.to_dict()})  # last: a retry finds both
    return summary


def _location(value: str | Path) -> str:
    """A location as the tasks receive it: a URI as given, a local path made absolute (the
    tasks' working folder is not the caller's)."""
    return os.fspath(value) if storage.is_remote(value) else str(storage.local_path(value).absolute())


def _summary(out: str, step: str, n: int, t0: float, maps: list, parts: list, **extra) -> dict:
    summary = {
        "path": out,
        "engine": "ray",
        "step": step,
        "partitions": n,
        "rows": sum(p["rows"] for p in parts),
        "requests": sum(p.get("requests", 0) for p in parts),
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes": sum(p["file"]["bytes"] for p in parts),
        "peak_rss_mib": {"map": max((m["peak_rss_mib"] for m in maps), default=None),
                         "part": max((p["peak_rss_mib"] for p in parts), default=None)},
        **extra,
        "map_tasks": maps,
        "parts": parts,
    }
    storage.write_json(summary_location(out), summary)
    return summary


def summary_location(out: str | Path) -> str:
    """``<out>.json``: where a run's summary is written, beside its output (a file or a URI)."""
    text = os.fspath(out).rstrip("/")
    return text + ".json" if storage.is_remote(text) else str(Path(text).with_suffix(".json"))


ENGINES = ("local", "ray")


def run_log_nn(world: str | Path, out: str | Path, cfg: FeatureConfig | None = None, engine: str = "local",
               address: str | None = None, partitions: int | None = None, batch_requests: int = 256,
               progress: bool = True) -> dict:
    """log-nn on the chosen engine: ``local`` (one process, one file), ``ray`` on this machine
    or the cluster at ``address`` (``http(s)://``: submitted through its Jobs API)."""
    cfg = cfg or FeatureConfig()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local":
        from transact.features.nn_logging import log_nn_features

        return log_nn_features(world, out, cfg, batch_requests, progress)
    if is_jobs_address(address):
        world, out = _location(world), _location(out)
        argv = ["log-nn", "--engine", "ray", "--world", world, "--out", out, "--no-progress",
                "--batch-requests", str(batch_requests), "--feature-config", json.dumps(cfg.to_dict())]
        job = submit_job(address, argv + (["--partitions", str(partitions)] if partitions else []))
        return {**storage.read_json(summary_location(out)), "job": job["job"]}
    with ray_session(address):
        return log_nn_ray(world, out, cfg, partitions, batch_requests)


# ----------------------------------------------------------------------------- attach-labels
def _reduce_attach(shuffle: str, part: int, out: str, served_schema: pa.Schema, cfg: FeatureConfig) -> dict:
    from transact.data.io import write_table
    from transact.features.nn_features import nn_rows_schema
    from transact.serving.served_log import attach_labels

    stats: dict = {"part": part}
    with _measured(stats):
        served = read_bucket(storage.join(shuffle, "served"), part, served_schema)
        labels = read_bucket(storage.join(shuffle, "labels"), part, S.REQUESTS)
        rows = attach_labels(served, labels, cfg)
        _write_part(out, stats, lambda local: write_table(local, rows, nn_rows_schema(cfg)))
        stats.update(rows=rows.num_rows, served=served.num_rows, labels=labels.num_rows)
    return stats


def served_files(served: str | Path) -> list[str]:
    """The served-log files of a folder, local or at a URI (the files :func:`read_served_log`
    reads; shipped logs lie one folder a server), or the one file given."""
    where = _location(served)
    if storage.is_folder(where):
        files = storage.glob(where, "**/served-*.parquet")
    else:
        files = [where] if storage.exists(where) else []
    if not files:
        raise FileNotFoundError(f"{where}: no served-*.parquet files")
    return files


def attach_labels_ray(served: str | Path, world: str | Path, out: str | Path, partitions: int | None = None,
                      cfg: FeatureConfig | None = None, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Training rows from a served log and a world's labelled requests, as a folder ``out``
    of parts (by request_id); their union is :func:`attach_labels` of the whole log. Each
    location may be a URI (see the module's docstring)."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    world, out = _location(world), _location(out)
    files = served_files(served)
    fs, first = storage.arrow_fs(files[0])
    served_schema = pq.read_schema(first, filesystem=fs)
    if cfg is None:
        raw = (served_schema.metadata or {}).get(b"feature_config")
        if raw is None:
            raise ValueError(f"{files[0]}: no feature_config metadata (not a served log?)")
        cfg = FeatureConfig.from_dict(json.loads(raw))
    check_world_at(world, ("requests",))
    requests = _table(world, "requests")
    n = partitions or default_partitions()
    with _publishing_parts(out) as dest:
        task = _remote(_map_by_request)
        refs = [task.remote(f, None, "served", n, dest.shuffle, c) for c, f in enumerate(files)]
        refs += [task.remote(requests, g, "labels", n, dest.shuffle, c)
                 for c, g in enumerate(row_group_chunks(requests, chunk_rows))]
        maps = _get(refs)
        reduce = _remote(_reduce_attach)
        parts = _get([reduce.remote(dest.shuffle, p, dest.part(p), served_schema, cfg) for p in range(n)])
        summary = _summary(out, "attach-labels", n, t0, maps, parts, feature_config=cfg.to_dict())
        _seal(dest, parts, {"step": "attach-labels", "feature_config": cfg.to_dict()})
    return summary


def attach_labels_local(served: str | Path, world: str | Path, out: str | Path) -> dict:
    """The one-process engine: the whole served log joined in memory into one file ``out``."""
    from transact.data.io import write_table
    from transact.serving.served_log import attach_labels, read_served_log

    t0 = time.perf_counter()
    check_world(world, ("requests",))
    rows = attach_labels(read_served_log(served), read_table(table_path(world, "requests"), S.REQUESTS))
    write_table(out, rows)
    summary = {"path": str(out), "engine": "local", "step": "attach-labels", "rows": rows.num_rows,
               "seconds": round(time.perf_counter() - t0, 2), "bytes": Path(out).stat().st_size}
    Path(out).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary
