"""Storage per training example: logged NN features vs logging the full sequences.

Both files are written the same way (parquet, zstd, one candidate per request so no
example shares bytes with another) and measured on disk. The full-sequence row
carries S_LL (L_LL tokens), S_RT and S_imp; the NN row carries |S_all| tokens.
Token embeddings are drawn from a world's item table when one is given (so they
compress like real ones), from a random item table otherwise.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from transact.data import schema as S
from transact.data.io import AtomicParquetWriter, read_table, table_path
from transact.data.quantization import quantize
from transact.features.config import FeatureConfig
from transact.features.nn_features import JaggedSequences, build_s_all, nn_rows_schema, s_all_to_arrow


def _full_schema() -> pa.Schema:
    fields = [S.REQUESTS.field(n) for n in S.REQUESTS.names]
    for seq in ("ll", "rt", "imp"):
        fields += [
            pa.field(f"{seq}_ts", pa.large_list(pa.int64())),
            pa.field(f"{seq}_action", pa.large_list(pa.uint8())),
            pa.field(f"{seq}_surface", pa.large_list(pa.int8())),
            pa.field(f"{seq}_emb_q", pa.large_list(pa.int8())),
        ]
    return pa.schema(fields)


def _random_sequence(rng, item_emb_q: np.ndarray, n: int, t_req: int, span_ms: int, impressions: bool):
    ts = np.sort(t_req - 1 - rng.integers(0, span_ms, n))[::-1].astype(np.int64)  # newest first
    action = (np.full(n, S.ACTION_BIT["impression"], np.uint8) if impressions
              else rng.integers(1, 1 << len(S.EXPLICIT_ACTIONS), n).astype(np.uint8))
    return JaggedSequences(
        emb_q=torch.from_numpy(item_emb_q[rng.integers(0, len(item_emb_q), n)]),
        action=torch.from_numpy(action),
        surface=torch.from_numpy(rng.integers(0, len(S.SURFACES), n).astype(np.int8)),
        ts=torch.from_numpy(ts), offsets=torch.tensor([0, n], dtype=torch.int64))


def bench_storage(n_examples: int = 64, cfg: FeatureConfig | None = None, world: Path | None = None,
                  seed: int = 0) -> dict:
    """Measures bytes per example of both logging strategies at the caps of ``cfg``."""
    cfg = cfg or FeatureConfig()
    rng = np.random.default_rng(seed)
    if world is not None:
        items = read_table(table_path(world, "items"), S.ITEMS, what="items")
        item_emb_q = items.column("emb_q").combine_chunks().values.to_numpy().reshape(-1, S.EMB_DIM)
    else:
        item_emb_q = quantize(rng.normal(scale=0.15, size=(50_000, S.EMB_DIM)).astype(np.float32))
    t_req = 1_735_689_600_000
    label = {c: pa.array([0], pa.uint8()) for c in S.LABEL_COLUMNS}
    with tempfile.TemporaryDirectory() as tmp:
        full_path, nn_path = Path(tmp) / "full.parquet", Path(tmp) / "nn.parquet"
        t0 = time.perf_counter()
        # Rows are written in groups of ``group`` examples, as a logging job would batch them.
        group = 16
        full_rows, nn_rows = [], []
        with AtomicParquetWriter(full_path, _full_schema()) as full, \
                AtomicParquetWriter(nn_path, nn_rows_schema(cfg)) as nn:
            for i in range(n_examples):
                seqs = (_random_sequence(rng, item_emb_q, cfg.ll_cap, t_req, 730 * 86_400_000, False),
                        _random_sequence(rng, item_emb_q, cfg.rt_cap, t_req, 86_400_000, False),
                        _random_sequence(rng, item_emb_q, cfg.imp_cap, t_req, 86_400_000, True))
                cand = torch.from_numpy(item_emb_q[rng.integers(0, len(item_emb_q), 1)])
                meta = pa.table({"request_id": pa.array([i], pa.int64()), "user_id": pa.array([i], pa.int64()),
                                 "item_id": pa.array([i], pa.int64()), "ts": pa.array([t_req], pa.int64()),
                                 "surface": pa.array([0], pa.int8()), "position": pa.array([0], pa.int16()),
                                 **label})
                row = dict(zip(meta.column_names, meta.columns))
                for name, seq in zip(("ll", "rt", "imp"), seqs):
                    row[f"{name}_ts"] = pa.array([seq.ts.numpy()], pa.large_list(pa.int64()))
                    row[f"{name}_action"] = pa.array([seq.action.numpy()], pa.large_list(pa.uint8()))
                    row[f"{name}_surface"] = pa.array([seq.surface.numpy()], pa.large_list(pa.int8()))
                    row[f"{name}_emb_q"] = pa.array([seq.emb_q.numpy().reshape(-1)], pa.large_list(pa.int8()))
                full_rows.append(pa.table(row, schema=_full_schema()))
                s_all = build_s_all(*seqs, cand, torch.tensor([0, 1]), torch.tensor([t_req]), cfg)
                nn_rows.append(s_all_to_arrow(s_all, cand, meta, cfg))
                if len(full_rows) == group or i == n_examples - 1:
                    full.write(pa.concat_tables(full_rows))
                    nn.write(pa.concat_tables(nn_rows))
                    full_rows, nn_rows = [], []
        full_bytes, nn_bytes = full_path.stat().st_size, nn_path.stat().st_size
        seconds = time.perf_counter() - t0
    return {
        "examples": n_examples,
        "l_ll": cfg.ll_cap, "l_rt": cfg.rt_cap, "l_imp": cfg.imp_cap, "s_all": cfg.seq_len,
        "full_bytes_per_example": full_bytes / n_examples,
        "nn_bytes_per_example": nn_bytes / n_examples,
        "ratio": full_bytes / nn_bytes,
        "ideal_ratio": (cfg.ll_cap + cfg.rt_cap + cfg.imp_cap) / cfg.seq_len,
        "token_embeddings_from": str(world) if world else "random item table",
        "seconds": round(seconds, 2),
    }


def format_storage(result: dict) -> str:
    r = result
    return "\n".join([
        f"{'logging':<28}{'bytes / example':>18}",
        f"{'full sequences (L_LL=' + str(r['l_ll']) + ')':<28}{r['full_bytes_per_example']:>18,.0f}",
        f"{'NN features (|S_all|=' + str(r['s_all']) + ')':<28}{r['nn_bytes_per_example']:>18,.0f}",
        f"{'ratio':<28}{r['ratio']:>17.1f}x   (token-count bound {r['ideal_ratio']:.1f}x)",
    ])


def write_json(result: dict, path: Path) -> Path:
    from transact.bench.machine import machine_info

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "storage", "machine": machine_info(), "result": result}, indent=2))
    return path
