"""``transact bench serving`` end to end at a tiny size (two real servers: slow)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_serving_bench_small(tmp_path):
    from transact.bench.serving import run_serving_bench

    out = tmp_path / "serving-cpu.json"
    r = run_serving_bench(out, seconds=1, candidates=16, ll=256, rt=40, imp=40, forward_reps=2,
                          min_requests=2, workdir=tmp_path / "work", progress=lambda *_: None)
    assert json.loads(out.read_text())["benchmark"] == "serving"
    assert r["model_forward"]["naive_equals_dedup"] is True
    assert r["model_forward"]["tokens"] == {"ll": 256, "rt": 40, "imp": 40}
    for path in ("dedup", "naive"):
        p = r[path]
        assert p["requests"] >= 2 and p["errors"] == 0 and p["dropped_log_rows"] == 0
        assert p["logged_rows"] >= 16 * p["requests"]
        assert p["server_batches"] == p["requests"] + 2  # its own server's metrics (+2 warm-up)
    assert r["naive"]["h2d_bytes_per_request"] > 10 * r["dedup"]["h2d_bytes_per_request"]
    assert set(r["targets"]) and "cpu_count" in r["machine"]
    f, q = r["model_forward"], r["ratios"]
    # the floor: 2 reps before the load, then 2 after each of the 6 rounds, all kept
    assert len(f["samples_ms"]["nn_search"]) == len(f["samples_ms"]["encoder_heads"]) == f["reps"] == 2 + 6 * 2
    assert f["model_forward_ms_min"] <= f["model_forward_ms_p50"] <= f["model_forward_ms_p99"]
    assert q["dedup_p99_over_model_forward_p99"] == pytest.approx(r["dedup"]["latency_ms_p99"] / f["model_forward_ms_p99"])
    # one paired throughput ratio per round, both paths timed in each
    assert len(r["rounds"]) == 6
    for rnd in r["rounds"]:
        assert rnd["dedup"]["requests"] >= 1 and rnd["naive"]["requests"] >= 1
        assert rnd["throughput_dedup_over_naive"] == pytest.approx(
            rnd["dedup"]["candidates_per_s"] / rnd["naive"]["candidates_per_s"])
    rr = q["throughput_dedup_over_naive_rounds"]
    assert rr["min"] <= rr["median"] <= rr["max"]
    assert sum(rnd["dedup"]["requests"] for rnd in r["rounds"]) == r["dedup"]["requests"]
    v = r["model_forward"]["variants"]
    backends = v["backends"]
    assert {"eager", "eager_chunked", "compile", "compile_chunked"} <= set(backends)
    assert "onnxruntime" in backends
    for name, row in backends.items():
        # every forward must give the eager probabilities (or say why it could not run)
        assert "error" in row or row["max_abs_diff"] < 1e-5, (name, row)
    assert "error" not in backends["eager_chunked"] and "error" not in backends["compile"]
    assert v["encoder"]["cpu_path"]["max_abs_diff_valid"] < 1e-5
    assert v["encoder"]["stock_module"]["ms_p50"] > 0
