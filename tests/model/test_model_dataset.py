"""Row files -> batches: time split, deterministic shuffling, rank sharding, streaming."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from transact.features.config import FeatureConfig
from transact.features.nn_features import arrow_to_s_all
from transact.model.dataset import (
    RowDataset,
    batches_per_epoch,
    default_train_end_ts,
    read_feature_config,
    table_to_batch,
    write_synthetic_rows,
)

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "nn_rows.parquet"
    return write_synthetic_rows(path, 40, FCFG, per_request=5, seed=1, row_group_size=37)


def ids(batches):
    return [(b.request_id * 100 + (b.item_id % 100)).tolist() for b in batches]


def row_keys(batches):
    out = []
    for b in batches:
        out += list(zip(b.request_id.tolist(), b.item_id.tolist()))
    return out


def test_feature_config_and_time_split(rows):
    assert read_feature_config(rows) == FCFG
    ts = pq.read_table(rows, columns=["ts"]).column("ts").to_numpy()
    cut = int(np.median(ts))
    tr = RowDataset(rows, "train", train_end_ts=cut)
    ev = RowDataset(rows, "eval", train_end_ts=cut)
    assert len(tr) == int((ts < cut).sum()) and len(ev) == int((ts >= cut).sum())
    assert all((b.ts < cut).all() for b in tr.iter_batches(16))
    assert all((b.ts >= cut).all() for b in ev.iter_batches(16))
    with pytest.raises(ValueError, match="train_end_ts is needed"):
        RowDataset(rows, "train")


def test_batches_hold_the_logged_tokens(rows):
    ds = RowDataset(rows, "all")
    b = next(ds.iter_batches(len(ds)))
    s_all, cand = arrow_to_s_all(pq.read_table(rows), FCFG)
    assert torch.equal(b.emb_q, s_all.emb_q) and torch.equal(b.seg_len, s_all.seg_len)
    assert torch.equal(b.cand_emb_q, cand) and b.labels.shape == (len(ds), 4)


def test_shuffle_is_deterministic_by_seed_and_epoch(rows):
    ds = RowDataset(rows, "all")
    a = ids(ds.iter_batches(16, shuffle=True, seed=3, epoch=0))
    assert a == ids(ds.iter_batches(16, shuffle=True, seed=3, epoch=0))
    assert a != ids(ds.iter_batches(16, shuffle=True, seed=3, epoch=1))
    assert a != ids(ds.iter_batches(16, shuffle=True, seed=4, epoch=0))
    assert sorted(sum(a, [])) == sorted(sum(ids(ds.iter_batches(16)), []))
    # resuming mid-epoch skips exactly the first batches
    assert ids(ds.iter_batches(16, shuffle=True, seed=3, start_batch=5)) == a[5:]


@pytest.mark.parametrize("in_memory", [True, False])
def test_ranks_get_disjoint_equal_shares(rows, in_memory):
    ds = RowDataset(rows, "all", max_memory_mb=1024 if in_memory else 0, buffer_rows=50)
    assert ds.in_memory == in_memory
    world = 3
    per_rank = [list(ds.iter_batches(16, shuffle=True, seed=0, rank=k, world_size=world)) for k in range(world)]
    n_steps = {len(p) for p in per_rank}
    assert n_steps == {batches_per_epoch(len(ds), 16, world)} == {ds.num_batches(16, world)}
    sizes = [[len(b) for b in p] for p in per_rank]
    assert sizes[0] == sizes[1] == sizes[2]
    keys = [set(row_keys(p)) for p in per_rank]
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    assert len(set.union(*keys)) >= len(ds) - (world - 1)


def test_streaming_matches_in_memory_rows(rows):
    mem = RowDataset(rows, "all")
    stream = RowDataset(rows, "all", max_memory_mb=0, buffer_rows=20)
    assert not stream.in_memory
    assert ids(mem.iter_batches(16)) == ids(stream.iter_batches(16))  # unshuffled: file order
    a = list(stream.iter_batches(16, shuffle=True, seed=1))
    assert sorted(row_keys(a)) == sorted(row_keys(mem.iter_batches(16)))
    assert ids(a) == ids(stream.iter_batches(16, shuffle=True, seed=1))
    assert ids(stream.iter_batches(16, shuffle=True, seed=1, start_batch=4)) == ids(a)[4:]


def test_folder_of_parts_and_world_json(tmp_path):
    d = tmp_path / "rows"
    write_synthetic_rows(d / "part-0.parquet", 5, FCFG, seed=0)
    write_synthetic_rows(d / "part-1.parquet", 5, FCFG, seed=1)
    assert len(RowDataset(d, "all")) == 80
    ts, src = default_train_end_ts(d)
    assert "quantile" in src
    (tmp_path / "world.json").write_text(json.dumps({"train_end_ts": 123}))
    assert default_train_end_ts(d / "part-0.parquet") == (123, f"{tmp_path / 'world.json'}:train_end_ts")
    with pytest.raises(FileNotFoundError):
        RowDataset(tmp_path / "missing.parquet")


def test_table_to_batch_dtypes(rows):
    b = table_to_batch(pq.read_table(rows).slice(3, 7), FCFG)
    assert b.emb_q.dtype == torch.int8 and b.action.dtype == torch.uint8 and b.age_s.dtype == torch.int32
    assert b.surface.dtype == torch.int64 and b.labels.dtype == torch.float32 and len(b) == 7
