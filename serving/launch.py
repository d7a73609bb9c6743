"""Starting and stopping a real service process (``transact serve``, tests, the benchmark).

:func:`running_server` puts the :class:`ServeSettings` into the environment (every other
``TRANSACT_*`` variable is cleared, so nothing leaks in from the caller), starts
``bentoml.serve`` on 127.0.0.1 and a free port, waits for ``/readyz`` and yields the
base URL; on exit the server is stopped and the environment restored. Stopping it
runs the service's shutdown hook, which flushes the served log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import socket
import sys
import time
from typing import Iterator

from transact.serving.settings import ServeSettings

SERVICE = "transact.serving.service:TransActRanker"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service_env(settings: ServeSettings, bentoml_home: str | None = None) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for k in list(os.environ):
            if k.startswith("TRANSACT_"):
                del os.environ[k]
        os.environ.update(settings.to_env())
        os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
        # OpenMP keeps its default wait policy (spin briefly, then sleep): forcing PASSIVE
        # made every parallel region pay a wake-up, ~20% of the bench forward on 2 dedicated
        # cores. On cores shared with other busy processes PASSIVE is the safer choice (a
        # spinning thread waiting for a descheduled peer): export OMP_WAIT_POLICY=PASSIVE
        # and the service inherits it.
        if bentoml_home:
            os.environ["BENTOML_HOME"] = str(bentoml_home)
        with own_metrics_dir(settings, bentoml_home):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def own_metrics_dir(settings: ServeSettings, bentoml_home: str | None = None) -> Iterator[str]:
    """Gives this server a Prometheus multiprocess folder of its own.

    BentoML keeps every server's metric files in one folder per home
    (``$BENTOML_HOME/prometheus_multiproc_dir``) and empties it whenever a server starts:
    a second server (or a restarted one) under the same home silently erased the first
    one's files, whose ``/metrics`` then answered 200 with an empty body for the rest of
    its life. One folder per bound address ends that (a server restarted on the same
    address starts from zero, as Prometheus counters may).
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    home = bentoml_home or BentoMLContainer.bentoml_home.get()
    path = os.path.join(str(home), "prometheus_multiproc_dir", f"{settings.host}-{settings.port}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    provider = BentoMLContainer.prometheus_multiproc_dir
    saved = provider._override  # simple_di keeps the override here
    provider.set(path)
    try:
        yield path
    finally:
        provider._override = saved


def check_config(settings: ServeSettings) -> None:
    """What a worker needs, checked before a server starts: one-line ValueError naming
    the setting. The model is in the BentoML store; exactly one sequence source is set;
    a world folder is a sealed world (its manifest and tables agree); a Feast repo has
    its ``feature_store.yaml``."""
    from pathlib import Path

    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        bentoml.models.get(settings.model_tag)
    except BentoMLException as e:
        raise ValueError(f"model {settings.model_tag!r}: {e} -- put one there with `transact package "
                         f"--model-dir <trained model>` (BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')})") from None
    if settings.world and settings.feast_repo:
        raise ValueError("--world and --feast-repo: give one sequence source, not both")
    if settings.world:
        from transact.data.world import check_world

        try:
            check_world(settings.world, ("items", "actions", "impressions"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--world: {e}") from None
    elif settings.feast_repo:
        if not (Path(settings.feast_repo) / "feature_store.yaml").is_file():
            raise ValueError(f"--feast-repo {settings.feast_repo}: no feature_store.yaml there "
                             "(run `transact features apply --world <world>` first)")
    else:
        raise ValueError("no sequence source: give --world (a world folder) or --feast-repo (a Feast repo)")


def wait_ready(url: str, timeout: float, server=None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last, seen_running = None, False
    while time.monotonic() < deadline:
        if server is not None:  # the arbiter thread starts a moment after serve() returns
            if server.running:
                seen_running = True
            elif seen_running:
                raise RuntimeError(f"the service at {url} exited during start-up (see its log above)")
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.25)
    raise TimeoutError(f"the service at {url} was not ready within {timeout:.0f} s (last: {last})")


@contextlib.contextmanager
def running_server(settings: ServeSettings, bentoml_home: str | None = None,
                   timeout: float = 180.0) -> Iterator[str]:
    """Yields the base URL (``http://127.0.0.1:<port>``) of a started, ready service."""
    import bentoml

    if not settings.port or settings.port == ServeSettings.port:
        settings = dataclasses.replace(settings, port=free_port(settings.host))
    url = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
    # The environment stays set while the server lives: workers may be (re)spawned late.
    with service_env(settings, bentoml_home):
        # bentoml.serve imports the service in this process too; a module imported earlier
        # under other settings would name another model (its class attribute): re-import.
        module = sys.modules.get(SERVICE.split(":")[0])
        if module is not None:
            importlib.reload(module)
        server = bentoml.serve(SERVICE, host=settings.host, port=settings.port, blocking=False)
        try:
            wait_ready(url, timeout, server)
            yield url
        finally:
            server.stop()


def sample_curl(url: str = "http://127.0.0.1:3000", api_key: bool = False) -> str:
    """A curl command that ranks three items for one user: what to try once the service runs."""
    key = " -H 'X-API-Key: $TRANSACT_API_KEY'" if api_key else ""
    return (f"curl -s -X POST {url}/rank -H 'Content-Type: application/json'{key} "
            "-d '{\"user_id\": 42, \"item_ids\": [1, 4, 7], \"surface\": \"homefeed\"}'")
