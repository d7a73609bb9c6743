"""``transact bench train``: training throughput of the old and the new training path, paired
in one run, with FLOPs per example and the share of a GEMM peak measured in the same run.

For each (model, batch size) one net per path is built from the same seed and trained on
the same synthetic batch of the default feature contract (|S_all| = 192), held on the
device, so the number is the model's, not the data loader's. Paths:

- ``stock``: the encoder as the stock ``nn.TransformerEncoder`` with its boolean mask --
  what training ran before (``--train-encoder stock``);
- ``packed``: the training path now (same weights): the model builds and encodes only the
  valid tokens, attention is causal over each row's packed tokens
  (:mod:`transact.kernels.pytorch.encoder_train`), fp32 -- the default;
- ``packed-bf16`` (``bf16=True``): the same under bf16 autocast (``--precision bf16``): the
  encoder in bf16, GEMMs on the CPU's matrix units, the attention backward as blocked GEMMs
  (:mod:`transact.kernels.pytorch.attention_train`); not the fp32 loss curve to the bit;
- ``packed-compile`` (``compile=True``): the fp32 step through ``torch.compile``; the first
  step (compilation included, Inductor's on-disk caches off, so a cold compile) is reported
  apart, and a failure is recorded, not raised.

Rounds. Every round times ``steps`` steps of each path in turn, the order reversed every
other round, and one GEMM of each reference size, so that a load change on a shared
machine hits every path alike. Per path: examples/s is the median over rounds; the speed-up
vs ``stock`` is the median of the per-round ratios, with their range. The losses of all
paths are compared step by step (same init, same batch): ``loss_max_diff`` is the largest
difference from ``stock`` over every step run.

FLOPs (:func:`flops_per_example`): 2 x the multiply-adds of every matmul of one example's
forward, from the config, by layer group; a training step counts 3x the forward (backward
~= 2x forward). Attention counts the full L x L products the kernels execute (the causal
mask zeroes half of them), and every slot, padded or not: the FLOPs of the nominal shape,
which the stock path executes; the packed paths execute fewer (``valid_token_fraction`` of the
batch's slots are tokens), so their "achieved" GFLOP/s is nominal work per second. Achieved
GFLOP/s = FLOPs/example x examples/s, and its share of the median GFLOP/s of ``torch.mm`` at
the model's biggest GEMM ([B L, d] x [d, 3d], the QKV projection) and at 2048^3, timed in the
same rounds -- in fp32, and for the bf16 path in bf16 (the matrix units' rate).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import torch

from transact.data.schema import ACTIONS, EMB_DIM
from transact.features.config import SEGMENTS, FeatureConfig
from transact.features.nn_features import valid_mask
from transact.kernels import dispatch
from transact.model.losses import label_weight_matrix, total_loss
from transact.model.transact import ModelConfig, TransActModel, count_parameters, model_config

#: layer groups of :func:`flops_per_example`
FLOP_GROUPS: tuple[str, ...] = ("embed_proj", "attn_qk", "attn_av", "ffn", "dcn", "heads")
#: path name -> (training encoder, autocast bf16, torch.compile)
PATHS: dict[str, tuple[str, bool, bool]] = {
    "stock": ("stock", False, False),
    "packed": ("packed", False, False),
    "packed-bf16": ("packed", True, False),
    "packed-compile": ("packed", False, True),
}
SQUARE_GEMM: int = 2048


def seq_tokens(cfg: ModelConfig, fcfg: FeatureConfig) -> int:
    """L, the encoder's tokens per example (selected slots, +1 for the appended candidate)."""
    if not cfg.has_sequence:
        return 0
    L = sum(fcfg.segment_sizes[SEGMENTS.index(s)] for s in cfg.segments)
    return L + (1 if cfg.fusion == "append" else 0)


def flops_per_example(cfg: ModelConfig, fcfg: FeatureConfig) -> dict[str, int]:
    """Forward FLOPs of one example (2 x multiply-adds of every matmul), by layer group.

    With L tokens, d = d_model, f = ffn_dim, n layers, per layer: QKV and output
    projections 2 L d (3d + d), QK^T and AV 2 L^2 d each, FFN 2 (2 L d f). Plus the action
    embedding (bits [L, A] @ E_act [A, d]), the pooling projection 2 L d d_o, the NAL
    projection 2 r d D and scores 2 (r - 1)(1 + m) D (m negatives), the DCN 2 n0^2 per
    cross layer, and the MLP and heads. Elementwise work (norms, softmax, adds) is not
    counted.
    """
    out = dict.fromkeys(FLOP_GROUPS, 0)
    d, n0 = cfg.d_model, EMB_DIM + cfg.ctx_dim
    L = seq_tokens(cfg, fcfg)
    if L:
        if cfg.action_emb:
            out["embed_proj"] += 2 * L * len(ACTIONS) * d
        out["embed_proj"] += cfg.n_layers * 2 * L * d * (3 * d + d) + 2 * L * d * cfg.seq_out_dim
        out["attn_qk"] = out["attn_av"] = cfg.n_layers * 2 * L * L * d
        out["ffn"] = cfg.n_layers * 2 * (2 * L * d * cfg.ffn_dim)
        n0 += cfg.seq_out_dim * (1 + cfg.first_k)
        if cfg.nal != "none":
            r = fcfg.r
            m = fcfg.k_imp if cfg.nal == "impression" else r
            m = min(m, cfg.nal_negatives) if cfg.nal_negatives else m
            if cfg.nal_projection:
                out["embed_proj"] += 2 * r * d * cfg.nal_dim
            out["heads"] += 2 * max(r - 1, 0) * (1 + m) * cfg.nal_dim
    out["dcn"] = cfg.n_cross * 2 * n0 * n0
    prev = n0
    for h in cfg.mlp_dims:
        out["heads"] += 2 * prev * h
        prev = h
    out["heads"] += 2 * prev * len(cfg.heads)
    return out


def _cold_compile() -> contextlib.AbstractContextManager:
    """Inductor's FX-graph and AOT-autograd caches off: the first compiled step compiles."""
    stack = contextlib.ExitStack()
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        stack.enter_context(inductor_config.patch(fx_graph_cache=False))
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
    except (ImportError, AttributeError):  # another torch: time whatever the first step does
        pass
    return stack


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _gemm_gflops(m: int, k: int, n: int, dev: torch.device, repeats: int = 3,
                 dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of ``torch.mm`` of [m, k] x [k, n] in ``dtype`` (one untimed call first)."""
    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(k, n, device=dev, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def _make_step(net: TransActModel, batch, mcfg: ModelConfig, fcfg: FeatureConfig, M: torch.Tensor,
               dev: torch.device, path: str) -> Callable[[], float]:
    encoder, bf16, compiled = PATHS[path]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def loss_of(n: TransActModel) -> torch.Tensor:
        return total_loss(n(batch), batch, mcfg, fcfg, M)[0]

    loss_fn = torch.compile(loss_of) if compiled else loss_of

    def step() -> float:
        with dispatch.using(train_encoder=encoder), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def rows_batch(rows: str | Path, batch_size: int, seed: int = 0) -> tuple[pa.Table, FeatureConfig]:
    """``batch_size`` rows drawn at random (seeded) from row groups picked at random across a
    logged row file or folder until they hold 8x as many (early row groups alone are not
    typical: in the demo world's rows they hold shorter histories), and the rows' feature
    config."""
    import numpy as np
    import pyarrow.parquet as pq

    from transact.model.dataset import read_feature_config, row_files

    rng = np.random.default_rng(seed)
    files = [pq.ParquetFile(f) for f in row_files(rows)]
    groups = [(fi, rg) for fi, pf in enumerate(files) for rg in range(pf.num_row_groups)]
    parts, n = [], 0
    for i in rng.permutation(len(groups)):
        fi, rg = groups[i]
        parts.append(files[fi].read_row_group(rg))
        n += parts[-1].num_rows
        if n >= 8 * batch_size:
            break
    table = pa.concat_tables(parts)
    if table.num_rows < batch_size:
        raise ValueError(f"{rows}: {table.num_rows} rows, fewer than the batch size {batch_size}")
    pick = np.sort(rng.choice(table.num_rows, batch_size, replace=False))
    return table.take(pa.array(pick)), read_feature_config(rows)


def bench_train(models: tuple[str, ...] | list[str] = ("v2",), batch_sizes: tuple[int, ...] | list[int] = (256,),
                steps: int = 5, warmup: int = 3, device: str | None = None, num_threads: int | None = None,
                seed: int = 0, rounds: int = 5, bf16: bool = False, compile: bool = False,
                rows: str | Path | None = None) -> dict:
    """Paired training throughput of the paths (see the module docstring) per (model, batch size).

    ``steps`` timed steps per path and round, ``rounds`` rounds, ``warmup`` untimed steps
    per path first; on synthetic rows of the default feature contract, or on a batch drawn
    from ``rows`` (logged rows: the valid-token share of real histories). Peak memory: the
    process's peak RSS on CPU (one process for all paths), ``torch.cuda.max_memory_allocated``
    during each path's steps on CUDA.
    """
    from transact.bench.machine import device_label, machine_info, peak_rss_mib
    from transact.components.procmem import reset_peak_rss
    from transact.model.dataset import read_feature_config, synthetic_rows, table_to_batch

    if num_threads:
        torch.set_num_threads(num_threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fcfg = FeatureConfig() if rows is None else read_feature_config(rows)
    paths = ["stock", "packed"] + (["packed-bf16"] if bf16 else []) + (["packed-compile"] if compile else [])
    reset = reset_peak_rss() if dev.type == "cpu" else False
    results: list[dict] = []
    per_model: dict[str, dict] = {}
    for name in models:
        mcfg = model_config(name)
        flops = flops_per_example(mcfg, fcfg)
        train_flops = 3 * sum(flops.values())
        per_model[name] = {"forward_flops_per_example": flops, "train_flops_per_example": train_flops,
                           "tokens_per_example": seq_tokens(mcfg, fcfg)}
        for bs in batch_sizes:
            if rows is None:
                table = synthetic_rows(max(1, -(-bs // 8)), fcfg, per_request=8, seed=seed).slice(0, bs)
            else:
                table = rows_batch(rows, bs, seed)[0]
            batch = table_to_batch(table, fcfg).to(dev)
            B = len(batch)
            valid_fraction = float(valid_mask(batch.seg_len, fcfg).float().mean())
            M = label_weight_matrix(mcfg).to(dev)
            L = seq_tokens(mcfg, fcfg)
            rep = (B * L, mcfg.d_model, 3 * mcfg.d_model) if L else (B, EMB_DIM + mcfg.ctx_dim, EMB_DIM + mcfg.ctx_dim)
            runs: dict[str, dict] = {}
            for path in paths:
                torch.manual_seed(seed)
                net = TransActModel(mcfg, fcfg).to(dev).train()
                runs[path] = {"step": _make_step(net, batch, mcfg, fcfg, M, dev, path), "net": net,
                              "losses": [], "times": [], "peak": 0.0}
                t0 = time.perf_counter()
                try:
                    with _cold_compile() if PATHS[path][2] else contextlib.nullcontext():
                        runs[path]["losses"].append(runs[path]["step"]())
                    _sync(dev)
                except Exception as e:  # torch.compile may fail on a machine: report it, go on
                    if not PATHS[path][2]:
                        raise
                    runs[path] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    continue
                runs[path]["first_step_s"] = time.perf_counter() - t0
                for _ in range(max(warmup - 1, 0)):
                    runs[path]["losses"].append(runs[path]["step"]())
            live = [p for p in paths if "error" not in runs[p]]
            gemm_rep, gemm_sq, gemm_rep16, gemm_sq16 = [], [], [], []
            for r in range(max(rounds, 1)):
                for path in (live if r % 2 == 0 else live[::-1]):
                    run = runs[path]
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    _sync(dev)
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        run["losses"].append(run["step"]())
                    _sync(dev)
                    run["times"].append(time.perf_counter() - t0)
                    if dev.type == "cuda":
                        run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated(dev) / 2**20)
                gemm_rep.append(_gemm_gflops(*rep, dev))
                gemm_sq.append(_gemm_gflops(SQUARE_GEMM, SQUARE_GEMM, SQUARE_GEMM, dev, repeats=1))
                if bf16:
                    gemm_rep16.append(_gemm_gflops(*rep, dev, dtype=torch.bfloat16))
                    gemm_sq16.append(_gemm_gflops(SQUARE_GEMM, SQUARE_GEMM, SQUARE_GEMM, dev, repeats=1,
                                                  dtype=torch.bfloat16))
            rep_peak, sq_peak = statistics.median(gemm_rep), statistics.median(gemm_sq)
            rep16 = statistics.median(gemm_rep16) if gemm_rep16 else None
            sq16 = statistics.median(gemm_sq16) if gemm_sq16 else None
            base = runs["stock"]
            for path in paths:
                run = runs[path]
                rec = {"model": name, "batch_size": B, "path": path}
                if "error" in run:
                    results.append({**rec, "error": run["error"]})
                    continue
                ex_s = [B * steps / t for t in run["times"]]
                ratios = [b / t for b, t in zip(base["times"], run["times"])]
                eps = statistics.median(ex_s)
                gflops = train_flops * eps / 1e9
                half = PATHS[path][1] and rep16 is not None and sq16 is not None
                peak_rep, peak_sq = (rep16, sq16) if half else (rep_peak, sq_peak)
                n = min(len(run["losses"]), len(base["losses"]))
                rec.update({
                    "steps": steps, "rounds": len(run["times"]),
                    "examples_per_s": round(eps, 1),
                    "examples_per_s_range": [round(min(ex_s), 1), round(max(ex_s), 1)],
                    "step_ms": round(1000 * B / eps, 2),
                    "speedup_vs_stock": round(statistics.median(ratios), 3),
                    "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
                    "gflops": round(gflops, 2),
                    "gemm_dtype": "bf16" if half else "fp32",
                    "share_of_gemm_rep": round(gflops / peak_rep, 3),
                    "share_of_gemm_square": round(gflops / peak_sq, 3),
                    "loss_max_diff": max(abs(a - b) for a, b in zip(run["losses"][:n], base["losses"][:n])),
                    "first_step_s": round(run["first_step_s"], 2),
                    "parameters": count_parameters(run["net"]),
                })
                if dev.type == "cuda":
                    rec["peak_mem_mb"] = round(run["peak"], 1)
                    rec["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
                results.append(rec)
            per_model[name].setdefault("gemm", []).append({
                "batch_size": B, "valid_token_fraction": round(valid_fraction, 3),
                "rep_shape": list(rep), "rep_gflops": round(rep_peak, 1),
                "square_shape": [SQUARE_GEMM] * 3, "square_gflops": round(sq_peak, 1),
                **({"rep_gflops_bf16": round(rep16, 1), "square_gflops_bf16": round(sq16, 1)}
                   if rep16 is not None and sq16 is not None else {})})
            del runs, batch  # free before the next configuration
    peak = None
    if dev.type == "cpu":
        peak = {"peak_mem_mb": round(peak_rss_mib(), 1),
                "peak_mem_kind": "process peak RSS, all paths" + ("" if reset else " (not reset at start)")}
    return {"benchmark": "train", "device": device_label(), "torch_device": str(dev),
            "threads": torch.get_num_threads(), "feature_config": fcfg.to_dict(),
            "rows": str(rows) if rows is not None else "synthetic (model.dataset.synthetic_rows)",
            "paths": paths, "models": per_model, "memory": peak, "machine": machine_info(), "results": results}


def format_bench(result: dict) -> str:
    from transact.bench.report import format_table

    fc = result["feature_config"]
    S = fc["k_ll"] + fc["k_rt"] + fc["r"] + fc["k_imp"]
    rows = []
    for r in result["results"]:
        if "error" in r:
            rows.append({"model": r["model"], "batch": r["batch_size"], "path": r["path"], "ex/s": r["error"]})
            continue
        rows.append({
            "model": r["model"], "batch": r["batch_size"], "path": r["path"],
            "ex/s": f"{r['examples_per_s']:.0f}", "ex/s range": "{:.0f}-{:.0f}".format(*r["examples_per_s_range"]),
            "step ms": f"{r['step_ms']:.1f}", "x stock": f"{r['speedup_vs_stock']:.2f}",
            "x range": "{:.2f}-{:.2f}".format(*r["speedup_range"]),
            "GFLOP/s": f"{r['gflops']:.1f}", "% GEMM": f"{100 * r['share_of_gemm_rep']:.0f}%",
            "% 2048^3": f"{100 * r['share_of_gemm_square']:.0f}%", "GEMM dtype": r["gemm_dtype"],
            "loss diff": f"{r['loss_max_diff']:.1e}", "1st step s": f"{r['first_step_s']:.2f}"})
    lines = [f"training throughput on {result['device']} ({result['threads']} threads), |S_all| = {S}, "
             f"rows: {result.get('rows', 'synthetic')}; paths alternated in each round; "
             f"x stock: median [range] of per-round ratios",
             format_table(rows)]
    for name, m in result["models"].items():
        f = m["forward_flops_per_example"]
        lines.append(f"{name}: {m['train_flops_per_example'] / 1e6:.1f} MFLOP per example per training step "
                     f"(3 x forward; forward MFLOP: " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in f.items()) + ")")
        for g in m.get("gemm", []):
            lines.append(f"  GEMM reference, batch {g['batch_size']}: torch.mm {'x'.join(map(str, g['rep_shape']))} "
                         f"{g['rep_gflops']:.1f} GFLOP/s, {SQUARE_GEMM}^3 {g['square_gflops']:.1f} GFLOP/s (fp32)"
                         + (f"; bf16 {g['rep_gflops_bf16']:.1f} / {g['square_gflops_bf16']:.1f} GFLOP/s"
                            if "rep_gflops_bf16" in g else "")
                         + f"; {100 * g['valid_token_fraction']:.0f}% of the batch's slots are tokens")
    if result.get("memory"):
        lines.append(f"peak memory: {result['memory']['peak_mem_mb']:.0f} MB ({result['memory']['peak_mem_kind']})")
    return "\n".join(lines)
