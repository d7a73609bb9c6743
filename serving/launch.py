"""Starting and stopping a real service process (``transact serve``, tests, the benchmark).

A server is a child process -- ``python -m bentoml serve transact.serving.service:TransActRanker
--host H --port P``, BentoML's own command -- given an explicit environment
(:func:`server_env`): the caller's, without any ``TRANSACT_*`` variable (nothing leaks in),
plus :meth:`ServeSettings.to_env` and a BentoML home of its own. This process's environment
and modules are never changed. The child is BentoML's arbiter; it spawns the worker that
imports the service and reads its settings (``TransActRanker.__init__``).

:func:`running_server` starts one on 127.0.0.1 and a free port, waits for ``/readyz`` and
yields the base URL; on exit it stops the server: SIGTERM to the arbiter, which stops its
worker gracefully (BentoML's shutdown hook flushes the served log), then waits. The child
leads a process group of its own, so whatever is left of the server after that (a worker
whose arbiter was killed) is ended with the group. :func:`serve_forever` is the same in the
foreground (``transact serve``): Ctrl+C or SIGTERM stops the server that way.

Metrics: BentoML keeps every server's Prometheus multiprocess files in one folder per home
(``$BENTOML_HOME/prometheus_multiproc_dir``) and empties it whenever a server starts: a
second server (or a restarted one) under the same home silently erased the first one's
files, whose ``/metrics`` then answered 200 with an empty body for the rest of its life.
Each server started here therefore runs with a BentoML home of its own,
``<home>/servers/<host>-<port>`` (:func:`server_home`), whose ``models`` folder is a link to
the shared store: the metrics folder is per server through BentoML's own configuration
(``BENTOML_HOME``), nothing of BentoML's is patched. A server restarted on the same address
starts its counters from zero, as Prometheus counters may.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from transact.serving.settings import DEFAULT_HOST, DEFAULT_PORT, ServeSettings

SERVICE = "transact.serving.service:TransActRanker"


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_home(bentoml_home: str | Path, host: str, port: int) -> Path:
    """The BentoML home of the server on ``host:port``: ``<bentoml_home>/servers/<host>-<port>``,
    its ``models`` a link to ``<bentoml_home>/models`` (the model store is shared, the
    Prometheus folder is not)."""
    shared = Path(bentoml_home).expanduser().resolve()
    (shared / "models").mkdir(parents=True, exist_ok=True)
    own = shared / "servers" / f"{host}-{port}"
    own.mkdir(parents=True, exist_ok=True)
    link = own / "models"
    if not link.is_symlink():
        if link.exists():
            link.rmdir()  # BentoML made it empty: the store it stands for is the shared one
        link.symlink_to(shared / "models", target_is_directory=True)
    return own


def server_env(settings: ServeSettings, bentoml_home: str | Path, host: str, port: int,
               base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a server process: ``base`` (default: this process's environment)
    without ``TRANSACT_*`` variables, plus the settings and the server's BentoML home.

    OpenMP keeps its default wait policy (spin briefly, then sleep): forcing PASSIVE made
    every parallel region pay a wake-up, ~20% of the bench forward on 2 dedicated cores.
    On cores shared with other busy processes PASSIVE is the safer choice (a spinning
    thread waiting for a descheduled peer): export OMP_WAIT_POLICY=PASSIVE and the server
    inherits it.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("TRANSACT_")}
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.update(settings.to_env())
    env["BENTOML_HOME"] = str(server_home(bentoml_home, host, port))
    return env


def server_command(host: str, port: int) -> list[str]:
    """BentoML's own command for the service (the child's ``--host/--port`` beat any
    ``BENTOML_HOST/BENTOML_PORT`` it inherits)."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]


class ServerProcess:
    """A server started by :func:`start_server`: its arbiter process and base URL."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM to the arbiter (it stops its worker gracefully: the service's shutdown hook
        runs), wait up to ``timeout`` s, then SIGKILL; what is left of the process group
        (workers of an arbiter that died) is ended too. Returns the arbiter's exit status."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(30)
        self._signal_group(signal.SIGTERM)
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the child leads its own group (start_new_session)


def start_server(settings: ServeSettings, bentoml_home: str | Path | None = None, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, stdout: IO | None = None) -> ServerProcess:
    """Starts the service in a child process (see the module docstring); returns at once."""
    from transact.serving.packaging import default_bentoml_home

    home = Path(bentoml_home) if bentoml_home is not None else default_bentoml_home()
    proc = subprocess.Popen(server_command(host, port), env=server_env(settings, home, host, port),
                            stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None,
                            start_new_session=True)
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return ServerProcess(proc, f"http://{client_host}:{port}")


def check_config(settings: ServeSettings, bentoml_home: str | Path | None = None) -> None:
    """What a worker needs, checked before a server starts: one-line ValueError naming the
    setting. The model is in the BentoML store (this process's); exactly one sequence source
    is set; a world folder is a sealed world (its manifest and tables agree); a Feast repo
    has its ``feature_store.yaml``."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    from transact.serving.packaging import default_bentoml_home

    try:
        bentoml.models.get(settings.model_tag)
    except BentoMLException as e:
        home = bentoml_home if bentoml_home is not None else default_bentoml_home()
        raise ValueError(f"model {settings.model_tag!r}: {e} -- put one there with `transact package "
                         f"--model-dir <trained model>` (BENTOML_HOME={home})") from None
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


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None, probe: str = "/readyz") -> None:
    """Until ``url``'s ``probe`` (``/readyz``; ``/livez``: up, ready or not) answers 200:
    TimeoutError after ``timeout`` s, RuntimeError as soon as the server process ``proc``
    (when given) has exited."""
    import httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service at {url} exited during start-up (status {proc.returncode}; "
                               "see its log above)")
        try:
            r = httpx.get(f"{url}{probe}", timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.25)
    raise TimeoutError(f"the service at {url} did not answer {probe} within {timeout:.0f} s (last: {last})")


@contextlib.contextmanager
def running_server(settings: ServeSettings, bentoml_home: str | Path | None = None, host: str = DEFAULT_HOST,
                   port: int | None = None, timeout: float = 180.0, stdout: IO | None = None) -> Iterator[str]:
    """Yields the base URL (``http://127.0.0.1:<port>``) of a started, ready service; stops it
    on exit. ``port=None``: a free one. ``bentoml_home``: where the model store is (default:
    ``$BENTOML_HOME`` or ~/bentoml)."""
    server = start_server(settings, bentoml_home, host, port or free_port(host), stdout=stdout)
    try:
        wait_ready(server.url, timeout, server.proc)
        yield server.url
    finally:
        server.stop()


def serve_forever(settings: ServeSettings, bentoml_home: str | Path | None = None, host: str = DEFAULT_HOST,
                  port: int = DEFAULT_PORT) -> int:
    """The server in the foreground until it exits, Ctrl+C or SIGTERM (which stop it
    gracefully, flushing the served log); returns its exit status."""
    server = start_server(settings, bentoml_home, host, port)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # SIGHUP too: a closed terminal or ssh session must not leave the server (its own session,
    # so it never sees the terminal's signals) holding the port; and SIGINT set here, not left to
    # Python: a process started in the background of a script inherits SIGINT ignored, and
    # Python keeps it so -- Ctrl+C (or `kill -INT`) then did nothing
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        return server.proc.wait()
    except KeyboardInterrupt:
        return server.stop() or 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()  # always: an arbiter that died alone may leave workers in its group


def sample_curl(url: str = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", api_key: bool = False) -> str:
    """A curl command that ranks three items for one user: what to try once the service runs."""
    key = " -H 'X-API-Key: $TRANSACT_API_KEY'" if api_key else ""
    return (f"curl -s -X POST {url}/rank -H 'Content-Type: application/json'{key} "
            "-d '{\"user_id\": 42, \"item_ids\": [1, 4, 7], \"surface\": \"homefeed\"}'")
