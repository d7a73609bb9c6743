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
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


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
