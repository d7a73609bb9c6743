"""NN-feature logging: one row per (request, candidate), equal to the shared contract, atomic."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import write_world
from transact.data.io import SchemaError
from transact.data.world import seal_world
from transact.features import nn_logging
from transact.features.config import FeatureConfig
from transact.features.nn_features import arrow_to_s_all, build_s_all
from transact.features.nn_logging import log_nn_features
from transact.features.sequences import EventStore

CFG = FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)


def test_rows_match_the_contract_for_every_candidate(tmp_path):
    items, actions, impressions, requests = write_world(tmp_path / "w")
    out = tmp_path / "rows.parquet"
    summary = log_nn_features(tmp_path / "w", out, CFG, batch_requests=7, progress=False)
    rows = pq.read_table(out)
    assert summary["rows"] == rows.num_rows == requests.num_rows
    assert summary["requests"] == len(np.unique(requests.column("request_id").to_numpy()))
    store = EventStore(items, actions, impressions, CFG)
    s_all, cand = arrow_to_s_all(rows, CFG)
    # Recompute a few rows one request at a time, straight from the contract.
    for i in [0, 5, rows.num_rows - 1]:
        user, ts, item = (rows.column(c)[i].as_py() for c in ("user_id", "ts", "item_id"))
        ll, rt, imp = store.sequences(np.array([user]), np.array([ts]))
        c = torch.from_numpy(store.item_emb_q_of(np.array([item])))
        exp = build_s_all(ll, rt, imp, c, torch.tensor([0, 1]), torch.tensor([ts]), CFG)
        assert torch.equal(cand[i], c[0])
        for f in ("emb_q", "action", "surface", "age_s", "seg_len"):
            assert torch.equal(getattr(s_all, f)[i], getattr(exp, f)[0]), f
    # Labels and ids carried through unchanged (rows are sorted by time).
    assert sorted(rows.column("request_id").to_pylist()) == sorted(requests.column("request_id").to_pylist())
    assert rows.column("ts").to_numpy().tolist() == sorted(rows.column("ts").to_numpy().tolist())


def test_failure_midway_leaves_no_file(tmp_path, monkeypatch):
    write_world(tmp_path / "w")
    out = tmp_path / "rows.parquet"
    calls = {"n": 0}
    real = nn_logging.build_s_all

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(nn_logging, "build_s_all", flaky)
    with pytest.raises(RuntimeError):
        log_nn_features(tmp_path / "w", out, CFG, batch_requests=5, progress=False)
    assert not out.exists() and not list(tmp_path.glob("rows.parquet*"))


def test_request_with_two_users_is_rejected(tmp_path):
    _, _, _, requests = write_world(tmp_path / "w")
    uid = requests.column("user_id").to_numpy().copy()
    uid[1] = uid[0] + 11  # second candidate of the first request claims another user
    import pyarrow as pa

    pq.write_table(requests.set_column(1, "user_id", pa.array(uid, pa.int64())), tmp_path / "w" / "requests.parquet")
    seal_world(tmp_path / "w")  # a bad table, published: the reader's own check must name it
    with pytest.raises(SchemaError, match="request_id 100 has rows with different user_id"):
        log_nn_features(tmp_path / "w", tmp_path / "rows.parquet", CFG, progress=False)
