"""Issue 26, item 4: an evaluation split per user beside the global time split.

Under ``Split("user", n)`` each user's last n request times are evaluation rows and every row
of that user strictly before them is training data; the split is a function of the rows alone
(no file order, no partitioning), a user with at most n request times is all training, and
every table says which split it was made under.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from helpers import rows_with_split
from transact.cli import app
from transact.features.config import FeatureConfig
from transact.model.checkpoint import read_config
from transact.model.dataset import RowDataset, Split, per_user_cut, synthetic_rows
from transact.model.train import holdout_start, train

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)
FAST = dict(batch_size=32, lr=3e-3, progress=False, log_every=1, num_threads=1)
LONE_USER = 999_999  # a user with a single request


@pytest.fixture(scope="module")
def table():
    """Synthetic rows, one request moved to a user of its own (one request time only)."""
    t = synthetic_rows(60, FCFG, per_request=4, n_users=8, seed=3)
    req = t.column("request_id").to_numpy()
    uid = np.where(req == req[0], LONE_USER, t.column("user_id").to_numpy())  # [N]
    return t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(uid, pa.int64()))


@pytest.fixture(scope="module")
def rows(tmp_path_factory, table):
    path = tmp_path_factory.mktemp("split") / "nn_rows.parquet"
    pq.write_table(table, path, row_group_size=23)
    return path


def keys(ds: RowDataset) -> set[tuple[int, int, int]]:
    t = ds.table()
    return set(zip(t.column("user_id").to_pylist(), t.column("request_id").to_pylist(),
                   t.column("item_id").to_pylist()))


def expected(table: pa.Table, n: int) -> tuple[set, set]:
    """(train, eval) row keys by the definition, user by user."""
    uid, req, item, ts = (table.column(c).to_numpy() for c in ("user_id", "request_id", "item_id", "ts"))
    train_keys, eval_keys = set(), set()
    for u in np.unique(uid):
        times = np.unique(ts[uid == u])
        cut = times[-n] if len(times) > n else None
        for i in np.flatnonzero(uid == u):
            k = (int(uid[i]), int(req[i]), int(item[i]))
            (eval_keys if cut is not None and ts[i] >= cut else train_keys).add(k)
    return train_keys, eval_keys


@pytest.mark.parametrize("n", [1, 2])
def test_each_users_last_requests_are_held_out_and_nothing_after_the_cut_is_trained_on(rows, table, n):
    split = Split("user", n)
    tr = RowDataset(rows, "train", split_by=split)
    ev = RowDataset(rows, "eval", split_by=split)
    want_tr, want_ev = expected(table, n)
    assert keys(tr) == want_tr and keys(ev) == want_ev
    assert not keys(tr) & keys(ev) and len(tr) + len(ev) == table.num_rows  # a partition of the rows
    et, tt = ev.table(), tr.table()
    for u in set(et.column("user_id").to_pylist()):
        u_ev = et.filter(pa.compute.equal(et.column("user_id"), u))
        u_tr = tt.filter(pa.compute.equal(tt.column("user_id"), u))
        assert len(np.unique(u_ev.column("ts").to_numpy())) == n  # exactly the last n request times
        assert u_tr.num_rows and u_tr.column("ts").to_numpy().max() < u_ev.column("ts").to_numpy().min()
    # the per-user split evaluates (nearly) every user; the time split only those active after its cut
    n_users = len(np.unique(table.column("user_id").to_numpy()))
    assert len(set(et.column("user_id").to_pylist())) == n_users - 1  # all but the lone user


def test_a_user_with_no_request_before_the_cut_is_all_training(rows):
    """A user with at most n request times has nothing to learn from before a cut: all of their
    rows train, none evaluate."""
    users, cut = per_user_cut(np.array([5, 5, 5, 7]), np.array([10, 10, 20, 30]), 1)
    assert users.tolist() == [5, 7] and cut[0] == 20 and cut[1] == np.iinfo(np.int64).max
    tr = RowDataset(rows, "train", split_by="user:1")
    ev = RowDataset(rows, "eval", split_by="user:1")
    assert LONE_USER in tr.table().column("user_id").to_pylist()
    assert LONE_USER not in ev.table().column("user_id").to_pylist()


def test_the_split_is_a_function_of_the_rows_not_of_their_order_or_parts(tmp_path, rows, table):
    perm = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, lo in enumerate(range(0, perm.num_rows, 70)):
        pq.write_table(perm.slice(lo, 70), parts / f"part-{i}.parquet", row_group_size=17)
    for part in ("train", "eval"):
        a, b = RowDataset(rows, part, split_by="user:2"), RowDataset(parts, part, split_by="user:2")
        assert keys(a) == keys(b) and len(a) == len(b)
    assert holdout_start(rows, None, 0.2, "user") == holdout_start(parts, None, 0.2, "user")


def test_split_settings_are_checked_with_one_line_errors(rows):
    assert Split.parse("user:3") == Split("user", 3) and str(Split("user", 3)) == "user:3"
    assert Split.parse(None) == Split() and Split.parse(Split("user").to_dict()) == Split("user")
    assert Split().describe(5) == "split: time (train_end_ts=5)"
    assert Split("user", 2).describe() == "split: per user, last 2 requests"
    for bad, msg in (("users", "split must be one of time, user"), ("user:x", "whole number"),
                     ("user:0", "eval_requests_per_user must be an integer >= 1"),
                     ("time:2", "per-user split .split 'user'. only")):
        with pytest.raises(ValueError, match=msg):
            Split.parse(bad)
    with pytest.raises(ValueError, match="takes no train_end_ts"):
        RowDataset(rows, "train", train_end_ts=1, split_by="user")


def test_time_split_is_unchanged_by_the_new_setting(rows, table):
    ts = table.column("ts").to_numpy()
    cut = int(np.median(ts))
    assert len(RowDataset(rows, "train", train_end_ts=cut)) == int((ts < cut).sum())
    assert keys(RowDataset(rows, "eval", train_end_ts=cut, split_by="time")) == keys(
        RowDataset(rows, "eval", train_end_ts=cut))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return rows_with_split(tmp_path_factory.mktemp("world"), 48, FCFG, n_users=12, seed=0)


def test_train_records_the_split_and_evaluate_and_its_table_use_it(world, tmp_path):
    from transact.model.evaluate import evaluate, format_metrics

    s = train(world, tmp_path / "m", "v2", epochs=1, seed=0, split="user", **FAST)
    training = read_config(tmp_path / "m")["training"]
    assert training["split"]["kind"] == "user" and training["train_end_ts"] is None
    # the calibration slice: the latest training rows (by time over all users), none of the evaluation rows
    start = training["calibration_start_ts"]
    train_rows = RowDataset(world, "train", split_by="user")
    assert s["n_train_rows"] == int((train_rows.ts() < start).sum())
    assert s["calibration"]["fitted_on"]["rows"] == int((train_rows.ts() >= start).sum()) > 0
    m = evaluate(tmp_path / "m", world, tmp_path / "ev", n_boot=20, progress=False)
    ev = RowDataset(world, "eval", split_by="user")
    assert m["split"] == "split: per user, last 1 request" and m["n_rows"] == len(ev)
    assert m["n_users"] == len(set(ev.table().column("user_id").to_pylist())) == 12
    assert format_metrics(m).splitlines()[0] == "split: per user, last 1 request"
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["split"] == m["split"]
    # the time split names its point; scoring another split than the trained one says so
    t = evaluate(tmp_path / "m", world, tmp_path / "ev_t", split="time", n_boot=20, progress=False)
    end = json.loads((world.parent / "world.json").read_text())["train_end_ts"]
    assert t["split"].startswith(f"split: time (train_end_ts={end}) -- NOT the model's training split")
    with pytest.raises(ValueError, match="split: time in this run, user:1 in the checkpoint"):
        train(world, tmp_path / "m", "v2", epochs=1, seed=0, **FAST)


def test_ablation_table_names_the_split(world, tmp_path):
    from transact.model import ablation as A

    kw = dict(baseline="transact", models=["transact", "v2"], batch_size=32, lr=3e-3, n_boot=20, num_threads=1,
              max_steps=2, progress=False)
    res = A.ablation(world, tmp_path / "u", split="user", **kw)
    assert A.format_table(res).splitlines()[0] == "split: per user, last 1 request"
    assert "split: per user, last 1 request" in A.format_markdown(res)
    assert res["n_users"] == 12 and res["split"]["kind"] == "user"
    run = json.loads((tmp_path / "u" / "v2" / "seed0" / "metrics.json").read_text())
    assert run["split"] == "split: per user, last 1 request"
    t = A.ablation(world, tmp_path / "t", split="time", **kw)
    assert A.format_table(t).splitlines()[0] == f"split: time (train_end_ts={t['train_end_ts']})"


def test_cli_split_options(world, tmp_path):
    r = CliRunner().invoke(app, ["train", "--rows", str(world), "--out", str(tmp_path / "m"), "--split", "users"])
    assert r.exit_code == 2 and "split must be one of time, user" in r.output
    r = CliRunner().invoke(app, ["train", "--rows", str(world), "--out", str(tmp_path / "m"),
                                 "--eval-requests-per-user", "2"])
    assert r.exit_code == 2 and "--eval-requests-per-user applies to --split user only" in r.output
    r = CliRunner().invoke(app, ["train", "--rows", str(world), "--out", str(tmp_path / "m"), "--split", "user",
                                 "--eval-requests-per-user", "2", "--max-steps", "1", "--batch-size", "16",
                                 "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "split: per user, last 2 requests" in r.output
    r = CliRunner().invoke(app, ["evaluate", "--model-dir", str(tmp_path / "m"), "--rows", str(world),
                                 "--n-boot", "10", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "split: per user, last 2 requests"
