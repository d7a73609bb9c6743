"""Feast integration: apply -> materialise -> online reads, pushes, point-in-time training
reads, SQLite vs Redis, and the `feast` / `transact features` command lines.

Reference everywhere: :class:`transact.features.sequences.EventStore` (the contract).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import COLD_USER, FEAST_CAPS, FEAST_T0, LATE_USER, feast_cli, feast_world
from transact.bench.features import local_redis
from transact.data.io import SchemaError
from transact.features.config import DAY_MS, FeatureConfig
from transact.features.feast.codec import HEADER_BYTES, TOKEN_BYTES, decode_tokens, encode_tokens
from transact.features.feast.historical import HistoricalSequences, historical_for_requests
from transact.features.feast.materialize import materialize
from transact.features.feast.offline import write_offline
from transact.features.feast.online import OnlineSequences, online_item_emb_q, online_sequences
from transact.features.feast.push import push_events
from transact.features.feast.store import (
    IMP_PUSH,
    IMP_VIEW,
    INDEX_VIEWS,
    ITEM_FEATURE,
    ITEM_KEY,
    ITEM_SERVICE,
    ITEM_VIEW,
    LL_VIEW,
    OFFLINE_DIRS,
    REPO_TEMPLATE,
    RT_PUSH,
    RT_VIEW,
    SERVICE,
    TRAIN_SERVICE,
    TS_COL,
    USER_KEY,
    VIEW_FEATURES,
    apply,
    init_repo,
    open_store,
)
from transact.features.sequences import EventStore

CFG = FeatureConfig(**FEAST_CAPS)
T0 = FEAST_T0
FIELDS = ("emb_q", "action", "surface", "ts", "offsets")


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def _assert_same(got, want, what=""):
    for name, g, w in zip(("S_LL", "S_RT", "S_imp"), got, want):
        for f in FIELDS:
            assert torch.equal(getattr(g, f), getattr(w, f)), f"{what} {name}.{f} differs"


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    return path, feast_world(path)


@pytest.fixture(scope="module")
def reference(world):
    path, t = world
    return EventStore(t["items"], t["actions"], t["impressions"], CFG)


@pytest.fixture(scope="module")
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    with local_redis() as url:
        yield url


@pytest.fixture(scope="module")
def sqlite_repo(world, tmp_path_factory):
    repo = init_repo(tmp_path_factory.mktemp("feast") / "repo")
    summary = write_offline(world[0], repo, CFG, progress=False)
    apply(repo)
    materialize(repo, progress=False)
    return repo, summary


@pytest.fixture(scope="module")
def redis_repo(sqlite_repo, redis_url, tmp_path_factory):
    repo = init_repo(tmp_path_factory.mktemp("feast-redis") / "repo", online="redis", redis=redis_url)
    shutil.copytree(sqlite_repo[0] / "data" / "offline", repo / "data" / "offline")
    apply(repo)
    materialize(repo, progress=False)
    return repo, sqlite_repo[1]


@pytest.fixture(params=["sqlite", "redis"])
def online_repo(request):
    return request.getfixturevalue(f"{request.param}_repo")


def _all_users(world):
    t = world[1]
    return np.unique(np.concatenate([t["actions"].column("user_id").to_numpy(),
                                     t["impressions"].column("user_id").to_numpy(), [COLD_USER, 123456]]))


# --- token blobs ------------------------------------------------------------------------------

def test_token_blob_roundtrip():
    rng = np.random.default_rng(0)
    T = 37
    ts = np.sort(rng.integers(0, 1 << 41, T))[::-1]
    emb = rng.integers(-127, 128, (T, 32)).astype(np.int8)
    act = rng.integers(0, 32, T).astype(np.uint8)
    surf = rng.integers(0, 4, T).astype(np.int8)
    blob = encode_tokens(ts, emb, act, surf)
    assert len(blob) == HEADER_BYTES + T * TOKEN_BYTES == 8 + 42 * T
    empty = encode_tokens(ts[:0], emb[:0], act[:0], surf[:0])
    assert len(empty) == HEADER_BYTES  # never an empty value
    tok = decode_tokens([blob, None, empty, blob], cap=20)
    assert tok.offsets.tolist() == [0, 20, 20, 20, 40]
    assert np.array_equal(tok.ts[:20], ts[:20]) and np.array_equal(tok.emb_q[20:], emb[:20])
    assert np.array_equal(tok.action[:20], act[:20]) and np.array_equal(tok.surface[:20], surf[:20])
    assert tok.item_id is None and tok.engaged is None
    full = decode_tokens([encode_tokens(ts, emb, act, surf, item_id=ts + 1, engaged=act % 2)])
    assert np.array_equal(full.item_id, ts + 1) and np.array_equal(full.engaged, act % 2)
    with pytest.raises(ValueError, match="does not hold"):
        decode_tokens([blob[:-1]])
    with pytest.raises(ValueError, match="not a version-"):
        decode_tokens([b"XX" + blob[2:]])


def test_definitions_match_the_module_constants(sqlite_repo):
    store = open_store(sqlite_repo[0])
    views = {fv.name: fv for fv in store.list_feature_views()}
    for view, feats in VIEW_FEATURES.items():
        assert [f.name for f in views[view].features] == list(feats)
        assert views[view].ttl.total_seconds() == 0 and views[view].online
    for iv, feat in INDEX_VIEWS.values():
        assert [f.name for f in views[iv].features] == [feat] and not views[iv].online
    assert [f.name for f in views[ITEM_VIEW].features] == [ITEM_FEATURE]
    assert {p.name for p in store.list_data_sources() if type(p).__name__ == "PushSource"} == {RT_PUSH, IMP_PUSH}
    svc = store.get_feature_service(SERVICE)
    assert sorted(p.name for p in svc.feature_view_projections) == sorted(VIEW_FEATURES)
    assert [p.name for p in store.get_feature_service(ITEM_SERVICE).feature_view_projections] == [ITEM_VIEW]
    for view, rel in OFFLINE_DIRS.items():
        src = views[view].batch_source
        assert src.path == rel, view


# --- apply -> materialise -> online read -------------------------------------------------------

def test_online_sequences_are_exact(online_repo, world, reference):
    repo, summary = online_repo
    store = open_store(repo)
    users = _all_users(world)
    got = online_sequences(store, users, CFG)
    want = reference.sequences(users, np.full(len(users), summary["until_ms"]))
    _assert_same(got, want, "online")
    cold = np.flatnonzero(np.isin(users, [COLD_USER, 123456]))
    for s in got:  # cold users: empty sequences
        assert all(int(s.offsets[c + 1] - s.offsets[c]) == 0 for c in cold)
    assert sum(int(s.offsets[-1]) for s in got) > 0
    items = world[1]["items"]
    ids = items.column("item_id").to_numpy()[::-3]
    emb = online_item_emb_q(store, ids)
    assert np.array_equal(emb, reference.item_emb_q_of(ids))
    with pytest.raises(SchemaError):
        online_item_emb_q(store, [ids[0], 10**12])
    assert not online_item_emb_q(store, [10**12], unknown="zero").any()


def test_only_cold_users(online_repo):
    ll, rt, imp = online_sequences(open_store(online_repo[0]), [COLD_USER, 7_777_777], CFG)
    for s in (ll, rt, imp):
        assert s.offsets.tolist() == [0, 0, 0] and s.emb_q.shape == (0, 32) and s.ts.dtype == torch.int64


def test_sqlite_and_redis_store_identical_values(sqlite_repo, redis_repo, world):
    users = _all_users(world)
    a = OnlineSequences(sqlite_repo[0]).raw(users)
    b = OnlineSequences(redis_repo[0]).raw(users)
    assert a == b
    assert sum(v is not None for v in a[VIEW_FEATURES[LL_VIEW][0]]) > 0


def test_feast_materialize_engine_matches_direct(sqlite_repo, world, tmp_path):
    repo = init_repo(tmp_path / "repo")
    shutil.copytree(sqlite_repo[0] / "data" / "offline", repo / "data" / "offline")
    apply(repo)
    materialize(repo, engine="feast", progress=False)
    users = _all_users(world)
    assert OnlineSequences(repo).raw(users) == OnlineSequences(sqlite_repo[0]).raw(users)


# --- point-in-time (training) reads ------------------------------------------------------------

def _probe_requests(world, summary):
    """The world's requests plus requests on every action / impression time, one ms later,
    and on snapshot instants -- every boundary where an off-by-one would leak or drop."""
    t = world[1]
    req = t["requests"]
    u = [req.column("user_id").to_numpy()]
    ts = [req.column("ts").to_numpy()]
    for name in ("actions", "impressions"):
        eu, et = t[name].column("user_id").to_numpy()[::5], t[name].column("ts").to_numpy()[::5]
        u += [eu, eu]
        ts += [et, et + 1]
    days = np.arange(summary["since_ms"], summary["until_ms"], DAY_MS)
    for usr in (0, 11, LATE_USER, COLD_USER):
        u.append(np.full(len(days), usr))
        ts.append(days)
    u, ts = np.concatenate(u), np.concatenate(ts)
    ok = (ts >= summary["since_ms"]) & (ts <= summary["until_ms"])
    return u[ok], ts[ok]


@pytest.mark.parametrize("payload", ["index", "feast"])
def test_historical_sequences_match_the_contract(sqlite_repo, world, reference, payload):
    repo, summary = sqlite_repo
    users, ts = _probe_requests(world, summary)
    hist = HistoricalSequences(repo, CFG, payload=payload)
    got = hist.sequences(users, ts)
    _assert_same(got, reference.sequences(users, ts), f"historical/{payload}")
    ll, rt, imp = got
    # no future event leaks in: every token is strictly older than its request
    for s, bound in ((ll, (ts // DAY_MS) * DAY_MS), (rt, ts), (imp, ts)):
        tok_req = torch.repeat_interleave(torch.as_tensor(bound), s.lengths)
        assert bool((s.ts < tok_req).all())
    late = np.flatnonzero(users == LATE_USER)
    early = late[ts[late] < T0 + 5 * DAY_MS]
    assert len(early) and all(int(rt.lengths[k]) == 0 for k in early)  # rows only after t: empty


def test_historical_refuses_times_outside_the_sources(sqlite_repo):
    repo, summary = sqlite_repo
    hist = HistoricalSequences(repo, CFG)
    with pytest.raises(ValueError, match="must lie in"):
        hist.sequences([0], [summary["since_ms"] - 1])
    with pytest.raises(ValueError, match="exceeds"):
        HistoricalSequences(repo, FeatureConfig(ll_cap=51, rt_cap=12, imp_cap=5, r=4))


def test_historical_with_smaller_caps(sqlite_repo, world):
    repo, summary = sqlite_repo
    small = FeatureConfig(ll_cap=7, rt_cap=3, imp_cap=2, k_ll=2, k_rt=2, r=2, k_imp=2)
    t = world[1]
    ref = EventStore(t["items"], t["actions"], t["impressions"], small)
    users, ts = _probe_requests(world, summary)
    _assert_same(HistoricalSequences(repo, small).sequences(users, ts), ref.sequences(users, ts), "small caps")


def test_nn_rows_from_feast_equal_the_direct_path(sqlite_repo, world, tmp_path):
    from transact.features.nn_logging import log_nn_features

    repo, _ = sqlite_repo
    log_nn_features(world[0], tmp_path / "direct.parquet", CFG, batch_requests=16, progress=False)
    hist = historical_for_requests(repo, world[0], CFG, chunk=50)
    log_nn_features(world[0], tmp_path / "feast.parquet", CFG, batch_requests=16, progress=False, store=hist)
    a, b = pq.read_table(tmp_path / "direct.parquet"), pq.read_table(tmp_path / "feast.parquet")
    assert a.num_rows == world[1]["requests"].num_rows
    assert a.equals(b)
    assert hist.fetches > 2  # it did go through several chunked Feast calls


# --- streaming pushes ------------------------------------------------------------------------------

def _split(world, frac=0.8):
    t = world[1]
    a_ts = np.sort(t["actions"].column("ts").to_numpy())
    cut = int(a_ts[int(len(a_ts) * frac)])
    return cut


def _after(table, lo, hi=None):
    ts = table.column("ts").to_numpy()
    m = ts >= lo if hi is None else (ts >= lo) & (ts < hi)
    return table.filter(pa.array(m))


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_push_updates_realtime_and_impressions(kind, world, reference, tmp_path, request):
    # its own Redis db: Redis keeps the newest event time per key, and the module's other
    # Redis repo (same project) already holds the complete, newer states
    url = request.getfixturevalue("redis_url") + ",db=1" if kind == "redis" else None
    t = world[1]
    cut = _split(world)
    repo = init_repo(tmp_path / "repo", online=kind, redis=url)
    s = write_offline(world[0], repo, CFG, until_ms=cut, progress=False)
    store = open_store(repo)
    apply(store)
    materialize(store, progress=False)
    users = _all_users(world)
    before = online_sequences(store, users, CFG)
    _assert_same(before, reference.sequences(users, np.full(len(users), cut)), "before push")

    end = int(max(t["actions"].column("ts").to_numpy().max(), t["impressions"].column("ts").to_numpy().max())) + 1
    mid = (cut + end) // 2
    for lo, hi in ((cut, mid), (mid, None)):  # two pushes, in time order
        out = push_events(store, _after(t["actions"], lo, hi), _after(t["impressions"], lo, hi),
                          to="online_and_offline")
        assert out["users"] > 0 and out["rows"][RT_VIEW] > 0
    ll, rt, imp = online_sequences(store, users, CFG)
    want = reference.sequences(users, np.full(len(users), end))
    assert _same(rt, want[1]) and _same(imp, want[2])
    assert _same(ll, before[0])  # lifelong is a daily batch feature: pushes leave it alone
    assert not _same(rt, before[1]) and not _same(imp, before[2])

    # the offline log of the pushes equals what the batch job writes for the same events
    full = init_repo(tmp_path / "full")
    write_offline(world[0], full, CFG, since_ms=s["since_ms"], progress=False)
    for view in (RT_VIEW, IMP_VIEW):
        def rows(r):
            tab = pq.read_table(r / OFFLINE_DIRS[view])
            ms = tab.column(TS_COL).cast(pa.int64()).to_numpy() // 1000
            return sorted((int(u), int(x), b) for u, x, b in zip(tab.column(USER_KEY).to_numpy(), ms,
                                                               tab.column(VIEW_FEATURES[view][0]).to_pylist())
                          if x > cut)
        assert rows(repo) == rows(full), view


def test_push_to_a_cold_user_and_unknown_items(sqlite_repo, tmp_path):
    repo = init_repo(tmp_path / "repo")
    shutil.copytree(sqlite_repo[0] / "data" / "offline", repo / "data" / "offline")
    store = open_store(repo)
    apply(store)
    materialize(store, progress=False)
    items = pq.read_table(repo / OFFLINE_DIRS[ITEM_VIEW]).column(ITEM_KEY).to_numpy()
    t = sqlite_repo[1]["until_ms"] + 10
    acts = pa.table({"user_id": [4242], "item_id": [int(items[3])], "ts": [t], "action": [2], "surface": [1]})
    imps = pa.table({"user_id": [4242, 4242], "item_id": [int(items[3]), int(items[4])], "ts": [t - 5, t - 5],
                     "surface": [0, 0], "request_id": [1, 1], "position": [0, 1]})
    push_events(store, acts, imps)
    ll, rt, imp = online_sequences(store, [4242], CFG)
    assert ll.offsets.tolist() == [0, 0] and rt.ts.tolist() == [t] and rt.action.tolist() == [2]
    assert imp.ts.tolist() == [t - 5]  # the impression of items[3] was engaged at t
    assert torch.equal(imp.emb_q[0], torch.from_numpy(online_item_emb_q(store, [items[4]])[0]))
    with pytest.raises(SchemaError):
        push_events(store, pa.table({"user_id": [1], "item_id": [10**12], "ts": [t], "action": [1], "surface": [0]}))


# --- command lines -----------------------------------------------------------------------------

def test_feast_apply_as_a_user_types_it(tmp_path, sqlite_repo):
    """`cd feature_repo && feast apply` on a copy of the checked-in repo."""
    repo = tmp_path / "feature_repo"
    repo.mkdir()
    for f in REPO_TEMPLATE.iterdir():
        if f.is_file():
            shutil.copy2(f, repo / f.name)
    shutil.copytree(sqlite_repo[0] / "data" / "offline", repo / "data" / "offline")
    env = {**os.environ, "FEAST_USAGE": "False"}
    r = subprocess.run([feast_cli(), "apply"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (repo / "data" / "registry.db").exists() and (repo / "data" / "online.db").exists()
    store = open_store(repo)
    assert {fv.name for fv in store.list_feature_views()} >= set(VIEW_FEATURES) | {ITEM_VIEW}
    materialize(store, progress=False)
    assert sum(int(s.offsets[-1]) for s in online_sequences(store, [0, 11, 22], CFG)) > 0


def test_transact_features_commands(tmp_path, world, reference):
    from typer.testing import CliRunner

    from transact.cli import app

    runner = CliRunner()
    repo = tmp_path / "repo"
    cut = _split(world)
    args = ["--repo", str(repo), "--no-progress"]
    r = runner.invoke(app, ["features", "apply", "--world", str(world[0]), "--until-ms", str(cut),
                            "--ll-cap", "50", "--rt-cap", "12", "--imp-cap", "5", *args])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["features", "materialize", *args])
    assert r.exit_code == 0, r.output
    assert "user_lifelong" in r.output
    t = world[1]
    pq.write_table(_after(t["actions"], cut), tmp_path / "a.parquet")
    pq.write_table(_after(t["impressions"], cut), tmp_path / "i.parquet")
    r = runner.invoke(app, ["features", "push", "--repo", str(repo), "--actions", str(tmp_path / "a.parquet"),
                            "--impressions", str(tmp_path / "i.parquet")])
    assert r.exit_code == 0, r.output
    end = int(max(t["actions"].column("ts").to_numpy().max(), t["impressions"].column("ts").to_numpy().max())) + 1
    got = online_sequences(open_store(repo), [0, 11, COLD_USER], CFG)
    want = reference.sequences(np.array([0, 11, COLD_USER]), np.full(3, end))
    assert _same(got[1], want[1]) and _same(got[2], want[2])
    r = runner.invoke(app, ["features", "show", "0", str(COLD_USER), "--repo", str(repo)])
    assert r.exit_code == 0 and f"user {COLD_USER}: S_LL 0 tokens" in r.output, r.output
    r = runner.invoke(app, ["features", "materialize", "--repo", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "error:" in r.output


@pytest.mark.slow
def test_bench_features_smoke(world, tmp_path):
    from typer.testing import CliRunner

    from transact.cli import app

    out = tmp_path / "features.json"
    r = CliRunner().invoke(app, ["bench", "features", "--world", str(world[0]), "--max-users", "4",
                                 "--online", "sqlite", "--engines", "direct", "--reads", "10",
                                 "--ll-cap", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "users/s" in r.output and "packed Bytes blob" in r.output
    import json

    res = json.loads(out.read_text())
    assert res["machine"]["cpu_count"] and res["result"]["encoding"]["ratio"] > 1
    m = res["result"]["stores"]["sqlite"]["materialize"]["direct"]
    assert m["tokens"] > 0 and m["users_per_s"] > 0 and m["rss_peak_mib"] >= m["rss_base_mib"] > 0
    assert res["result"]["stores"]["sqlite"]["read"]["sequences_p50_ms"] > 0


@pytest.mark.slow
def test_tiny_simulated_world_end_to_end(tmp_path):
    """The pipeline step on the simulator's tiny world: online state and the logged NN
    training rows through Feast equal the direct path."""
    from transact.components.steps import materialize_features
    from transact.data import simulator as sim
    from transact.features.nn_logging import log_nn_features

    world = tmp_path / "world"
    sim.simulate(sim.get_profile("tiny"), world, seed=0, progress=False)
    cfg = FeatureConfig(ll_cap=2048)
    out = materialize_features(str(world), str(tmp_path / "repo"), progress=False)  # default caps >= cfg's
    assert out["materialize"]["views"][LL_VIEW]["entities"] > 0
    ref = EventStore.from_dir(world, cfg)
    users = np.unique(pq.read_table(world / "actions.parquet", columns=["user_id"]).column(0).to_numpy())
    got = online_sequences(open_store(tmp_path / "repo"), users, cfg)
    _assert_same(got, ref.sequences(users, np.full(len(users), out["offline"]["until_ms"])), "tiny online")
    log_nn_features(world, tmp_path / "direct.parquet", cfg, progress=False, store=ref)
    hist = historical_for_requests(tmp_path / "repo", world, cfg)
    log_nn_features(world, tmp_path / "feast.parquet", cfg, progress=False, store=hist)
    assert pq.read_table(tmp_path / "direct.parquet").equals(pq.read_table(tmp_path / "feast.parquet"))


def test_training_service_join_keeps_every_request(sqlite_repo, world):
    """One get_historical_features over the whole training_v2 service (three views): every
    entity row comes back, with the row time in force (base rows at `since`)."""
    import pandas as pd

    repo, summary = sqlite_repo
    users, ts = _probe_requests(world, summary)
    keys = np.unique(np.stack([users, ts], 1), axis=0)
    store = open_store(repo)
    entity_df = pd.DataFrame({"user_id": keys[:, 0], "event_timestamp": pd.to_datetime(keys[:, 1], unit="ms", utc=True)})
    df = store.get_historical_features(entity_df=entity_df,
                                       features=store.get_feature_service(TRAIN_SERVICE)).to_df()
    known = ~np.isin(keys[:, 0], [COLD_USER])
    assert len(df) >= known.sum()
    got = df[df.user_id != COLD_USER]
    ts_ms = ((got.event_timestamp - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).to_numpy()
    for feat in ("rt_asof_ms", "imp_asof_ms"):
        assert (got[feat].to_numpy() <= ts_ms).all() and got[feat].notna().all()
    assert (got["ll_asof_ms"].to_numpy() <= (ts_ms // DAY_MS) * DAY_MS).all()
