"""``bench/gpu-check.sh``, the one command for a lent GPU machine: its plumbing, on CPU.

Without a GPU it refuses to run (exit 1); with ``GPU_CHECK_ON_CPU=1`` it runs every step
anyway -- installs the package without dependencies into a scratch folder, runs the CUDA
test files with compiled kernels (their CUDA cases skip here), and the two kernel
benchmarks -- so a GPU session does not spend its minutes on a broken script.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu-check.sh"


def run_script(out: Path, python: str = sys.executable, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.update(PYTHON=python, **env)
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=e, capture_output=True, text=True)


def fake_python(tmp_path: Path, gpu: bool, hang: bool = True) -> str:
    """A $PYTHON whose pytest step hangs (``hang``: killed only by the step's limit) or
    passes, whose pip and benchmarks succeed at once, and which reports a GPU or not; the
    rest is the real one."""
    shim = tmp_path / "python"
    shim.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *cuda.is_available*) exit {0 if gpu else 1} ;;
  *"-m pytest"*) {"exec sleep 600" if hang else "exit 0"} ;;
  *"-m pip"*|*"transact.cli bench"*) exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    shim.chmod(0o755)
    return str(shim)


def test_cpu_dry_run_takes_its_step_limit_from_the_environment(tmp_path):
    """Issue 16: the CPU dry run failed when a loaded machine took longer than the GPU
    budget's 300 s for the tests. GPU_CHECK_STEP_LIMIT_S replaces the limits there: here a
    1 s limit must stop the hanging test step (with the 300 s default it would hang)."""
    out = tmp_path / "out"
    r = run_script(out, fake_python(tmp_path, gpu=False), GPU_CHECK_ON_CPU="1", GPU_CHECK_STEP_LIMIT_S="1")
    log = (out / "gpu-check.log").read_text()
    assert r.returncode == 1 and "== cuda-tests (limit 1s)" in log and "== cuda-tests: exit 124" in log, log
    assert "== bench-skut: exit 0" in log  # a failed step does not stop the next


def test_step_limit_override_is_ignored_with_a_gpu(tmp_path):
    out = tmp_path / "out"
    r = run_script(out, fake_python(tmp_path, gpu=True, hang=False), GPU_CHECK_STEP_LIMIT_S="1")
    log = (out / "gpu-check.log").read_text()
    assert r.returncode == 0 and "GPU_CHECK_STEP_LIMIT_S ignored" in log, log
    limits = (("install", 60), ("cuda-tests", 260), ("bench-nn-search", 80), ("bench-skut", 110), ("bench-train", 60))
    assert sum(limit for _, limit in limits) <= 570  # 9.5 minutes inside a 10-minute command
    for step, limit in limits:
        assert f"== {step} (limit {limit}s)" in log, step


def test_step_limit_override_must_be_whole_seconds(tmp_path):
    r = run_script(tmp_path / "out", fake_python(tmp_path, gpu=False), GPU_CHECK_ON_CPU="1",
                   GPU_CHECK_STEP_LIMIT_S="5m")
    assert r.returncode == 2 and "GPU_CHECK_STEP_LIMIT_S must be a whole number" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run the script itself")
def test_refuses_without_a_gpu(tmp_path):
    r = run_script(tmp_path / "out")
    assert r.returncode == 1 and "no CUDA GPU" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run the script itself")
def test_every_step_runs_on_cpu_when_asked(tmp_path):
    out = tmp_path / "out"
    # no step limits: a dry run on a loaded machine may take longer than the GPU budget
    r = run_script(out, GPU_CHECK_ON_CPU="1", GPU_CHECK_STEP_LIMIT_S="0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    log = (out / "gpu-check.log").read_text()
    for step in ("install", "cuda-tests", "bench-nn-search", "bench-skut", "bench-train"):
        assert f"== {step}: exit 0" in log, step
    assert "plumbing check passed" in log
    junit = (out / "gpu-tests.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit
    assert "test_serving_cuda" in junit  # the serving path's GPU tests were collected
    for name in ("nn-search", "skut"):
        data = json.loads((out / f"{name}-cpu.json").read_text())
        assert data["rows"] and "machine" in data
    train = json.loads((out / "train-cpu.json").read_text())
    assert [r["path"] for r in train["results"]] == ["stock", "packed", "packed-bf16"] and "machine" in train
