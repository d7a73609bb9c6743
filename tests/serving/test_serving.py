"""Serving, in process: de-duplicated batches, offline/online equality, the served log,
micro-batching, the staging arena, the error format, settings and packaging."""
from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import queries_of, write_world
from transact.data.io import SchemaError
from transact.data.schema import LABEL_COLUMNS
from transact.features.config import FeatureConfig
from transact.features.nn_features import arrow_to_s_all, nn_rows_schema
from transact.features.nn_logging import log_nn_features
from transact.features.sequences import EventStore
from transact.model.calibration import Calibration
from transact.model.checkpoint import load_model, save_model
from transact.model.transact import Batch, build_model
from transact.serving.batching import DeadlineExceeded, MicroBatcher, Overloaded
from transact.serving.device import StagingArena
from transact.serving.ranker import Ranker, RankQuery, RequestError, assemble, default_weights
from transact.serving.served_log import (
    WRITER_NICE,
    ServedLogWriter,
    WriterPriority,
    attach_labels,
    read_served_log,
    served_log_schema,
)

CFG = FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    items, actions, impressions, requests = write_world(root / "w")
    torch.manual_seed(0)
    model = build_model("v2", CFG)
    # a calibrated model (the trainer fits one): every score below is the calibrated probability
    model.set_calibration(Calibration(model.cfg.heads, (0.6, 1.4, 1.0), (1.2, 0.7, 1.0), (-1.5, -2.0, -3.0),
                                      fitted_on={"rows": 1}))
    save_model(root / "model", model)
    rows = root / "rows.parquet"
    log_nn_features(root / "w", rows, CFG, progress=False)
    return {"root": root, "items": items, "requests": requests, "rows": pq.read_table(rows),
            "store": EventStore(items, actions, impressions, CFG), "model": load_model(root / "model")}


def offline_probs(model, rows: pa.Table) -> np.ndarray:
    s_all, cand = arrow_to_s_all(rows, model.fcfg)
    surface = torch.from_numpy(rows.column("surface").to_numpy().astype(np.int64))
    return model.predict_proba(Batch.from_s_all(s_all, cand, surface)).numpy()


def test_online_scores_match_offline_rows_for_both_assemblies(world):
    """Serving (de-duplicated and naive batches) = the model on the offline NN-logging rows."""
    model, rows = world["model"], world["rows"]
    exp = offline_probs(model, rows)
    key = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(rows.column("request_id").to_numpy(),
                                                               rows.column("position").to_numpy()))}
    out = {}
    for assembly in ("dedup", "naive"):
        ranker = Ranker(model, world["store"], assembly=assembly, cpu_forward="eager")
        qs = queries_of(world["requests"], ranker.weights)
        results, st = ranker.rank(qs[:11])
        results2, _ = ranker.rank(qs[11:])  # two cross-request batches of different sizes
        assert st.requests == 11 and st.errors == 0
        got = np.zeros_like(exp)
        for r in results + results2:
            for pos in range(r.query.n):
                got[key[(r.query.request_id, pos)]] = r.probs[pos]
        np.testing.assert_allclose(got, exp, rtol=0, atol=1e-6)
        out[assembly] = got
        # score and ranking
        r = results[0]
        np.testing.assert_allclose(r.score, r.probs @ np.array([ranker.weights.get(h, 0) for h in ranker.heads]))
        assert list(r.order) == sorted(range(r.query.n), key=lambda i: (-r.score[i], i))
    np.testing.assert_array_equal(out["dedup"], out["naive"])


def test_rank_returns_calibrated_probabilities_and_the_raw_heads_on_request(world):
    """/rank's probabilities are the model's calibrated ones (as offline evaluation reads them), the
    score is computed from them, the served log records them; ``raw_probs`` adds the plain sigmoid."""
    model, rows = world["model"], world["rows"]
    assert not model.calibration.is_identity
    ranker = Ranker(model, world["store"], cpu_forward="eager")
    q = queries_of(world["requests"], ranker.weights)[:3]
    q[1].raw_probs = True
    results, _ = ranker.rank(q)
    exp = offline_probs(model, rows)
    s_all, cand = arrow_to_s_all(rows, model.fcfg)
    surface = torch.from_numpy(rows.column("surface").to_numpy().astype(np.int64))
    raw = model.predict_proba(Batch.from_s_all(s_all, cand, surface), raw=True).numpy()
    assert not np.allclose(exp, raw, atol=1e-3)  # the calibration moves every head
    key = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(rows.column("request_id").to_numpy(),
                                                               rows.column("position").to_numpy()))}
    for r in results:
        idx = [key[(r.query.request_id, pos)] for pos in range(r.query.n)]
        np.testing.assert_allclose(r.probs, exp[idx], rtol=0, atol=1e-6)
        np.testing.assert_allclose(r.score, r.probs @ np.array([ranker.weights.get(h, 0) for h in ranker.heads]))
        if r.query.raw_probs:
            np.testing.assert_allclose(r.raw, raw[idx], rtol=0, atol=1e-6)
        else:
            assert r.raw is None


@pytest.mark.parametrize("cpu_forward", ["compile", "onnxruntime"])
def test_cpu_forward_backends_equal_eager_for_varying_batch_sizes(world, cpu_forward):
    """The service's CPU backends (torch.compile / ONNX Runtime, dynamic batch) give the eager scores."""
    if cpu_forward == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    model, rows = world["model"], world["rows"]
    exp = offline_probs(model, rows)
    ranker = Ranker(model, world["store"], cpu_forward=cpu_forward)
    ranker.warmup()
    qs = queries_of(world["requests"], ranker.weights)
    got = {}
    for chunk in (qs[:1], qs[1:4], qs[4:]):  # batches of different sizes
        for r in ranker.rank(chunk)[0]:
            for pos in range(r.query.n):
                got[(r.query.request_id, pos)] = r.probs[pos]
    assert ranker.runner.backend == cpu_forward  # built, and did not fall back to eager
    key = zip(rows.column("request_id").to_numpy(), rows.column("position").to_numpy())
    np.testing.assert_allclose(np.stack([got[(int(r), int(p))] for r, p in key]), exp, rtol=0, atol=1e-6)


def test_a_failing_cpu_backend_falls_back_to_eager(world, monkeypatch):
    from transact.serving.device import ModelRunner

    def broken(self, batch):
        raise RuntimeError("no toolchain")

    monkeypatch.setattr(ModelRunner, "_build", broken)
    ranker = Ranker(world["model"], world["store"], cpu_forward="compile")
    qs = queries_of(world["requests"], ranker.weights)
    results, st = ranker.rank(qs[:2])
    assert st.errors == 0 and ranker.runner.backend == "eager" and len(results) == 2


def test_dedup_moves_far_fewer_bytes_than_broadcasting(world):
    store = world["store"]
    users = np.array([11, 22])
    seqs = store.sequences(users, np.array([1_700_500_000_000] * 2))
    cand = torch.zeros(40, 32, dtype=torch.int8)
    args = (*seqs, cand, torch.tensor([25, 15]), torch.tensor([1_700_500_000_000] * 2), torch.tensor([0, 1]))
    d, n = assemble(*args), assemble(*args, naive=True)
    assert StagingArena.nbytes(n) > 5 * StagingArena.nbytes(d)
    assert d["cand_offsets"].tolist() == [0, 25, 40]
    assert n["cand_offsets"].tolist() == list(range(41))
    assert int(n["ll.offsets"][-1]) == 25 * int(seqs[0].lengths[0]) + 15 * int(seqs[0].lengths[1])


def test_cold_user_and_raw_embeddings(world):
    model, store = world["model"], world["store"]
    ranker = Ranker(model, store, cpu_forward="eager")
    items = world["items"]
    ids = items.column("item_id").to_numpy()[:5]
    raw = items.column("emb").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, 32)[:5]
    from transact.serving.ranker import quantize_embeddings

    w = ranker.weights
    by_id = RankQuery(999_999, ids, None, 0, 1_700_500_000_000, 1, w)
    by_emb = RankQuery(999_999, ids, quantize_embeddings(raw.astype(np.float64)), 0, 1_700_500_000_000, 2, w)
    (a, b), _ = ranker.rank([by_id, by_emb])
    assert a.cold_start and b.cold_start
    np.testing.assert_array_equal(a.probs, b.probs)  # raw embeddings quantise like the item table
    assert np.isfinite(a.probs).all() and a.probs.shape == (5, len(ranker.heads))


def test_a_bad_request_fails_alone(world):
    ranker = Ranker(world["model"], world["store"], cpu_forward="eager")
    qs = queries_of(world["requests"], ranker.weights)[:2]
    bad_item = RankQuery(11, np.array([123456789]), None, 0, 1_700_500_000_000, 7, ranker.weights)
    bad_w = RankQuery(11, qs[0].item_ids, None, 0, 1_700_500_000_000, 8, {"nope": 1.0})
    results, st = ranker.rank([qs[0], bad_item, bad_w, qs[1]])
    assert isinstance(results[1], RequestError) and results[1].field == "item_ids"
    assert "123456789" in str(results[1])
    assert isinstance(results[2], RequestError) and results[2].field == "score_weights"
    assert results[0].probs.shape[0] == qs[0].n and results[3].probs.shape[0] == qs[1].n
    assert st.errors == 2


def test_default_weights_follow_the_heads():
    assert default_weights(("click", "repin")) == {"click": 1.0, "repin": 1.0}
    assert default_weights(("click", "hide"), {"hide": -2.0}) == {"hide": -2.0}


# --- the served log -------------------------------------------------------------------------------

def test_served_log_with_labels_equals_offline_rows(world, tmp_path):
    """Served rows + attach_labels = exactly the rows of the offline NN-logging step."""
    model = world["model"]
    writer = ServedLogWriter(tmp_path / "log", CFG, model.cfg.heads, flush_rows=64, flush_s=0.2)
    ranker = Ranker(model, world["store"], log_writer=writer, model_version="m:1", cpu_forward="eager")
    qs = queries_of(world["requests"], ranker.weights)
    for i in range(0, len(qs), 7):
        ranker.rank(qs[i:i + 7])
    ranker.rank(qs[:2])  # a retried request: the first served copy is kept
    writer.close()
    assert writer.dropped_rows == 0 and len(writer.files) >= 2
    served = read_served_log(tmp_path / "log")
    assert served.schema.equals(served_log_schema(CFG, model.cfg.heads), check_metadata=False)
    assert set(served.column("model_version").to_pylist()) == {"m:1"}
    assert served.num_rows == world["requests"].num_rows + qs[0].n + qs[1].n
    train = attach_labels(served, world["requests"])
    offline = world["rows"].cast(nn_rows_schema(CFG))
    assert train.schema.equals(nn_rows_schema(CFG), check_metadata=True)
    assert train.equals(offline)
    # predictions logged = predictions served
    probs = np.stack([served.column(f"pred_{h}").to_numpy() for h in model.cfg.heads], 1)
    assert np.isfinite(probs).all()


def test_attach_labels_drops_unlabelled_and_checks_ids(world, tmp_path):
    model = world["model"]
    writer = ServedLogWriter(tmp_path / "log", CFG, model.cfg.heads)
    ranker = Ranker(model, world["store"], log_writer=writer, cpu_forward="eager")
    qs = queries_of(world["requests"], ranker.weights)[:3]
    ranker.rank(qs)
    writer.close()
    served = read_served_log(tmp_path / "log")
    req = world["requests"]
    one = req.filter(pa.compute.equal(req.column("request_id"), qs[0].request_id))
    assert attach_labels(served, one).num_rows == qs[0].n
    wrong = one.set_column(one.schema.get_field_index("item_id"), "item_id",
                           pa.array(one.column("item_id").to_numpy() + 1, pa.int64()))
    with pytest.raises(SchemaError, match="item_id"):
        attach_labels(served, wrong)
    with pytest.raises(SchemaError, match="more than one"):
        attach_labels(served, pa.concat_tables([one, one]))
    with pytest.raises(SchemaError, match="label_click"):
        attach_labels(served, one.drop_columns([LABEL_COLUMNS[0]]))


def test_rank_makes_the_batch_durable_on_the_model_thread_before_it_returns(world, tmp_path):
    """What the ranker's docstring says: the write-ahead append runs inside rank(), on the
    calling (model) thread, before the responses exist; the parquet writer runs later."""
    from transact.serving.wal import WAL_DIR

    model = world["model"]
    appended_on = []
    writer = ServedLogWriter(tmp_path / "log", CFG, model.cfg.heads, flush_rows=10**6, flush_s=3600)
    real_append = writer.wal.append
    writer.wal.append = lambda table: (appended_on.append(threading.get_ident()), real_append(table))[1]
    try:
        ranker = Ranker(model, world["store"], log_writer=writer, cpu_forward="eager")
        qs = queries_of(world["requests"], ranker.weights)[:3]
        ranker.rank(qs)
        assert appended_on == [threading.get_ident()]  # on this thread, within rank()
        assert writer.logged_rows == sum(q.n for q in qs)  # durable when rank() returns
        assert list((tmp_path / "log" / WAL_DIR).iterdir()) and not writer.files  # no parquet yet
    finally:
        writer.close()
    assert "never blocking" not in ranker_module_doc()


def ranker_module_doc() -> str:
    import transact.serving.ranker as ranker_module

    return ranker_module.__doc__ or ""


def _record(model, store, n_req=1):
    ranker = Ranker(model, store, cpu_forward="eager")
    rec = {}

    class Catch:
        def submit(self, r):
            rec["r"] = r

    ranker.log_writer = Catch()
    ranker.rank([RankQuery(11, np.array([3, 10, 17]), None, 0, 1_700_500_000_000, i, ranker.weights)
                 for i in range(n_req)])
    return rec["r"]


def test_log_queue_is_bounded_and_counts_drops(world, tmp_path):
    model = world["model"]
    rec = _record(model, world["store"], n_req=2)  # 6 rows
    dropped = []
    writer = ServedLogWriter(tmp_path / "log", CFG, model.cfg.heads, max_queue_rows=8, flush_s=60,
                             on_dropped=dropped.append)
    gate = threading.Event()
    real = writer._write
    writer._write = lambda *a: (gate.wait(10), real(*a))  # hold the writer thread
    assert writer.submit(rec) is True
    assert writer.submit(rec) is False  # 12 > 8 rows queued: dropped, not blocked
    assert writer.dropped_rows == 6 and dropped == [6]
    gate.set()
    writer.close()
    assert writer.written_rows == 6
    assert read_served_log(tmp_path / "log").num_rows == 6
    assert writer.submit(rec) is False  # closed: counted as dropped
    assert writer.dropped_rows == 12


def test_log_flushes_by_time_and_survives_a_write_error(world, tmp_path):
    model = world["model"]
    rec = _record(model, world["store"])
    writer = ServedLogWriter(tmp_path / "log", CFG, model.cfg.heads, flush_rows=10_000, flush_s=0.2)
    writer.submit(rec)
    t = time.monotonic()
    while not writer.files and time.monotonic() - t < 10:
        time.sleep(0.05)
    assert writer.written_rows == 3  # written by the timer, long before flush_rows
    real = writer._write

    def broken(tables, rows, *batches):
        writer._write = real
        raise_in = writer.out_dir
        writer.out_dir = tmp_path / "missing" / "deeper"
        try:
            real(tables, rows, *batches)
        finally:
            writer.out_dir = raise_in

    (tmp_path / "missing").write_text("a file where a folder should be")
    writer._write = broken
    writer.submit(rec)
    writer.flush()
    assert writer.dropped_rows == 3
    writer.submit(rec)
    writer.close()
    assert writer.written_rows == 6 and writer.pending_rows == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_log_writer_runs_idle_and_catches_up_at_normal_policy_when_behind(world, tmp_path):
    rec = _record(world["model"], world["store"])  # 3 rows
    writer = ServedLogWriter(tmp_path / "log", CFG, world["model"].cfg.heads, max_queue_rows=16, flush_rows=3,
                             flush_s=60)
    writer.flush()  # the thread has started and set its priority
    prio = writer.priority
    assert prio.idle and os.sched_getscheduler(prio.tid) == os.SCHED_IDLE
    gate, real = threading.Event(), writer._write
    writer._write = lambda *a: (gate.wait(10), real(*a))  # a writer that falls behind
    for _ in range(3):
        writer.submit(rec)  # 3, 6, 9 rows pending: past half of 16, raised by the submitting thread
    assert prio.idle is not prio.switching  # raised, or (not permitted) left idle and no more tries
    if prio.switching:
        assert os.sched_getscheduler(prio.tid) == os.SCHED_OTHER
    gate.set()
    writer.flush()
    writer.submit(rec)  # 3 pending: below a quarter, idle again
    assert prio.idle and os.sched_getscheduler(prio.tid) == os.SCHED_IDLE
    writer.close()
    assert writer.written_rows == 12 and writer.dropped_rows == 0

    policies = []

    def in_a_thread():
        p = WriterPriority(max_queue_rows=100)
        for pending in (10, 51, 40, 26, 24):  # above a half: catch up; below a quarter: idle again
            p.update(pending)
            policies.append((p.idle, p.switching, os.sched_getscheduler(p.tid), os.getpriority(os.PRIO_PROCESS, p.tid)))

    th = threading.Thread(target=in_a_thread)
    th.start()
    th.join()
    assert policies[0][:3] == (True, True, os.SCHED_IDLE)
    if policies[1][1]:  # the OS let the thread leave SCHED_IDLE (root, or RLIMIT_NICE allows it)
        assert [p[0] for p in policies] == [True, False, False, False, True]
        assert policies[1][2:] == (os.SCHED_OTHER, WRITER_NICE) and policies[4][2] == os.SCHED_IDLE
    else:  # refused: the thread stays idle and stops trying
        assert all(p[:3] == (True, False, os.SCHED_IDLE) for p in policies[1:])


# --- micro-batching -------------------------------------------------------------------------------
# No test here sleeps or races a deadline: the batcher's clock is a fake one the test moves,
# and threading.Events say when the model thread holds a batch. The callers' own waits are
# generous bounds (60 s) that only a hung batcher reaches.

WAIT = 60.0


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_micro_batcher_groups_waiting_requests_and_isolates_errors():
    seen = []
    holding, gate = threading.Event(), threading.Event()

    def process(items):
        holding.set()
        assert gate.wait(WAIT)
        seen.append(list(items))
        return [ValueError("bad") if x == "bad" else x * 2 for x in items]

    b = MicroBatcher(process, max_batch_size=10, max_queue=100, clock=FakeClock())
    first = b.submit(1, 1, WAIT)  # the worker takes it alone and blocks on the gate
    assert holding.wait(WAIT)
    futs = [b.submit(x, 4, WAIT) for x in (2, 3, "bad", 5)]  # sizes 4: at most 2 per batch
    gate.set()
    assert first.result(WAIT) == 2
    assert [f.result(WAIT) for f in futs[:2]] == [4, 6]
    with pytest.raises(ValueError, match="bad"):
        futs[2].result(WAIT)
    assert futs[3].result(WAIT) == 10
    assert seen == [[1], [2, 3], ["bad", 5]]
    b.close()


def test_micro_batcher_sheds_load_times_out_and_survives_a_crash():
    clock = FakeClock()
    holding, gate = threading.Event(), threading.Event()

    def process(items):
        if "crash" in items:
            raise RuntimeError("boom")
        holding.set()
        assert gate.wait(WAIT)
        return items

    b = MicroBatcher(process, max_batch_size=1, max_queue=2, clock=clock)
    b.submit("a", 1, WAIT)
    assert holding.wait(WAIT)  # the worker holds "a": the queue is empty again
    expired = b.submit("b", 1, 0.05)
    c = b.submit("c", 1, WAIT)
    with pytest.raises(Overloaded):
        b.submit("d", 1, WAIT)  # two queued: the limit
    clock.advance(1.0)  # "b" waited past its deadline in the queue, "c" did not
    gate.set()
    assert c.result(WAIT) == "c"
    with pytest.raises(DeadlineExceeded, match="expired in the queue"):
        expired.result(WAIT)
    assert b.expired == 1
    holding.clear()
    gate.clear()
    b.submit("slow", 1, WAIT)  # holds the worker while "e" times out
    assert holding.wait(WAIT)
    with pytest.raises(DeadlineExceeded, match="no result within"):
        asyncio.run(b.run("e", 1, 0.01))  # the caller's own (real-time) wait ends first: the worker is held
    gate.set()
    fut = b.submit("crash", 1, WAIT)
    with pytest.raises(RuntimeError, match="boom"):
        fut.result(WAIT)
    assert b.call("ok", 1, WAIT) == "ok" and b.alive
    b.close()
    with pytest.raises(Overloaded):
        b.submit("late", 1, WAIT)


def test_micro_batcher_waits_to_grow_a_batch_when_asked():
    """With max_wait_s, the first request waits (on the batcher's clock) for more: four
    requests submitted while the clock stands still are one batch, however slowly they come."""
    clock = FakeClock()
    sizes = []
    b = MicroBatcher(lambda items: sizes.append(len(items)) or items, max_batch_size=8, max_wait_s=0.05, clock=clock)
    futs = [b.submit(i, 1, WAIT) for i in range(4)]
    assert not any(f.done() for f in futs)  # the clock stands still: the worker waits for more
    # Move the clock until the batch goes. The worker starts its wait whenever it gets to run
    # (maybe after a first move): each move ends any wait begun before it, at the worker's next
    # (real, <= 0.05 s) wake-up. Whenever that is, all four were queued before the clock moved.
    give_up = time.monotonic() + WAIT
    while not futs[0].done() and time.monotonic() < give_up:
        clock.advance(0.05)
        time.sleep(0.01)
    assert [f.result(WAIT) for f in futs] == [0, 1, 2, 3]
    assert sizes == [4]
    b.close()


def test_micro_batcher_stops_waiting_when_the_batch_is_full():
    clock = FakeClock()
    sizes = []
    b = MicroBatcher(lambda items: sizes.append(len(items)) or items, max_batch_size=3, max_wait_s=3600, clock=clock)
    futs = [b.submit(i, 1, WAIT) for i in range(3)]  # full before the (never passing) wait ends
    assert [f.result(WAIT) for f in futs] == [0, 1, 2] and sizes == [3]
    b.close()


def test_micro_batcher_sets_up_and_processes_on_one_thread():
    threads = []

    def setup():
        threads.append(threading.get_ident())

    def process(items):
        threads.append(threading.get_ident())
        return items

    b = MicroBatcher(process, max_batch_size=4, setup=setup)
    assert len(threads) == 1  # the constructor returned after the setup
    assert b.call("x", 1, WAIT) == "x"
    assert threads[0] == threads[1] != threading.get_ident()
    b.close()


def test_micro_batcher_raises_the_setup_error_in_the_constructor():
    def setup():
        raise FileNotFoundError("no model here")

    with pytest.raises(FileNotFoundError, match="no model here"):
        MicroBatcher(lambda items: items, max_batch_size=4, setup=setup)
    release = threading.Event()
    with pytest.raises(TimeoutError, match="setup"):  # a setup that cannot finish in time
        MicroBatcher(lambda items: items, max_batch_size=4, setup=lambda: release.wait(WAIT), setup_timeout_s=0.01)
    release.set()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize(("tunables", "expected"), [(None, "True"), ("glibc.malloc.arena_max=2", "False")])
def test_tune_malloc_applies_unless_the_user_set_glibc_tunables(tunables, expected):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    code = "from transact.serving.malloc import tune_malloc; print(tune_malloc(), tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, expected]


# --- staging arena --------------------------------------------------------------------------------

def test_staging_arena_packs_aligned_views_and_grows():
    arena = StagingArena("cpu", capacity=1 << 10, force_copy=True)
    t = {"a": torch.arange(10, dtype=torch.int64), "b": torch.randint(-127, 127, (7, 32), dtype=torch.int8),
         "c": torch.tensor([1.5, -2.0]), "d": torch.zeros(0, 32, dtype=torch.int8)}
    out = arena.stage(t)
    for k in t:
        assert torch.equal(out[k], t[k]) and out[k].dtype == t[k].dtype
    assert arena.last_bytes == 80 + 224 + 8
    big = {"x": torch.ones(3 << 20, dtype=torch.uint8)}
    out = arena.stage(big)
    assert arena.grows == 2 and arena.capacity >= (3 << 20) and torch.equal(out["x"], big["x"])
    out = arena.stage(t)  # reused, no growth
    assert arena.grows == 2 and torch.equal(out["b"], t["b"])
    plain = StagingArena("cpu")
    assert plain.stage(t) is t and plain.last_bytes == 312


# --- error format, settings ---------------------------------------------------------------------

def test_error_format_names_the_field():
    from transact.serving.guard import format_errors

    pyd = {"error": "1 validation error", "detail": [{"type": "too_short", "loc": ["item_ids"], "msg": "short"},
                                                     {"type": "x", "loc": ["item_embeddings", 0, 3], "msg": "nan"}]}
    f = format_errors(pyd)
    assert f["fields"] == ["item_ids", "item_embeddings.0.3"] and f["error"].startswith("item_ids: short")
    v = format_errors({"detail": [{"loc": [], "msg": "Value error, item_embeddings: 1 rows for 2"}]})
    assert v["fields"] == ["item_embeddings"] and v["error"] == "item_embeddings: 1 rows for 2"
    j = format_errors({"detail": [{"loc": [], "msg": "Invalid JSON: EOF"}]})
    assert j["fields"] == ["body"]
    assert format_errors([{"error": "x: y"}])["fields"] == ["x"]


def test_guard_middleware_key_size_and_type():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from transact.serving.guard import GuardMiddleware

    async def rank(request):
        body = await request.json()
        if body.get("fail"):
            return JSONResponse({"error": "1 validation error",
                                 "detail": [{"loc": ["user_id"], "msg": "bad"}]}, status_code=400)
        return JSONResponse({"n": len(body)})

    codes = []
    app = GuardMiddleware(Starlette(routes=[Route("/rank", rank, methods=["POST"])]), max_body_bytes=2048,
                          api_key="s3cret", on_status=codes.append)
    c = TestClient(app)
    assert c.post("/rank", json={"a": 1}).status_code == 401
    assert c.post("/rank", json={"a": 1}, headers={"X-API-Key": "wrong"}).status_code == 401
    ok = {"X-API-Key": "s3cret"}
    assert c.post("/rank", json={"a": 1}, headers=ok).json() == {"n": 1}
    r = c.post("/rank", content=b"x" * 5000, headers={**ok, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["fields"] == ["body"]
    r = c.post("/rank", content=b"{}", headers={**ok, "content-type": "text/plain"})
    assert r.status_code == 415
    r = c.post("/rank", json={"fail": 1}, headers=ok)
    assert r.status_code == 400 and r.json()["error"] == "user_id: bad"
    assert c.get("/rank", headers=ok).status_code == 405

    def chunks():
        for _ in range(5):
            yield b"x" * 1000

    r = c.post("/rank", content=chunks(), headers={**ok, "content-type": "application/json"})
    assert r.status_code == 413
    assert codes == [401, 401, 200, 413, 415, 400, 405, 413]


def test_settings_from_env_fail_on_bad_values():
    from transact.serving.settings import ServeSettings

    with pytest.raises(ValueError, match="TRANSACT_MAX_CANDIDATES"):
        ServeSettings.from_env({"TRANSACT_MAX_CANDIDATES": "ten"})
    env = {"TRANSACT_MAX_CANDIDATES": "64", "TRANSACT_ASSEMBLY": "fancy"}
    with pytest.raises(ValueError, match="TRANSACT_ASSEMBLY"):
        ServeSettings.from_env(env)
    env.update(TRANSACT_ASSEMBLY="naive", TRANSACT_SCORE_WEIGHTS="click=2,hide=-1")
    s = ServeSettings.from_env(env)
    assert s.max_candidates == 64 and s.assembly == "naive" and s.score_weights == {"click": 2.0, "hide": -1.0}
    out = s.to_env()
    assert out["TRANSACT_ASSEMBLY"] == "naive" and "TRANSACT_API_KEY" not in out


# --- sequence sources -----------------------------------------------------------------------------

def test_sources_protocol_and_empty_source():
    from transact.serving.sources import EmptySource, SequenceSource

    assert isinstance(EventStore.__new__(EventStore), SequenceSource)
    ll, rt, imp = EmptySource().sequences(np.array([1, 2]), np.array([0, 0]))
    assert ll.num_users == rt.num_users == imp.num_users == 2 and int(ll.offsets[-1]) == 0
    with pytest.raises(ValueError, match="item_embeddings"):
        EmptySource().item_emb_q_of(np.array([1]))


def test_feast_source_adapts_online_sequences(world):
    from transact.serving.sources import FeastSource

    store = world["store"]

    class FakeOnline:  # the OnlineSequences interface: current state, no timestamps
        def sequences(self, user_ids):
            return store.sequences(np.asarray(user_ids), np.full(len(user_ids), 1_800_000_000_000))

        def item_emb_q(self, item_ids, unknown="raise"):
            return store.item_emb_q_of(np.asarray(item_ids))

    src = FeastSource(FakeOnline())
    ranker = Ranker(world["model"], src, cpu_forward="eager")
    (r,), _ = ranker.rank([RankQuery(11, np.array([3, 10]), None, 0, 1_800_000_000_000, 1, ranker.weights)])
    assert not r.cold_start and r.probs.shape == (2, 3)


@pytest.mark.slow
def test_feast_online_store_serves_the_same_sequences(tmp_path):
    """Real Feast (SQLite online store): the adapter returns what the EventStore cuts."""
    from transact.features.feast.materialize import materialize
    from transact.features.feast.offline import write_offline
    from transact.features.feast.store import apply, init_repo
    from transact.serving.sources import open_source

    items, actions, impressions, _ = write_world(tmp_path / "w")
    repo = init_repo(tmp_path / "repo")
    apply(repo)
    write_offline(tmp_path / "w", repo, CFG, progress=False)
    end = int(max(actions.column("ts").to_numpy().max(), impressions.column("ts").to_numpy().max())) + 1
    materialize(repo, end_ms=end, progress=False)
    src = open_source(None, str(repo), CFG)
    store = EventStore(items, actions, impressions, CFG)
    users = np.array([0, 11, 22, 987654])
    for a, b in zip(src.sequences(users, np.full(4, end + 10)), store.sequences(users, np.full(4, end + 10))):
        for f in ("emb_q", "action", "surface", "ts", "offsets"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    ids = items.column("item_id").to_numpy()[:4]
    np.testing.assert_array_equal(src.item_emb_q_of(ids), store.item_emb_q_of(ids))
    with pytest.raises(ValueError, match="5"):
        src.item_emb_q_of(np.array([5]))


def test_a_failing_source_is_a_server_side_error(world):
    from transact.serving.ranker import SourceUnavailable

    class Down:
        def sequences(self, user_ids, ts):
            raise ConnectionError("redis is down")

        def item_emb_q_of(self, ids):
            return world["store"].item_emb_q_of(ids)

    ranker = Ranker(world["model"], Down(), cpu_forward="eager")
    with pytest.raises(SourceUnavailable, match="redis is down"):
        ranker.rank([RankQuery(11, np.array([3]), None, 0, 1_700_500_000_000, 1, ranker.weights)])


def test_client_errors_are_logged_as_one_line_server_errors_keep_their_traceback():
    import logging
    import sys

    from pydantic import BaseModel, ValidationError

    from transact.serving.guard import ClientErrorLogFilter

    class M(BaseModel):
        x: int

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:  # noqa: BLE001 - the test needs the live exception info
            info = sys.exc_info()
        return logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]",
                                 ("/rank", "POST"), info)

    try:
        M(x="no")
    except ValidationError as e:
        bad_request = record(e)
    f = ClientErrorLogFilter()
    assert f.filter(bad_request)
    assert bad_request.levelno == logging.INFO and bad_request.exc_info is None
    assert bad_request.getMessage().startswith("client error on /rank [POST]: 1 validation error")
    crash = record(RuntimeError("boom"))
    assert f.filter(crash)
    assert crash.levelno == logging.ERROR and crash.exc_info is not None
    assert crash.getMessage() == "Exception on /rank [POST]"


def test_onnx_runtime_forward_equals_eager_for_any_batch_size(world):
    """The optional ONNX Runtime forward (measured by the serving bench) gives the eager scores."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (optional)")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (optional)")
    from transact.serving.onnx_runtime import OnnxForward

    model, rows = world["model"], world["rows"]
    s_all, cand = arrow_to_s_all(rows, model.fcfg)
    surface = torch.from_numpy(rows.column("surface").to_numpy().astype(np.int64))
    batch = Batch.from_s_all(s_all, cand, surface)
    onnx = OnnxForward(model, batch.index(slice(0, 8)))
    for n in (len(batch), 3, 1):
        part = batch.index(slice(0, n))
        with torch.no_grad():
            eager = model(part).logits.numpy()
        np.testing.assert_allclose(onnx(part).numpy(), eager, rtol=0, atol=1e-5)
