"""Features are a pure function of the set of events (issue 16, items 2 and 3).

- Any permutation of the world's rows gives byte-identical NN rows and offline feature
  rows (impressions of one request share a ts: ties used to fall to storage order).
- Sequences stay exact past 2^21 users, with ids near 2^62 and times beyond 42 bits
  (a user rank packed above 42 bits of time used to mix users' sequences).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, example, given, settings, strategies as st

from helpers import make_items, write_world
from transact.data import schema as S
from transact.data.world import publishing
from transact.features.config import FeatureConfig
from transact.features.event_order import dense_rank, event_order, group_offsets, pair_ids, search_in_groups
from transact.features.nn_logging import log_nn_features
from transact.features.sequences import EventStore

CFG = FeatureConfig(ll_cap=50, rt_cap=10, imp_cap=8, k_ll=6, k_rt=3, r=4, k_imp=3)
TABLES = ("items", "actions", "impressions", "requests")


def _with_ties(actions: pa.Table, rng: np.random.Generator) -> pa.Table:
    """Actions where a third of the rows share the ts of another row of the same user."""
    cols = {c: actions.column(c).to_numpy().copy() for c in actions.column_names}
    o = np.lexsort((cols["ts"], cols["user_id"]))
    pick = o[1:][rng.random(len(o) - 1) < 0.33]
    prev = o[:-1][np.isin(o[1:], pick)]
    same_user = cols["user_id"][pick] == cols["user_id"][prev]
    cols["ts"][pick[same_user]] = cols["ts"][prev[same_user]]
    return pa.table(cols, schema=S.ACTIONS_TABLE)


def _publish(folder, tables: dict[str, pa.Table], seed: int | None) -> None:
    """Writes the tables, each in a random row order (``seed`` None: as given)."""
    rng = np.random.default_rng(seed)
    with publishing(folder) as stage:
        for name, t in tables.items():
            if seed is not None:
                t = t.take(pa.array(rng.permutation(t.num_rows)))
            pq.write_table(t, stage / f"{name}.parquet")


def _world(tmp_path) -> dict[str, pa.Table]:
    items, actions, impressions, requests = write_world(tmp_path / "base")
    actions = _with_ties(actions, np.random.default_rng(5))
    return dict(zip(TABLES, (items, actions, impressions, requests)))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(seed=0)
@given(seed=st.integers(0, 2**32 - 1))
def test_nn_rows_do_not_depend_on_row_order(tmp_path_factory, seed):
    d = tmp_path_factory.mktemp("order")
    tables = _world(d)
    _publish(d / "as-given", tables, None)
    _publish(d / "shuffled", tables, seed)
    a = log_nn_features(d / "as-given", d / "a.parquet", CFG, batch_requests=7, progress=False)
    b = log_nn_features(d / "shuffled", d / "b.parquet", CFG, batch_requests=5, progress=False)
    assert a["rows"] == b["rows"] == tables["requests"].num_rows
    ta, tb = pq.read_table(d / "a.parquet"), pq.read_table(d / "b.parquet")
    for col in ta.column_names:  # per column: a difference names the segment
        assert ta.column(col).equals(tb.column(col)), col


def test_offline_feature_rows_do_not_depend_on_row_order(tmp_path):
    """The Feast path (what serving reads) cuts its windows in the same order."""
    from transact.features.feast.offline import write_offline

    tables = _world(tmp_path)
    _publish(tmp_path / "as-given", tables, None)
    _publish(tmp_path / "shuffled", tables, 7)
    out = {}
    for name in ("as-given", "shuffled"):
        repo = tmp_path / f"repo-{name}"
        write_offline(tmp_path / name, repo, CFG, progress=False)
        out[name] = {p.relative_to(repo).as_posix(): pq.read_table(p)
                     for p in sorted((repo / "data" / "offline").rglob("*.parquet"))}
    assert out["as-given"].keys() == out["shuffled"].keys() and out["as-given"]
    for part, t in out["as-given"].items():
        assert t.equals(out["shuffled"][part]), part


def test_sequences_stay_exact_past_2_pow_21_users_with_huge_ids_and_times():
    """2^21 + 64 users with ids near 2^62, one action each, and a handful of users with
    several events whose times span more than 2^42 ms: every sequence is its own user's."""
    rng = np.random.default_rng(0)
    items = make_items(8, rng)
    item_ids = items.column("item_id").to_numpy()
    n_users = (1 << 21) + 64
    base = np.int64(1 << 62)
    users = base + np.arange(n_users, dtype=np.int64) * 3  # sparse and huge
    t0 = 1_000
    ts = np.full(n_users, t0, dtype=np.int64)
    # the probed users: low and high ranks, several actions, times past 2^42 ms apart
    probe = np.array([0, 1, n_users // 2, (1 << 21) - 1, 1 << 21, n_users - 1])
    extra_u = np.repeat(users[probe], 3)
    extra_t = np.tile(np.array([t0 + 1, t0 + (1 << 43), t0 + (1 << 44)], np.int64), len(probe))
    u_all = np.concatenate([users, extra_u])
    t_all = np.concatenate([ts, extra_t])
    item = item_ids[np.arange(len(u_all)) % len(item_ids)]
    actions = pa.table({"user_id": u_all, "item_id": item, "ts": t_all,
                        "action": np.ones(len(u_all), np.uint8), "surface": np.zeros(len(u_all), np.int8)},
                       schema=S.ACTIONS_TABLE)
    cfg = FeatureConfig(ll_cap=10, rt_cap=10, imp_cap=2, r=2, k_ll=2, k_rt=2, k_imp=1, ll_refresh_ms=0)
    store = EventStore(items, actions, S.IMPRESSIONS.empty_table(), cfg)
    q_t = np.full(len(probe), t0 + (1 << 45), dtype=np.int64)
    _, rt, _ = store.sequences(users[probe], q_t)
    assert rt.lengths.tolist() == [4] * len(probe)
    for k in range(len(probe)):
        lo, hi = int(rt.offsets[k]), int(rt.offsets[k + 1])
        assert rt.ts[lo:hi].tolist() == [t0 + (1 << 44), t0 + (1 << 43), t0 + 1, t0], k
    # one instant after the first action: only the user's own first action
    _, rt, _ = store.sequences(users[probe], np.full(len(probe), t0 + 1))
    assert rt.lengths.tolist() == [1] * len(probe)
    # an id next to a user's, never seen: a cold user
    _, rt, _ = store.sequences(users[probe] + 1, q_t)
    assert rt.lengths.tolist() == [0] * len(probe)


# --- the helpers, against their one-group-at-a-time definitions -------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.data(), side=st.sampled_from(["left", "right"]))
def test_search_in_groups_is_searchsorted_per_group(data, side):
    lens = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=6))
    big = st.integers(-(2**63), 2**63 - 1)
    values = np.concatenate([np.sort(np.array(data.draw(st.lists(big, min_size=n, max_size=n)), np.int64))
                             for n in lens]) if sum(lens) else np.zeros(0, np.int64)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    q = data.draw(st.lists(st.tuples(st.integers(0, len(lens) - 1), big), min_size=1, max_size=10))
    g = np.array([x[0] for x in q])
    x = np.array([x[1] for x in q], np.int64)
    got = search_in_groups(values, off[g], off[g + 1], x, side)
    want = [np.searchsorted(values[off[gi]:off[gi + 1]], xi, side) + off[gi] for gi, xi in zip(g, x)]
    assert got.tolist() == want


@settings(max_examples=40, deadline=None)
@given(a=st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 3)), max_size=12),
       b=st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 3)), max_size=12))
def test_pair_ids_are_dense_and_exact(a, b):
    arr = lambda xs, i: np.array([p[i] for p in xs], np.int64)  # noqa: E731
    ia, ib, n = pair_ids((arr(a, 0), arr(a, 1)), (arr(b, 0), arr(b, 1)))
    pairs = a + b
    ids = np.concatenate([ia, ib]).tolist()
    assert n == len(set(pairs)) and sorted(set(ids)) == list(range(n))
    for i in range(len(pairs)):
        for j in range(len(pairs)):
            assert (ids[i] == ids[j]) == (pairs[i] == pairs[j])


@settings(max_examples=60, deadline=None)
@given(xy=st.one_of(
    st.lists(st.tuples(st.integers(-3, 40), st.integers(-(2**40), 2**40)), max_size=30),  # one int64 key
    st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 3)), max_size=30)))  # lexsort
def test_pair_order_sorts_pairs_as_lexsort(xy):
    """Both branches of pair_order (one packed int64 key; lexsort when the ranges do not fit
    63 bits) sort the pairs as np.lexsort does (equal pairs may come in any order)."""
    from transact.features.event_order import pair_order

    x = np.array([p[0] for p in xy], np.int64)
    y = np.array([p[1] for p in xy], np.int64)
    o, want = pair_order(x, y), np.lexsort((y, x))
    assert sorted(o.tolist()) == list(range(len(xy)))
    assert np.array_equal(x[o], x[want]) and np.array_equal(y[o], y[want])


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2)), max_size=25),
       presort=st.booleans())
def test_event_order_on_sorted_and_unsorted_tables(rows, presort):
    """Rows already in the order (the usual table) take the identity without a lexsort;
    any other order gets lexsort's permutation. Either way the rows come out sorted, equal
    rows in their table order (stable)."""
    if presort:
        rows = sorted(rows)
    cols = [np.array([r[i] for r in rows], np.int64) for i in range(3)]
    o = event_order(*cols)
    assert np.array_equal(o, np.lexsort(cols[::-1]))
    if presort:
        assert o.tolist() == list(range(len(rows)))


def test_event_order_is_total_and_group_offsets_count():
    user = np.array([5, 5, 2, 5, 2], np.int64)
    ts = np.array([1, 1, 9, 1, 3], np.int64)
    item = np.array([3, 1, 0, 2, 0], np.int64)
    o = event_order(user, ts, item)
    assert o.tolist() == [4, 2, 1, 3, 0]
    rank, known = dense_rank(np.unique(user), user[o])
    assert known.all() and group_offsets(rank, 2).tolist() == [0, 2, 5]
