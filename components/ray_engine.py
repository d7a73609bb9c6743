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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeGuard

import numpy as np
import pyarrow as pa

from transact.components.procmem import reset_peak_rss, rss_mib
from transact.data import schema as S
from transact.data.io import conform, read_table, table_path
from transact.data.partition import filter_in, publishing_folder, read_bucket, read_row_groups, row_group_chunks, write_buckets
from transact.data.requests import sorted_requests
from transact.data.world import check_world
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
    except ray.exceptions.RayTaskError as e:
        for r in refs:  # the others stop; every task has ended before its staging folder goes
            ray.cancel(r)
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        if isinstance(e.cause, Exception):
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
        write_buckets(t, "user_id", n, Path(shuffle) / table, f"c{chunk:05d}")
        if table == "requests":
            write_buckets(t.select(REQUEST_KEY.names), "request_id", n, Path(shuffle) / "request_ids",
                          f"c{chunk:05d}")
        stats["rows"] = t.num_rows
    return stats


def _map_by_request(path: str, groups: list[int] | None, what: str, n: int, shuffle: str, chunk: int) -> dict:
    """Served rows (a whole served-log file) or labelled requests -> parts by request_id."""
    import pyarrow.parquet as pq

    stats: dict = {"table": what, "chunk": chunk}
    with _measured(stats):
        t = pq.read_table(path) if groups is None else read_row_groups(path, groups)
        write_buckets(t, "request_id", n, Path(shuffle) / what, f"c{chunk:05d}")
        stats["rows"] = t.num_rows
    return stats


def _map_world_tables(world: Path, tables: tuple[str, ...], n: int, shuffle: Path, chunk_rows: int) -> list:
    task = _remote(_map_table)
    return [task.remote(str(table_path(world, name)), groups, name, n, str(shuffle), c)
            for name in tables for c, groups in enumerate(row_group_chunks(table_path(world, name), chunk_rows))]


# ----------------------------------------------------------------------------- log-nn
def _reduce_log_nn(shuffle: str, part: int, items_path: str, out: str, schema: pa.Schema,
                   cfg: FeatureConfig, batch_requests: int) -> dict:
    """The NN rows of one part's users, built by the local engine's own functions."""
    from transact.features.nn_logging import write_nn_rows
    from transact.features.sequences import EventStore

    stats: dict = {"part": part}
    with _measured(stats):
        sh = Path(shuffle)
        sorted_requests(read_bucket(sh / "request_ids", part, REQUEST_KEY))  # one user, one ts per request
        actions = read_bucket(sh / "actions", part, S.ACTIONS_TABLE)
        impressions = read_bucket(sh / "impressions", part, S.IMPRESSIONS)
        requests = read_bucket(sh / "requests", part, S.REQUESTS)
        ids = np.concatenate([t.column("item_id").to_numpy() for t in (actions, impressions, requests)])
        items = conform(filter_in(items_path, "item_id", ids), S.ITEMS, what="items")
        store = EventStore(items, actions, impressions, cfg)
        rows, n_req = write_nn_rows(store, requests, out, schema, cfg, batch_requests, num_threads=1)
        stats.update(rows=rows, requests=n_req, events=actions.num_rows + impressions.num_rows,
                     items=items.num_rows)
    return stats


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def log_nn_ray(world: str | Path, out: str | Path, cfg: FeatureConfig | None = None,
               partitions: int | None = None, batch_requests: int = 256,
               chunk_rows: int = CHUNK_ROWS) -> dict:
    """The NN rows of ``world`` as a folder ``out`` of ``partitions`` parts (default: one per
    cluster CPU), built on the connected Ray (see :func:`ray_session`). Returns the summary
    (also written to ``<out>.json``), with each map and part task's stats."""
    from transact.features.nn_logging import rows_schema

    t0 = time.perf_counter()
    cfg = cfg or FeatureConfig()
    world, out = Path(world).absolute(), Path(out).absolute()
    check_world(world, S.TABLES)  # a sealed world, never a mix of two
    n = partitions or default_partitions()
    schema = rows_schema(world, cfg)
    with publishing_folder(out) as staging:
        shuffle = staging / SHUFFLE
        maps = _get(_map_world_tables(world, ("actions", "impressions", "requests"), n, shuffle, chunk_rows))
        task = _remote(_reduce_log_nn)
        parts = _get([task.remote(str(shuffle), p, str(table_path(world, "items")), str(staging / part_name(p)),
                                  schema, cfg, batch_requests) for p in range(n)])
        shutil.rmtree(shuffle, ignore_errors=True)
    return _summary(out, "log-nn", n, t0, maps, parts, feature_config=cfg.to_dict())


def _summary(out: Path, step: str, n: int, t0: float, maps: list, parts: list, **extra) -> dict:
    summary = {
        "path": str(out),
        "engine": "ray",
        "step": step,
        "partitions": n,
        "rows": sum(p["rows"] for p in parts),
        "requests": sum(p.get("requests", 0) for p in parts),
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes": sum(f.stat().st_size for f in out.glob("*.parquet")),
        "peak_rss_mib": {"map": max((m["peak_rss_mib"] for m in maps), default=None),
                         "part": max((p["peak_rss_mib"] for p in parts), default=None)},
        **extra,
        "map_tasks": maps,
        "parts": parts,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


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
        world, out = Path(world).absolute(), Path(out).absolute()
        argv = ["log-nn", "--engine", "ray", "--world", str(world), "--out", str(out), "--no-progress",
                "--batch-requests", str(batch_requests), "--feature-config", json.dumps(cfg.to_dict())]
        job = submit_job(address, argv + (["--partitions", str(partitions)] if partitions else []))
        return {**json.loads(out.with_suffix(".json").read_text()), "job": job["job"]}
    with ray_session(address):
        return log_nn_ray(world, out, cfg, partitions, batch_requests)


# ----------------------------------------------------------------------------- attach-labels
def _reduce_attach(shuffle: str, part: int, out: str, served_schema: pa.Schema, cfg: FeatureConfig) -> dict:
    from transact.data.io import write_table
    from transact.features.nn_features import nn_rows_schema
    from transact.serving.served_log import attach_labels

    stats: dict = {"part": part}
    with _measured(stats):
        served = read_bucket(Path(shuffle) / "served", part, served_schema)
        labels = read_bucket(Path(shuffle) / "labels", part, S.REQUESTS)
        rows = attach_labels(served, labels, cfg)
        write_table(out, rows, nn_rows_schema(cfg))
        stats.update(rows=rows.num_rows, served=served.num_rows, labels=labels.num_rows)
    return stats


def served_files(served: str | Path) -> list[Path]:
    """The served-log files of a folder (the files :func:`read_served_log` reads)."""
    served = Path(served)
    files = sorted(served.rglob("served-*.parquet")) if served.is_dir() else [served]  # shipped logs: one folder a server
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{served}: no served-*.parquet files")
    return files


def attach_labels_ray(served: str | Path, world: str | Path, out: str | Path, partitions: int | None = None,
                      cfg: FeatureConfig | None = None, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Training rows from a served log and a world's labelled requests, as a folder ``out``
    of parts (by request_id); their union is :func:`attach_labels` of the whole log."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    world, out = Path(world).absolute(), Path(out).absolute()
    files = [f.absolute() for f in served_files(served)]
    served_schema = pq.read_schema(files[0])
    if cfg is None:
        raw = (served_schema.metadata or {}).get(b"feature_config")
        if raw is None:
            raise ValueError(f"{files[0]}: no feature_config metadata (not a served log?)")
        cfg = FeatureConfig.from_dict(json.loads(raw))
    check_world(world, ("requests",))
    requests = table_path(world, "requests")
    n = partitions or default_partitions()
    with publishing_folder(out) as staging:
        shuffle = staging / SHUFFLE
        task = _remote(_map_by_request)
        refs = [task.remote(str(f), None, "served", n, str(shuffle), c) for c, f in enumerate(files)]
        refs += [task.remote(str(requests), g, "labels", n, str(shuffle), c)
                 for c, g in enumerate(row_group_chunks(requests, chunk_rows))]
        maps = _get(refs)
        reduce = _remote(_reduce_attach)
        parts = _get([reduce.remote(str(shuffle), p, str(staging / part_name(p)), served_schema, cfg)
                      for p in range(n)])
        shutil.rmtree(shuffle, ignore_errors=True)
    return _summary(out, "attach-labels", n, t0, maps, parts, feature_config=cfg.to_dict())


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
