"""SKUT (single kernel unified transformer) against the PyTorch encoder (paper §3.4.2).

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported). On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/kernels/`` runs
the compiled kernel on CUDA (the CPU cases then skip: compiled kernels need CUDA tensors).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from helpers import KERNEL_DEVICES as DEVICES, aot_compile_in_subprocess, ptxas_available, random_encoder, valid_pattern
from transact.kernels import dispatch
from transact.kernels.pytorch.encoder import encoder_reference
from transact.kernels.triton.skut import cached_weights, skut_forward, unsupported_reason
from transact.model.encoder import make_encoder

#: max |SKUT - fp32 reference| per input dtype (outputs are LayerNorm'd, O(1)).
ATOL = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}

KERNEL_MODULE = "transact.kernels.triton.skut"  # aot_compile() lives here


def check(enc, x, valid, device, dtype=torch.float32, **kw):
    with torch.no_grad():
        ref = encoder_reference(enc, x, valid)  # fp32 on CPU
        enc_d = copy.deepcopy(enc).to(device)
        out = skut_forward(enc_d, x.to(device=device, dtype=dtype), valid.to(device), **kw)
    assert out.shape == x.shape and out.dtype == dtype and out.device.type == device
    torch.testing.assert_close(out.float().cpu(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3),
       S=st.one_of(st.sampled_from([1, 15, 16, 17, 32, 33]), st.integers(1, 70)),
       kind=st.sampled_from(["random", "suffix", "mixed"]), block=st.sampled_from([16, 32]),
       mode=st.sampled_from(["fused", "per_layer"]))
def test_matches_reference(device, seed, B, S, kind, block, mode):
    rng = np.random.default_rng(seed)  # fresh random weights and inputs per example
    enc = random_encoder(seed % 2**31)
    x = torch.from_numpy(rng.normal(size=(B, S, 64)).astype(np.float32))
    check(enc, x, valid_pattern(rng, B, S, kind), device, block=block, mode=mode)


# bf16 runs on CUDA only: the Triton interpreter has no bf16.
@pytest.mark.parametrize(("device", "dtype"), [
    pytest.param(d.values[0], t, marks=d.marks) for d in DEVICES for t in (torch.float16, torch.bfloat16)
    if not (t == torch.bfloat16 and d.values[0] == "cpu")])
def test_half_precision(device, dtype):
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.normal(size=(3, 40, 64)).astype(np.float32))
    for mode in ("fused", "per_layer"):
        check(random_encoder(4), x, valid_pattern(rng, 3, 40, "mixed"), device, dtype, block=16, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
def test_default_block_and_layer_counts(device):
    """The serving block (64) over S = 130 (3 blocks, the last partial), and 1- and
    3-layer encoders (in-place update across an odd number of layers, ping-pong buffers)."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(2, 130, 64)).astype(np.float32))
    valid = valid_pattern(rng, 2, 130, "mixed")
    for n_layers in (1, 3):
        for mode in ("fused", "per_layer"):
            check(random_encoder(n_layers, n_layers=n_layers), x, valid, device, mode=mode)
    check(random_encoder(0), x, valid, device, mode="auto")


@pytest.mark.parametrize("device", DEVICES)
def test_final_norm_and_empty_shapes(device):
    enc = random_encoder(5)
    enc.norm = nn.LayerNorm(64)  # TransformerEncoder's optional final norm
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(2, 20, 64)).astype(np.float32))
    check(enc.eval(), x, valid_pattern(rng, 2, 20, "random"), device, block=16)
    for shape in ((0, 5, 64), (2, 0, 64)):
        out = skut_forward(enc.to(device), torch.zeros(shape, device=device), torch.zeros(shape[:2], dtype=torch.bool,
                                                                                   device=device))
        assert out.shape == shape


@pytest.mark.parametrize("device", DEVICES)  # it launches the kernel: interpreter or GPU
def test_weight_cache_follows_parameter_updates(device):
    enc = random_encoder(8).to(device)
    w1 = cached_weights(enc, torch.float32, device)
    assert cached_weights(enc, torch.float32, device) is w1  # a hit: no re-folding
    x = torch.randn(1, 17, 64, device=device)
    valid = torch.ones(1, 17, dtype=torch.bool, device=device)
    with torch.no_grad():
        before = skut_forward(enc, x, valid, block=16)
        enc.layers[1].norm2.bias.add_(1.0)  # an in-place update bumps the parameter's version
        after = skut_forward(enc, x, valid, block=16)
        ref = encoder_reference(enc, x, valid)
    assert cached_weights(enc, torch.float32, device) is not w1
    torch.testing.assert_close(after, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(before, after)


def test_unsupported_encoders_fall_back_to_pytorch():
    enc = make_encoder(n_heads=2).eval()
    assert "heads" in unsupported_reason(enc)
    assert "training" in unsupported_reason(make_encoder())
    x, valid = torch.randn(2, 9, 64), torch.rand(2, 9) < 0.5
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = skut_forward(enc, x, valid)
    assert any("falls back" in str(w.message) for w in caught)
    with torch.no_grad():
        torch.testing.assert_close(out, encoder_reference(enc, x, valid))
    with pytest.raises(ValueError, match="block"):
        skut_forward(random_encoder(0), x, valid, block=24)
    with pytest.raises(ValueError, match="mode"):
        skut_forward(random_encoder(0), x, valid, mode="bogus")


def test_dispatcher_never_runs_skut_on_cpu(monkeypatch):
    import transact.kernels.triton.skut as skut_mod

    def boom(*a, **kw):
        raise AssertionError("SKUT must not run on CPU tensors")

    monkeypatch.setattr(skut_mod, "skut_forward", boom)
    enc = random_encoder(1)
    x, valid = torch.randn(2, 12, 64), torch.rand(2, 12) < 0.5
    with torch.no_grad():
        out = dispatch.encoder_forward(enc, x, valid)
    torch.testing.assert_close(out[valid], encoder_reference(enc, x, valid)[valid])


@pytest.mark.skipif(not ptxas_available(), reason="triton's bundled ptxas not found")
def test_kernel_compiles_for_gpus():
    """Lowers SKUT to a cubin for sm_90 (H100) without a GPU, both modes, fp16 and bf16:
    catches code the interpreter accepts but the compiler does not."""
    aot_compile_in_subprocess(KERNEL_MODULE, [
        dict(cc=90, dtype="fp16", mode="fused", num_warps=8),
        dict(cc=90, dtype="fp16", mode="per_layer", num_warps=8),
        dict(cc=90, dtype="bf16", mode="fused", num_warps=8)])


@pytest.mark.slow
@pytest.mark.skipif(not ptxas_available(), reason="triton's bundled ptxas not found")
def test_kernel_compiles_for_gpus_all_builds():
    """sm_86 (A10G, the paper's GPU) and sm_90, every dtype (fp32: no-tf32 dots), both
    modes, 32- and 64-blocks."""
    aot_compile_in_subprocess(KERNEL_MODULE, [
        dict(cc=cc, dtype=dt, mode=m, block=b, num_warps=8 if b >= 64 or dt == "fp32" else 4)
        for cc in (86, 90) for dt in ("fp16", "bf16", "fp32") for m in ("fused", "per_layer") for b in (32, 64)])


def test_benchmark_cpu_path(tmp_path):
    """The benchmark's CPU path at a tiny size: rows with the expected keys, JSON naming
    the machine (no timing assertions)."""
    from transact.bench.report import write_json
    from transact.bench.skut import bench_skut

    result = bench_skut(table="both", lengths=(16, 24), batch=2, batches=(1, 3), length=16, repeats=1,
                        warmup=0, device="cpu")
    assert result["benchmark"] == "skut" and result["gpu"] is False
    assert any("need a GPU" in n for n in result["notes"])
    assert [(r["table"], r["batch"], r["seq_len"]) for r in result["rows"]] == [
        ("5", 2, 16), ("5", 2, 24), ("8", 1, 16), ("8", 3, 16)]
    for row in result["rows"]:
        assert {"table", "batch", "seq_len", "impl", "latency_ms", "peak_mem_mib",
                "latency_vs_mem_efficient_pct", "memory_vs_mem_efficient_pct"} <= set(row)
        assert row["impl"] == "pytorch_eager" and row["latency_ms"] > 0
    data = json.loads(write_json(tmp_path / "skut.json", result).read_text())
    assert data["machine"]["hostname"] and data["machine"]["cpu_count"] >= 1


def test_bench_commands_on_cpu(tmp_path):
    """``transact bench nn-search`` / ``skut`` print a table, say GPU figures need a GPU,
    and write JSON (a private app: the real CLI also loads the other areas' commands)."""
    import typer
    from typer.testing import CliRunner

    from transact.commands.kernels import register

    app, bench_app = typer.Typer(), typer.Typer()
    app.add_typer(bench_app, name="bench")
    register(app, bench_app)
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "skut", "--out", str(tmp_path / "s.json"), "--table", "8",
                            "--batches", "2", "--length", "16", "--repeats", "1", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    assert "need a GPU" in r.output and "pytorch_eager" in r.output
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["batch"] == 2
    r = runner.invoke(app, ["bench", "nn-search", "--out", str(tmp_path / "n.json"), "--lengths", "50",
                            "--n-cand", "4", "--k", "8", "--repeats", "1", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "n.json").read_text())["params"]["lengths"] == [50]
    r = runner.invoke(app, ["bench", "skut", "--lengths", "64,x"])
    assert r.exit_code == 2 and "comma-separated" in r.output
