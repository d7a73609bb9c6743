"""Test session set-up: the environment every test runs in (shared helpers live in
``tests/helpers.py``; ``pythonpath`` in pyproject.toml puts it on the path)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run in Triton's CPU interpreter
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")


# --- an S3-protocol server on 127.0.0.1 (moto's server mode), one per test session ---------------


@dataclass
class S3:
    """The test session's S3 endpoint: ``env`` is what a process needs to reach it (the standard
    AWS variables, nothing of the project's); :meth:`bucket` makes a fresh empty bucket."""

    endpoint: str
    env: dict
    proc: subprocess.Popen

    def bucket(self) -> str:
        import fsspec

        if self.proc.poll() is not None:  # a test that kills "every child of this process" took it too
            pytest.fail(f"the session's S3 server (pid {self.proc.pid}) has exited ({self.proc.returncode})")
        name = f"t-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3").mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server (``moto[server]``, of the project's test extra) on a free port of 127.0.0.1,
    with the AWS variables set for this test process; stopped at the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3(endpoint=endpoint, env=env, proc=proc)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
