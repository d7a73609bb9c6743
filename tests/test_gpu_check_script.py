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

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu-check.sh"


def run_script(out: Path, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=e, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run the script itself")
def test_refuses_without_a_gpu(tmp_path):
    r = run_script(tmp_path / "out")
    assert r.returncode == 1 and "no CUDA GPU" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run the script itself")
def test_every_step_runs_on_cpu_when_asked(tmp_path):
    out = tmp_path / "out"
    r = run_script(out, GPU_CHECK_ON_CPU="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    log = (out / "gpu-check.log").read_text()
    for step in ("install", "cuda-tests", "bench-nn-search", "bench-skut"):
        assert f"== {step}: exit 0" in log, step
    assert "plumbing check passed" in log
    junit = (out / "gpu-tests.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit
    assert "test_serving_cuda" in junit  # the serving path's GPU tests were collected
    for name in ("nn-search", "skut"):
        data = json.loads((out / f"{name}-cpu.json").read_text())
        assert data["rows"] and "machine" in data
