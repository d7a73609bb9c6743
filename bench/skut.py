"""SKUT benchmark in the paper's layouts (§4.4.3 Table 5, appendix B Table 8).

- Table 5: sequence lengths 64..2048 at batch 256;
- Table 8: batch sizes 16..2048 at sequence length 192.

Each shape times, on the encoder of :func:`transact.model.encoder.make_encoder` in eval
mode and the input dtype (fp16 by default), with a random padding pattern:

- ``skut_fused``: one launch, one program per row, all layers (``mode="fused"``);
- ``skut_per_layer``: one launch per layer, one program per (row, query block);
- ``pytorch_mem_efficient``: :func:`transact.kernels.pytorch.encoder.encoder_reference` (the
  stock ``nn.TransformerEncoder`` plus its dense [B, S, S] mask, built inside the timed
  call since serving must build it) under ``sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)``
  -- the paper's baseline;
- ``torch_compile``: ``torch.compile`` of the same module (same mask).

``latency_vs_mem_efficient_pct`` / ``memory_vs_mem_efficient_pct`` are the paper's
"Latency Decrease" / "Memory Decrease" columns (negative = SKUT is better).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from transact.bench.report import pct_change
from transact.bench.timing import GPU_NOTE, time_fn

TABLE5_LENGTHS = (64, 128, 192, 256, 512, 1024, 2048)
TABLE5_BATCH = 256
TABLE8_BATCHES = (16, 32, 64, 128, 256, 512, 1024, 2048)
TABLE8_LENGTH = 192
CPU_TABLE5_LENGTHS, CPU_TABLE5_BATCH = (64, 128), 8
CPU_TABLE8_BATCHES, CPU_TABLE8_LENGTH = (4, 16), 64
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(batch: int, length: int, d_model: int, device, dtype, seed: int = 0):
    """x [B, S, d] and valid [B, S]: each row keeps a random number of its last tokens
    valid (S_all is padded at segment starts), and 1 row in 16 is all padding (cold start)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, d_model, generator=g).to(device=device, dtype=dtype)  # [B, S, d]
    n_valid = torch.randint(0, length + 1, (batch,), generator=g)  # [B]
    n_valid[::16] = 0
    valid = torch.arange(length)[None, :] >= (length - n_valid)[:, None]  # [B, S]
    return x, valid.to(device)


def _shapes(table: str, gpu: bool, lengths, batch, batches, length) -> list[tuple[str, int, int]]:
    shapes = []
    if table in ("5", "both"):
        ls = lengths or (TABLE5_LENGTHS if gpu else CPU_TABLE5_LENGTHS)
        b = batch or (TABLE5_BATCH if gpu else CPU_TABLE5_BATCH)
        shapes += [("5", b, s) for s in ls]
    if table in ("8", "both"):
        bs = batches or (TABLE8_BATCHES if gpu else CPU_TABLE8_BATCHES)
        s = length or (TABLE8_LENGTH if gpu else CPU_TABLE8_LENGTH)
        shapes += [("8", b, s) for b in bs]
    if not shapes:
        raise ValueError(f"table must be 5 | 8 | both, got {table!r}")
    return shapes


def bench_skut(table: str = "both", lengths: Sequence[int] | None = None, batch: int | None = None,
               batches: Sequence[int] | None = None, length: int | None = None, dtype: str = "fp16",
               repeats: int | None = None, warmup: int | None = None, compile: bool = True,
               device: str | torch.device | None = None, seed: int = 0) -> dict:
    """Times SKUT against the PyTorch encoder; see the module doc for the layout.

    Sizes left as None take the paper's shapes on CUDA and small CPU shapes otherwise
    (where only the eager PyTorch encoder runs, in fp32).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from transact.bench.machine import device_label
    from transact.kernels.pytorch.encoder import attention_mask, encoder_reference
    from transact.model.encoder import make_encoder

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dt = DTYPES[dtype] if gpu else torch.float32
    repeats = repeats or (30 if gpu else 3)
    warmup = warmup if warmup is not None else (5 if gpu else 1)
    torch.manual_seed(seed)
    encoder = make_encoder().eval().to(device=device, dtype=dt)
    d_model = encoder.layers[0].self_attn.embed_dim

    def mem_efficient(x, valid):
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return encoder_reference(encoder, x, valid)

    impls = {}
    if gpu:
        from transact.kernels.triton.skut import skut_forward

        impls["skut_fused"] = lambda x, valid: skut_forward(encoder, x, valid, mode="fused")
        impls["skut_per_layer"] = lambda x, valid: skut_forward(encoder, x, valid, mode="per_layer")
        impls["pytorch_mem_efficient"] = mem_efficient
    else:
        impls["pytorch_eager"] = lambda x, valid: encoder_reference(encoder, x, valid)
    notes = [] if gpu else [GPU_NOTE]
    rows: list[dict[str, Any]] = []
    for tbl, b, s in _shapes(table, gpu, lengths, batch, batches, length):
        x, valid = make_inputs(b, s, d_model, device, dt, seed)
        shape_impls = dict(impls)
        if gpu and compile:
            torch._dynamo.reset()  # one fresh static-shape compile per shape, no recompile limit
            compiled = torch.compile(copy.deepcopy(encoder), dynamic=False)
            shape_impls["torch_compile"] = lambda x, valid: compiled(x, mask=attention_mask(valid))
        base = None
        start = len(rows)
        for name, fn in shape_impls.items():
            try:
                t = time_fn(lambda: fn(x, valid), device, warmup, repeats)
                err = None
            except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape: report, go on
                t = {"latency_ms": None, "peak_mem_mib": None, "work_mem_mib": None}
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            row = {"table": tbl, "batch": b, "seq_len": s, "impl": name, "dtype": str(dt).replace("torch.", ""),
                   "device_kind": "gpu" if gpu else "cpu", **t}
            if err:
                row["error"] = err
            rows.append(row)
            if name == "pytorch_mem_efficient":
                base = row
        for row in rows[start:]:
            row["latency_vs_mem_efficient_pct"] = pct_change(row["latency_ms"], base["latency_ms"] if base else None)
            row["memory_vs_mem_efficient_pct"] = pct_change(row["peak_mem_mib"], base["peak_mem_mib"] if base else None)
    return {"benchmark": "skut", "device": device_label() if gpu else f"{device_label()} (CPU timings)",
            "gpu": gpu, "notes": notes,
            "params": {"table": table, "dtype": str(dt).replace("torch.", ""), "repeats": repeats,
                       "warmup": warmup, "compile": bool(gpu and compile), "d_model": d_model},
            "rows": rows}


TABLE_COLUMNS = ["table", "batch", "seq_len", "impl", "latency_ms", "peak_mem_mib",
                 "latency_vs_mem_efficient_pct", "memory_vs_mem_efficient_pct"]
