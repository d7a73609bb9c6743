"""Tests of the synthetic world (transact.data.simulator)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from transact.data import simulator as sim
from transact.data.io import table_path
from transact.data.quantization import quantize
from transact.data.schema import ACTION_BIT, EXPLICIT_ACTIONS, LABEL_COLUMNS, TABLES
from transact.data.simulator import (
    DAY_MS,
    DriftConfig,
    WorldConfig,
    draw_user,
    get_profile,
    heaviest_users,
    simulate,
)

SEED = 7
TINY = get_profile("tiny")


def _read(out, name) -> pd.DataFrame:
    return pq.read_table(table_path(out, name)).to_pandas()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    summary = simulate(TINY, out, seed=SEED, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def tables(world):
    out, _ = world
    return {name: _read(out, name) for name in TABLES}


# ----------------------------------------------------------------- profiles / config


def test_profiles_and_unknown_name():
    assert set(sim.PROFILES) == {"tiny", "demo", "bench"}
    assert get_profile("demo") == WorldConfig()
    with pytest.raises(ValueError, match="tiny.*demo.*bench"):
        get_profile("huge")


@pytest.mark.parametrize("bad", [
    {"request_days": 800}, {"chunk_size": 0}, {"dormant_frac": 1.5},
    {"surface_probs": (1.0, 0.0, 0.0)}, {"action_delay_ms": 5_000},
    {"user_ids": (3, 1)}, {"w_long": (1.0,)},
])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="^WorldConfig: "):
        replace(TINY, **bad)


def test_drift_validation():
    with pytest.raises(ValueError, match="kind"):
        DriftConfig(kind="sideways")
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        DriftConfig(kind="new_items", strength=2.0)


# ----------------------------------------------------------------- tables


def test_schemas_match(world):
    out, _ = world
    for name, schema in TABLES.items():
        assert pq.read_schema(table_path(out, name)).equals(schema, check_metadata=False), name
    assert not list(out.glob("*.tmp-*"))


def test_world_json_summary(world, tables):
    out, summary = world
    on_disk = json.loads((out / "world.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert WorldConfig.from_dict(on_disk["config"]) == TINY
    assert on_disk["seed"] == SEED
    for name, df in tables.items():
        assert on_disk["rows"][name] == len(df)
    req = tables["requests"]
    assert summary["request_start_ts"] <= req.ts.min() and req.ts.max() < summary["end_ts"]
    assert summary["request_start_ts"] < summary["train_end_ts"] < summary["end_ts"]
    eval_share = (summary["end_ts"] - summary["train_end_ts"]) / (TINY.request_days * DAY_MS)
    assert 0.1 <= eval_share <= 0.3
    assert (req.ts >= summary["train_end_ts"]).any() and (req.ts < summary["train_end_ts"]).any()


def test_dense_ids_and_sorting(tables):
    items, req, imp, act = tables["items"], tables["requests"], tables["impressions"], tables["actions"]
    assert (items.item_id.to_numpy() == np.arange(TINY.n_items)).all()
    ids = np.unique(req.request_id)
    assert (ids == np.arange(len(ids))).all()
    for df in (req, imp, act):
        assert df.user_id.between(0, TINY.n_users - 1).all()
        assert df.item_id.between(0, TINY.n_items - 1).all()
        key = df.user_id.to_numpy() * 2**45 + (df.ts.to_numpy() - sim.EPOCH_MS)
        assert (np.diff(key) >= 0).all(), "rows sorted by (user_id, ts)"
    # actions ts strictly increase per user; requests never share a ts within a user
    same_user = np.diff(act.user_id.to_numpy()) == 0
    assert (np.diff(act.ts.to_numpy())[same_user] > 0).all()
    per_req = req.groupby("request_id").agg(user_id=("user_id", "first"), ts=("ts", "first"),
                                            n_ts=("ts", "nunique"), n=("item_id", "size"),
                                            n_items=("item_id", "nunique"))
    assert (per_req.n_ts == 1).all() and (per_req.n == TINY.chunk_size).all()
    assert (per_req.n_items == TINY.chunk_size).all(), "candidates unique within a request"
    assert not per_req.duplicated(["user_id", "ts"]).any()
    # impressions mirror the requests
    cols = ["request_id", "user_id", "item_id", "ts", "surface", "position"]
    assert imp[cols].equals(req[cols])


def test_item_embeddings(tables):
    items = tables["items"]
    emb = np.stack(items.emb.to_numpy()).astype(np.float32)
    emb_q = np.stack(items.emb_q.to_numpy())
    norms = np.linalg.norm(emb, axis=1)
    assert norms.min() > TINY.emb_norm_min - 0.01 and norms.max() < TINY.emb_norm_max + 0.01
    assert np.abs(emb).max() < 0.65, "fits the int8 range"
    assert (emb_q == quantize(emb)).all()
    assert items.topic.between(0, TINY.n_topics - 1).all()
    # topic clusters: items are closer to their own topic than to others
    centres = np.stack([emb[items.topic == t].mean(0) for t in range(TINY.n_topics)])
    assert ((emb @ centres.T).argmax(1) == items.topic.to_numpy()).mean() > 0.8


def test_labels_consistent_with_actions(tables):
    req, act = tables["requests"], tables["actions"]
    bits = sum(req[c].astype(np.uint8) * ACTION_BIT[a] for c, a in zip(LABEL_COLUMNS, EXPLICIT_ACTIONS))
    engaged = req.assign(bits=bits)[bits > 0]
    window = act[act.ts >= req.ts.min()]
    assert len(engaged) == len(window), "one action row per engaged candidate, nothing else"
    right = engaged.sort_values("ts")[["user_id", "item_id", "ts", "bits"]]
    m = pd.merge_asof(window.sort_values("ts"), right.rename(columns={"ts": "req_ts"}),
                      left_on="ts", right_on="req_ts",
                      by=["user_id", "item_id"], direction="backward")
    assert m.req_ts.notna().all()
    delay = m.ts - m.req_ts
    assert (delay > 0).all() and (delay <= (TINY.chunk_size + 1) * TINY.action_delay_ms).all()
    assert (m.action == m.bits).all()
    # each action lands before the user's next request
    nxt = req.drop_duplicates("request_id")[["user_id", "ts"]].rename(columns={"ts": "next_ts"})
    m2 = pd.merge_asof(window.sort_values("ts"), nxt.sort_values("next_ts"), left_on="ts",
                       right_on="next_ts", by="user_id", direction="forward")
    assert (m2.next_ts.isna() | (m2.next_ts > m2.ts)).all()
    # actions before the window carry only explicit bits
    assert act.action.between(1, sum(ACTION_BIT[a] for a in EXPLICIT_ACTIONS)).all()


def test_multi_hot_and_rates(tables):
    act, req = tables["actions"], tables["requests"]
    popcount = sum((act.action & ACTION_BIT[a]) > 0 for a in EXPLICIT_ACTIONS)
    assert (popcount >= 2).mean() > 0.05
    both = (act.action & ACTION_BIT["closeup"] > 0) & (act.action & ACTION_BIT["repin"] > 0)
    assert both.any()
    rates = req[list(LABEL_COLUMNS)].mean()
    assert 0.02 < rates.label_repin < 0.3 and 0.02 < rates.label_click < 0.3
    assert 0.001 < rates.label_hide < 0.1
    assert set(req.surface.unique()) <= set(range(len(sim.SURFACES)))
    assert req.surface.value_counts().idxmax() == 0, "homefeed dominates"


def test_hides_follow_dislikes(world, tables):
    req = tables["requests"].merge(tables["items"][["item_id", "topic"]], on="item_id")
    disliked = np.zeros(len(req), bool)
    for u, idx in req.groupby("user_id").indices.items():
        disliked[idx] = np.isin(req.topic.to_numpy()[idx], draw_user(TINY, SEED, u).dislikes)
    assert req.label_hide[disliked].mean() > 5 * req.label_hide[~disliked].mean()


# ----------------------------------------------------------------- determinism


def test_determinism_independent_of_blocking(world, tmp_path):
    out, _ = world
    again = simulate(replace(TINY, block_users=3), tmp_path / "b", seed=SEED, progress=False)
    for name in TABLES:
        assert table_path(out, name).read_bytes() == table_path(tmp_path / "b", name).read_bytes(), name
    assert again["rows"] == json.loads((out / "world.json").read_text())["rows"]


def test_different_seed_differs(tables, tmp_path):
    simulate(TINY, tmp_path, seed=SEED + 1, progress=False)
    for name in TABLES:
        assert not _read(tmp_path, name).equals(tables[name]), name


def test_user_subset_matches_full_world(tables, tmp_path):
    users = (4, 17, 33)
    simulate(replace(TINY, user_ids=users), tmp_path, seed=SEED, progress=False)
    for name in ("actions", "requests"):
        part = _read(tmp_path, name)
        full = tables[name][tables[name].user_id.isin(users)].reset_index(drop=True)
        cols = [c for c in part.columns if c != "request_id"]
        assert part[cols].equals(full[cols]), name
    assert (np.unique(part.request_id) == np.arange(part.request_id.nunique())).all()


# ----------------------------------------------------------------- lifelong signal


def _window_repins_on_returned(cfg, out, seed):
    """(exposures, repins) of candidates from a user's returned dormant interests."""
    summary = json.loads((out / "world.json").read_text())
    req = _read(out, "requests").merge(_read(out, "items")[["item_id", "topic"]], on="item_id")
    day = (req.ts.to_numpy() - summary["start_ts"]) / DAY_MS
    returned = np.zeros(len(req), bool)
    for u, idx in req.groupby("user_id").indices.items():
        p = draw_user(cfg, seed, u)
        for t, on in zip(p.topics, p.dormant_on):
            returned[idx] |= (req.topic.to_numpy()[idx] == t) & (day[idx] >= on)
    return returned.sum(), req.label_repin.to_numpy()[returned].sum()


def test_dormant_interest_only_in_lifelong_history(world, tables):
    out, summary = world
    items = tables["items"][["item_id", "topic"]]
    act = tables["actions"].merge(items, on="item_id").sort_values(["user_id", "ts"])
    # observable in the data: window repins on a topic absent from the user's last 30
    # days but present in the older (lifelong) history
    rep = act[(act.ts >= summary["request_start_ts"]) & (act.action & ACTION_BIT["repin"] > 0)]
    ll_only = 0
    for u, g in rep.groupby("user_id"):
        hist = act[act.user_id == u]
        for ts, topic in zip(g.ts, g.topic):
            older = hist[(hist.ts < ts - 30 * DAY_MS) & (hist.topic == topic)]
            recent = hist[(hist.ts >= ts - 30 * DAY_MS) & (hist.ts < ts) & (hist.topic == topic)]
            ll_only += len(older) > 0 and len(recent) == 0
    assert ll_only / len(rep) > 0
    # ground truth: returned dormant interests are repinned far above the random-topic rate
    n, pos = _window_repins_on_returned(TINY, out, SEED)
    assert n > 50 and pos / n > 0.05
    # ... and their topics went (nearly) silent in the history for months before the return
    asleep_rate, awake_rate = [], []
    for u in range(TINY.n_users):
        p = draw_user(TINY, SEED, u)
        hist = act[act.user_id == u]
        day = (hist.ts.to_numpy() - summary["start_ts"]) / DAY_MS
        for t, off, on in zip(p.topics, p.dormant_off, p.dormant_on):
            if np.isfinite(off) and off - p.join_day > 30:
                on_topic = hist.topic.to_numpy() == t
                awake_rate.append((on_topic & (day < off)).sum() / (off - p.join_day))
                asleep_rate.append((on_topic & (day >= off) & (day < on)).sum() / (on - off))
    assert len(awake_rate) >= 5
    assert np.mean(asleep_rate) < 0.3 * np.mean(awake_rate)


def test_return_affinity_knob_controls_lifelong_signal(world, tmp_path):
    out, _ = world
    off_cfg = replace(TINY, return_affinity=0.0)
    simulate(off_cfg, tmp_path, seed=SEED, progress=False)
    n_on, pos_on = _window_repins_on_returned(TINY, out, SEED)
    n_off, pos_off = _window_repins_on_returned(off_cfg, tmp_path, SEED)
    assert n_on == n_off  # same exposures: the knob only changes the response
    assert pos_on / n_on > 5 * max(pos_off / n_off, 1e-3)


# ----------------------------------------------------------------- drift


def _topic_hist(req, items, n_topics, mask):
    topics = req.merge(items[["item_id", "topic"]], on="item_id").topic.to_numpy()[mask]
    return np.bincount(topics, minlength=n_topics) / max(len(topics), 1)


def test_drift_interest_shift(world, tables, tmp_path):
    drift = DriftConfig(kind="interest_shift", strength=0.8)
    summary = simulate(TINY, tmp_path, seed=SEED, drift=drift, progress=False)
    start = summary["drift"]["start_ts"]
    base, shifted = tables["requests"], _read(tmp_path, "requests")
    # identical before the drift starts
    pd.testing.assert_frame_equal(base[base.ts < start].reset_index(drop=True),
                                  shifted[shifted.ts < start].reset_index(drop=True))
    items = tables["items"]
    h0 = _topic_hist(base, items, TINY.n_topics, base.ts.to_numpy() >= start)
    h1 = _topic_hist(shifted, items, TINY.n_topics, shifted.ts.to_numpy() >= start)
    assert 0.5 * np.abs(h0 - h1).sum() > 0.15


def test_drift_new_items(world, tables, tmp_path):
    drift = DriftConfig(kind="new_items", strength=0.4, start_day=TINY.days - 3)
    summary = simulate(TINY, tmp_path, seed=SEED, drift=drift, progress=False)
    items = _read(tmp_path, "items")
    n_new = len(items) - TINY.n_items
    assert n_new == round(drift.new_items_frac * TINY.n_items)
    assert (items.item_id.to_numpy() == np.arange(len(items))).all()
    assert items.topic[TINY.n_items:].ge(TINY.n_topics).all()
    # base items are unchanged
    assert items.iloc[: TINY.n_items].reset_index(drop=True).equals(tables["items"])
    req = _read(tmp_path, "requests")
    after = req.ts >= summary["drift"]["start_ts"]
    new = req.item_id >= TINY.n_items
    assert not new[~after].any()
    assert 0.25 < new[after].mean() < 0.5


# ----------------------------------------------------------------- atomicity


def test_no_half_written_tables_on_error(monkeypatch, tmp_path):
    calls = {"n": 0}
    real = sim._simulate_user

    def flaky(uid, ctx):
        calls["n"] += 1
        if calls["n"] > 20:  # after a block has been written
            raise RuntimeError("boom")
        return real(uid, ctx)

    monkeypatch.setattr(sim, "_simulate_user", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        simulate(replace(TINY, block_users=8), tmp_path, seed=SEED, progress=False)
    assert not list(tmp_path.glob("*.parquet")), "no table published"
    assert not list(tmp_path.glob("*.tmp-*")), "temporary files removed"
    assert not (tmp_path / "world.json").exists()


# ----------------------------------------------------------------- scale


def test_late_joiners_and_empty_users(tmp_path):
    cfg = replace(TINY, n_users=40, late_join_frac=1.0, sessions_per_day_median=0.05)
    summary = simulate(cfg, tmp_path, seed=SEED, progress=False)
    joins = [draw_user(cfg, SEED, u).join_day for u in range(cfg.n_users)]
    act = _read(tmp_path, "actions")
    for u, j in enumerate(joins):
        assert (act.ts[act.user_id == u] >= sim.EPOCH_MS + j * DAY_MS).all()
    assert summary["n_users"] == 40
    assert act.user_id.nunique() < 40, "some users have no history at all (cold start)"


def test_heaviest_users_are_heavy():
    ids = heaviest_users(TINY, SEED, 5)
    assert len(ids) == 5 and ids == sorted(ids)
    rates = [draw_user(TINY, SEED, u).sessions_per_day for u in range(TINY.n_users)]
    assert np.mean([rates[u] for u in ids]) > np.mean(rates)


@pytest.mark.slow
def test_bench_heavy_users_reach_lifelong_cap(tmp_path):
    cfg = get_profile("bench")
    ids = heaviest_users(cfg, 0, 3)
    summary = simulate(replace(cfg, user_ids=tuple(ids)), tmp_path, seed=0, progress=False)
    act = pq.read_table(table_path(tmp_path, "actions"), columns=["user_id", "ts"]).to_pandas()
    last_req = pq.read_table(table_path(tmp_path, "requests"), columns=["user_id", "ts"]) \
        .to_pandas().groupby("user_id").ts.max()
    lengths = act.merge(last_req.rename("last"), left_on="user_id", right_index=True) \
        .query("ts < last").groupby("user_id").size()
    assert lengths.max() >= 16_384
    assert summary["lifelong_len"]["max"] == lengths.max()


def test_world_knobs_from_the_command_line(tmp_path):
    """Issue 20: `transact simulate --set field=value` for every WorldConfig field, typed,
    checked by WorldConfig itself and recorded in world.json."""
    import json

    from typer.testing import CliRunner

    from transact.cli import app
    from transact.data.overrides import with_overrides
    from transact.data.simulator import get_profile

    cfg = with_overrides(get_profile("tiny"), ["interests_mean=6", "dormant_frac=0.5", "w_long=1,2,-1,1",
                                               "chunk_size=6", "user_ids=0,3", "user_ids=none"])
    assert (cfg.interests_mean, cfg.dormant_frac, cfg.w_long, cfg.chunk_size, cfg.user_ids) == \
        (6.0, 0.5, (1.0, 2.0, -1.0, 1.0), 6, None)
    r = CliRunner().invoke(app, ["simulate", "--profile", "tiny", "--out", str(tmp_path / "w"), "--no-progress",
                                 "--max-users", "4", "--set", "interests_mean=6", "--set", "dormant_frac=0.5"])
    assert r.exit_code == 0, r.output
    recorded = json.loads((tmp_path / "w" / "world.json").read_text())["config"]
    assert recorded["interests_mean"] == 6 and recorded["dormant_frac"] == 0.5
    for bad, words in ((["dormant_fraq=0.5"], "did you mean dormant_frac"), (["w_long=1,2"], "4 comma-separated"),
                       (["n_users=-1"], "n_users must be >= 1"), (["chunk_size=2.5"], "chunk_size"),
                       (["interests_mean"], "field=value"), (["eval_frac=nan"], "eval_frac")):
        r = CliRunner().invoke(app, ["simulate", "--profile", "tiny", "--out", str(tmp_path / "bad"),
                                     *[a for p in bad for a in ("--set", p)]])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, (bad, r.output)
    assert not (tmp_path / "bad").exists()
