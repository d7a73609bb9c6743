"""The synthetic world: a generative model of a Pinterest-like feed (docs/design.md §6.1).

No public data set has lifelong, realtime and impression sequences together, so the
project ships this simulator. It writes the four event tables of
:mod:`transact.data.schema` (``items``, ``actions``, ``impressions``, ``requests``)
plus ``world.json``.

The model, in generation order
------------------------------
Items
    ``n_topics`` topic centres, uniform on the unit sphere in 32-d; topic sizes
    follow a Zipf law. An item is ``centre + noise`` re-scaled to an L2 norm in
    ``[emb_norm_min, emb_norm_max]`` (~0.3-0.6, so every coordinate stays well
    inside the ±0.65 range of the int8 quantisation). Popularity is lognormal
    (heavy-tailed).
Users (one independent random stream per user)
    * activity: sessions per day ~ lognormal (heavy-tailed, capped); some users join
      late (cold start);
    * long-term interests: a few topics (chosen by topic size) with Dirichlet
      weights -- sparse by construction;
    * dormant interests: each non-main interest goes dormant with probability
      ``dormant_frac``: after day ``off`` the user stops looking for it and barely
      reacts to it (LT scaled by ``dormant_affinity``); months later (day ``on``,
      around the request window) it *returns*: the user again engages with it when
      it is shown (LT = ``return_affinity``), but never goes looking for it, so the
      recent history stays silent about it and only the lifelong history (from
      before ``off``) shows the interest. ``return_affinity`` is the knob that
      decides how much signal lives only in S_LL (0: none);
    * a few disliked topics (drive hides).
Sessions and requests
    Sessions form a Poisson process (rate = the user's sessions per day); a session
    issues ~``requests_per_session`` requests ("chunks") of ``chunk_size``
    candidates, each on a surface (homefeed mostly).
Short-term interest
    A random walk over the user's *active* topics: at a session start the intent
    is kept from the previous session with probability ``session_carry``, inside a
    session it jumps with probability ``intent_switch``. The short-term interest
    embedding is an exponentially decayed average of the last ``intent_memory``
    intent centres plus per-session noise, so it drifts within and across sessions.
Candidates
    Each slot picks a retrieval source (probabilities per surface): ``session``
    (the current intent topic), ``recent`` (the active interests), ``lifelong``
    (a lifelong retrieval: all interests, with ``lifelong_dormant_share`` of it on
    the dormant ones), ``popular`` (global popularity) or ``random`` (exploration).
    Topic-based sources draw the item by popularity inside the topic. Candidates
    are unique within a request.
Engagement
    For each candidate and each explicit action a in (click, repin, hide, closeup)::

        logit_a = bias_a + w_long_a * LT + w_short_a * ST + w_dislike_a * DIS
                  + w_pop_a * POP (+ user bias + surface bias for positive actions)
                  - position_bias * position / chunk_size

    LT: the topic's long-term weight relative to the main interest (dormancy
    aware, see above; new drift clusters inherit their parent's); ST: cosine of
    the item with the short-term embedding; DIS: 1 on a disliked topic; POP:
    standardised log popularity. Each action is
    sampled independently, so multi-hot rows happen (closeup + repin, ...).
    An engaged candidate becomes one actions row (its multi-hot bitmask) at the
    request ts plus a small per-position delay, always before the user's next
    request.

Pre-history (the choice)
    The whole ``days`` horizon runs the *same* session/candidate/engagement engine,
    vectorised per user, so the lifelong history has exactly the statistics of the
    request window (no seam in S_RT at the window start). Only the explicit actions
    of the old period are written; impressions and requests (with labels) are
    written for the last ``request_days`` days only. That keeps the output small
    while the lifelong sequences are long (bench: heavy users > 16k actions).
    Consequence: impression sequences only exist inside the window, so S_imp is
    short on its first day (consumers may skip a warm-up day).

Drift (:class:`DriftConfig`), applied from ``start_day`` on
    ``interest_shift`` moves a fraction ``strength`` of every user's interest mass to
    other topics; ``new_items`` appends a new item distribution (new clusters, each
    rotated away from a parent topic) and draws each candidate slot from it with
    probability ``strength``. Drift draws use their own random stream, so all data
    before ``start_day`` is identical with and without drift.

Determinism
    Items use ``default_rng([seed, 0])``, user ``u`` uses ``default_rng([seed, 1, u])``
    (drift: ``[seed, 2, u]``), every draw has a data-independent shape, and rows are
    buffered into fixed-size row groups: the same config and seed give byte-identical
    parquet files whatever ``block_users`` is. Timestamps start at :data:`EPOCH_MS`
    (2024-01-01 UTC). Ids are dense from 0; request ids follow (user_id, ts).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from transact.data.io import AtomicParquetWriter, table_path
from transact.data.labels import label_requests
from transact.data.quantization import quantize
from transact.data.schema import (
    ACTION_BIT,
    ACTIONS_TABLE,
    CONTRADICTS_HIDE,
    EMB_DIM,
    EXPLICIT_ACTIONS,
    IMPRESSIONS,
    ITEMS,
    REQUESTS,
    SURFACES,
)
from transact.data.world import publishing, write_world_json

__all__ = [
    "DAY_MS", "DRIFT_KINDS", "DriftConfig", "EPOCH_MS", "PROFILES", "SOURCES", "UserProfile",
    "WorldConfig", "draw_user", "get_profile", "heaviest_users", "simulate", "topic_weights",
]

EPOCH_MS: int = 1_704_067_200_000  # 2024-01-01T00:00:00Z: fixed so the data is deterministic
DAY_MS: int = 86_400_000
#: Candidate retrieval sources, in the column order of ``WorldConfig.source_probs``.
SOURCES: tuple[str, ...] = ("session", "recent", "lifelong", "popular", "random")
DRIFT_KINDS: tuple[str, ...] = ("none", "interest_shift", "new_items")
ROWS_PER_GROUP: int = 65_536  # fixed row-group size: file bytes do not depend on blocking
N_ACT = len(EXPLICIT_ACTIONS)
_POSITIVE = np.array([a != "hide" for a in EXPLICIT_ACTIONS])  # user/surface bias applies
_BITS = np.array([ACTION_BIT[a] for a in EXPLICIT_ACTIONS], dtype=np.uint8)
_HIDE = EXPLICIT_ACTIONS.index("hide")
#: The engagements a hide excludes on the same impression.
_POSITIVE_OF_HIDE = [EXPLICIT_ACTIONS.index(a) for a in CONTRADICTS_HIDE]
_S_SESSION, _S_RECENT, _S_LIFELONG, _S_POPULAR, _S_RANDOM = range(len(SOURCES))


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of the synthetic world. Per-action tuples follow ``EXPLICIT_ACTIONS``
    (click, repin, hide, closeup); per-surface tuples follow ``SURFACES``."""

    # --- scale and time
    n_users: int = 2_000  #: users, ids 0 .. n_users-1
    n_items: int = 50_000  #: items (before any drift items), ids 0 .. n_items-1
    n_topics: int = 64  #: topic clusters of the item embeddings
    days: int = 730  #: horizon of the world (the lifelong history), from EPOCH_MS
    request_days: int = 14  #: last days with full impressions + requests + labels
    eval_frac: float = 0.2  #: share of request days after ``train_end_ts`` (evaluation window)
    chunk_size: int = 8  #: candidates per request (one "chunk")

    # --- items
    topic_zipf: float = 0.6  #: topic size and topic choice weight ∝ (rank + 1) ** -topic_zipf
    item_spread: float = 0.6  #: norm of an item's noise around its unit topic centre (cluster width)
    emb_norm_min: float = 0.3  #: item embedding L2 norm ~ U[emb_norm_min, emb_norm_max]
    emb_norm_max: float = 0.6
    pop_sigma: float = 1.5  #: item popularity ~ lognormal(0, pop_sigma): heavy tail
    pop_exponent: float = 1.0  #: popularity-driven sampling weight = popularity ** pop_exponent

    # --- activity
    sessions_per_day_median: float = 0.25  #: median user's sessions per day (lognormal)
    sessions_per_day_sigma: float = 1.2  #: lognormal sigma of sessions per day (heavy tail)
    sessions_per_day_max: float = 1.5  #: cap on sessions per day (bounds the heaviest users)
    late_join_frac: float = 0.1  #: users whose account starts at a uniform day of the horizon
    requests_per_session: float = 2.5  #: mean requests per session (1 + Poisson)
    min_session_gap_ms: int = 30 * 60_000  #: minimum idle time between two sessions
    min_request_gap_ms: int = 15_000  #: minimum time between requests of a session
    mean_request_gap_ms: int = 45_000  #: mean time between requests of a session
    action_delay_ms: int = 1_000  #: action at position p: request ts + (p + 1 + U[0,1)) * this
    surface_probs: tuple[float, ...] = (0.75, 0.12, 0.09, 0.04)  #: request surface mix

    # --- long-term tastes
    interests_mean: float = 4.0  #: mean number of interest topics per user (1 + Poisson)
    max_interests: int = 12  #: cap on interest topics per user
    interest_alpha: float = 0.8  #: Dirichlet concentration of the interest weights (low = peaky)
    dislikes_mean: float = 1.5  #: mean number of disliked topics per user (Poisson)
    user_bias_std: float = 0.4  #: std of a per-user offset of the positive-action logits

    # --- dormant interests (the signal that lives only in the lifelong history)
    dormant_frac: float = 0.35  #: probability that a non-main interest goes dormant
    dormant_min_days: float = 60.0  #: dormancy length ~ U[dormant_min_days, dormant_max_days]
    dormant_max_days: float = 300.0
    return_lead_days: float = 30.0  #: returns happen ~ U[window start - this, horizon end]
    dormant_affinity: float = 0.05  #: LT multiplier while asleep (nearly no engagement)
    #: LT of a returned interest (1 = like the main interest; 0 = no lifelong-only signal)
    return_affinity: float = 1.5
    #: share of the lifelong retrieval source spent on interests absent from recent activity
    lifelong_dormant_share: float = 0.5

    # --- short-term interest
    session_carry: float = 0.3  #: P(a session keeps the previous session's intent topic)
    intent_switch: float = 0.3  #: P(the intent topic jumps at a request inside a session)
    intent_decay: float = 0.6  #: decay of the short-term embedding's average over past intents
    intent_memory: int = 6  #: number of past intents in that average
    intent_noise: float = 0.3  #: norm of the per-session noise added to the short-term embedding

    # --- candidates: per surface, probabilities of SOURCES (session, recent, lifelong, popular, random)
    source_probs: tuple[tuple[float, ...], ...] = (
        (0.15, 0.30, 0.15, 0.15, 0.25),  # homefeed
        (0.70, 0.10, 0.05, 0.10, 0.05),  # search
        (0.60, 0.15, 0.05, 0.10, 0.10),  # related
        (0.30, 0.30, 0.10, 0.15, 0.15),  # profile
    )

    # --- engagement logits, per action (click, repin, hide, closeup)
    action_bias: tuple[float, ...] = (-5.3, -6.4, -4.2, -5.2)
    w_long: tuple[float, ...] = (1.6, 2.6, -1.5, 1.4)  #: weight of long-term affinity LT
    w_short: tuple[float, ...] = (2.2, 1.8, -1.0, 2.2)  #: weight of short-term affinity ST
    w_dislike: tuple[float, ...] = (-2.0, -2.5, 3.5, -1.5)  #: weight of the disliked-topic flag
    w_pop: tuple[float, ...] = (0.3, 0.3, -0.1, 0.3)  #: weight of standardised log popularity
    surface_bias: tuple[float, ...] = (0.0, 0.4, 0.2, 0.1)  #: positive-action offset per surface
    position_bias: float = 0.0  #: logit penalty at the last position of a chunk (linear)

    # --- engineering (do not change the data)
    user_ids: tuple[int, ...] | None = None  #: simulate only these users (ids kept), e.g. heavy ones
    block_users: int = 64  #: users per processing block (memory bound; output is identical)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"WorldConfig: {msg}")

        for name in ("n_users", "n_items", "n_topics", "days", "request_days", "chunk_size",
                     "max_interests", "intent_memory", "block_users"):
            check(int(getattr(self, name)) >= 1, f"{name} must be >= 1")
        check(self.request_days < self.days, "request_days must be < days")
        check(2 <= self.n_topics <= self.n_items, "need 2 <= n_topics <= n_items")
        check(self.chunk_size <= min(self.n_items, 32_767), "chunk_size too large")
        check(0 < self.emb_norm_min <= self.emb_norm_max < 0.65 * math.sqrt(EMB_DIM),
              "emb norms must satisfy 0 < min <= max")
        check(0.0 <= self.eval_frac < 1.0, "eval_frac must be in [0, 1)")
        check(self.sessions_per_day_median > 0 and self.sessions_per_day_max > 0,
              "sessions per day must be > 0")
        check(self.requests_per_session >= 1, "requests_per_session must be >= 1")
        check(self.mean_request_gap_ms >= self.min_request_gap_ms > 0, "bad request gaps")
        check(self.action_delay_ms * (self.chunk_size + 1) < self.min_request_gap_ms,
              "action_delay_ms * (chunk_size + 1) must be < min_request_gap_ms "
              "(actions must land before the next request)")
        check(self.min_session_gap_ms >= self.min_request_gap_ms, "min_session_gap_ms too small")
        check(self.dormant_max_days >= self.dormant_min_days >= 0, "bad dormancy lengths")
        for name in ("late_join_frac", "dormant_frac", "session_carry", "intent_switch",
                     "lifelong_dormant_share"):
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        check(len(self.surface_probs) == len(SURFACES), f"surface_probs needs {len(SURFACES)} values")
        check(len(self.source_probs) == len(SURFACES)
              and all(len(r) == len(SOURCES) for r in self.source_probs),
              f"source_probs must be {len(SURFACES)} rows of {len(SOURCES)}")
        for row in (self.surface_probs, *self.source_probs):
            check(min(row) >= 0 and abs(sum(row) - 1) < 1e-6, f"probabilities {row} must sum to 1")
        for name in ("action_bias", "w_long", "w_short", "w_dislike", "w_pop"):
            check(len(getattr(self, name)) == N_ACT, f"{name} needs one value per {EXPLICIT_ACTIONS}")
        check(len(self.surface_bias) == len(SURFACES), "surface_bias needs one value per surface")
        if self.user_ids is not None:
            ids = list(self.user_ids)
            check(all(0 <= u < self.n_users for u in ids), "user_ids must be in [0, n_users)")
            check(ids == sorted(set(ids)), "user_ids must be sorted and unique")

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists -> tuples)."""
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v
        return cls(**{k: tup(v) for k, v in d.items()})


@dataclass(frozen=True)
class DriftConfig:
    """Drift injected into the final period, for monitoring experiments.

    Attributes:
        kind: "none", "interest_shift" (users' interest mass moves to other topics)
            or "new_items" (a new item distribution enters the candidates).
        strength: interest_shift: share of every user's interest mass moved;
            new_items: probability that a candidate slot is a new item.
        start_day: first drifted day (from EPOCH_MS); None = middle of the request window.
        new_topics: new_items: number of new item clusters.
        new_items_frac: new_items: number of new items as a share of ``n_items``.
        new_topic_angle: new_items: angle (radians) between a new cluster's centre and
            its parent topic; users like a new cluster as much as its parent.
    """

    kind: str = "none"
    strength: float = 0.5
    start_day: int | None = None
    new_topics: int = 4
    new_items_frac: float = 0.1
    new_topic_angle: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"DriftConfig.kind must be one of {DRIFT_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError("DriftConfig.strength must be in [0, 1]")
        if self.new_topics < 1 or self.new_items_frac <= 0:
            raise ValueError("DriftConfig.new_topics and new_items_frac must be > 0")

    def resolved_start_day(self, cfg: WorldConfig) -> int:
        return cfg.days - cfg.request_days // 2 if self.start_day is None else int(self.start_day)


PROFILES: dict[str, WorldConfig] = {
    # Tests: seconds. Shorter horizon, but still months of dormancy before the window.
    "tiny": WorldConfig(n_users=50, n_items=2_000, n_topics=16, days=240, request_days=7,
                        sessions_per_day_median=0.4, sessions_per_day_max=3.0,
                        dormant_min_days=45, dormant_max_days=150, block_users=16),
    # make demo: < 60 s on 2 cores, ~10^5 request rows, lifelong lengths up to a few thousand.
    "demo": WorldConfig(),
    # Kernel/serving benchmarks: heavy users reach L_LL = 16,384 actions over 2 years.
    "bench": WorldConfig(n_users=4_000, n_items=200_000, n_topics=128, request_days=7,
                         sessions_per_day_median=0.4, sessions_per_day_sigma=1.4,
                         sessions_per_day_max=10.0, interests_mean=6.0, block_users=32),
}


def get_profile(name: str) -> WorldConfig:
    """The named profile's :class:`WorldConfig`."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown world profile {name!r}; valid: {', '.join(PROFILES)}") from None


# --------------------------------------------------------------------------- items


@dataclass
class _Items:
    """Item side of the world plus the structures that make sampling vectorised."""

    topic: np.ndarray  # [N] int32, base topic or new topic id (>= n_topics)
    emb: np.ndarray  # [N, D] fp16, what the tables store
    unit: np.ndarray  # [N, D] fp32, L2-normalised stored embedding (for ST)
    pop_z: np.ndarray  # [N] fp32, standardised log popularity
    centres: np.ndarray  # [T_all, D] fp32 unit topic centres (base then new)
    parent: np.ndarray  # [T_all] base topic whose users' taste a topic inherits
    n_base: int  # base items are 0 .. n_base-1; new (drift) items follow
    # popularity sampling: base items sorted by topic, cumulative weights in that order
    order: np.ndarray
    cum: np.ndarray
    lo: np.ndarray  # [T] cumulative weight before topic t
    hi: np.ndarray  # [T] cumulative weight after topic t
    first: np.ndarray  # [T] first position of topic t in ``order``
    last: np.ndarray  # [T] last position of topic t in ``order``
    new_cum: np.ndarray | None = None  # cumulative weights over new items


def topic_weights(cfg: WorldConfig) -> np.ndarray:
    """Zipf topic shares (deterministic): item counts and interest choice follow them."""
    w = (np.arange(cfg.n_topics) + 1.0) ** -cfg.topic_zipf
    return w / w.sum()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _item_embeddings(rng, centres, topic, cfg) -> np.ndarray:
    """centre + isotropic noise of norm ~item_spread, re-scaled to a norm in [min, max]."""
    noise = rng.standard_normal((len(topic), EMB_DIM)) * (cfg.item_spread / math.sqrt(EMB_DIM))
    norm = rng.uniform(cfg.emb_norm_min, cfg.emb_norm_max, size=(len(topic), 1))
    return (_unit(centres[topic] + noise) * norm).astype(np.float16)


def _make_items(cfg: WorldConfig, seed: int, drift: DriftConfig) -> _Items:
    rng = np.random.default_rng([seed, 0])
    centres = _unit(rng.standard_normal((cfg.n_topics, EMB_DIM))).astype(np.float32)
    # every topic gets at least one item, the rest by Zipf share
    topic = np.concatenate([np.arange(cfg.n_topics),
                            rng.choice(cfg.n_topics, cfg.n_items - cfg.n_topics, p=topic_weights(cfg))])
    topic = np.sort(topic).astype(np.int32)  # ids grouped by topic is fine: ids carry no meaning
    topic = topic[rng.permutation(cfg.n_items)]  # ... but shuffle so that id order is not topic order
    emb = _item_embeddings(rng, centres, topic, cfg)
    log_pop = rng.standard_normal(cfg.n_items) * cfg.pop_sigma
    mu, sd = log_pop.mean(), max(log_pop.std(), 1e-6)
    parent = np.arange(cfg.n_topics)

    new_cum = None
    if drift.kind == "new_items":
        drng = np.random.default_rng([seed, 3])
        n_new = max(1, int(round(drift.new_items_frac * cfg.n_items)))
        par = drng.choice(cfg.n_topics, drift.new_topics, p=topic_weights(cfg))
        ortho = _unit(drng.standard_normal((drift.new_topics, EMB_DIM)))
        ortho = _unit(ortho - (ortho * centres[par]).sum(1, keepdims=True) * centres[par])
        new_centres = (math.cos(drift.new_topic_angle) * centres[par]
                       + math.sin(drift.new_topic_angle) * ortho).astype(np.float32)
        new_topic = (cfg.n_topics + drng.integers(0, drift.new_topics, n_new)).astype(np.int32)
        centres = np.concatenate([centres, new_centres])
        parent = np.concatenate([parent, par])
        new_emb = _item_embeddings(drng, centres, new_topic, cfg)
        new_log_pop = drng.standard_normal(n_new) * cfg.pop_sigma
        topic, emb = np.concatenate([topic, new_topic]), np.concatenate([emb, new_emb])
        log_pop = np.concatenate([log_pop, new_log_pop])
        new_cum = np.cumsum(np.exp(cfg.pop_exponent * new_log_pop))

    weight = np.exp(cfg.pop_exponent * log_pop[: cfg.n_items])
    order = np.argsort(topic[: cfg.n_items], kind="stable")
    cum = np.cumsum(weight[order])
    ends = np.cumsum(np.bincount(topic[: cfg.n_items], minlength=cfg.n_topics))
    hi = cum[ends - 1]
    lo = np.concatenate([[0.0], hi[:-1]])
    return _Items(topic=topic, emb=emb, unit=_unit(emb.astype(np.float32)),
                  pop_z=((log_pop - mu) / sd).astype(np.float32), centres=centres,
                  parent=parent.astype(np.int64), n_base=cfg.n_items, order=order, cum=cum,
                  lo=lo, hi=hi, first=np.concatenate([[0], ends[:-1]]), last=ends - 1,
                  new_cum=new_cum)


def _items_table(items: _Items) -> pa.Table:
    n = len(items.topic)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(items.emb.reshape(-1)), EMB_DIM)
    emb_q = pa.FixedSizeListArray.from_arrays(
        pa.array(quantize(items.emb.astype(np.float32)).reshape(-1)), EMB_DIM)
    return pa.Table.from_arrays(
        [pa.array(np.arange(n, dtype=np.int64)), pa.array(items.topic), emb, emb_q], schema=ITEMS)


def _sample_in_topic(items: _Items, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Base item of ``topic`` drawn by popularity (inverse CDF on uniforms ``u``)."""
    target = items.lo[topic] + u * (items.hi[topic] - items.lo[topic])
    pos = np.searchsorted(items.cum, target, side="right")
    # float round-off can step one past the topic's range: clamp into it
    return items.order[np.clip(pos, items.first[topic], items.last[topic])]


def _sample_popular(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), len(cum) - 1)


# --------------------------------------------------------------------------- users


@dataclass
class UserProfile:
    """A user's latent state (ground truth; the tables never show it).

    ``topics[0]`` is the main interest (never dormant). Days count from EPOCH_MS.
    A dormant interest is sought and liked until ``dormant_off[i]``, asleep until
    ``dormant_on[i]``, then liked again when shown (never sought again); non-dormant
    interests have ``dormant_off = dormant_on = inf``.
    """

    user_id: int
    sessions_per_day: float
    join_day: float
    topics: np.ndarray  # [k] interest topics
    weights: np.ndarray  # [k] Dirichlet weights, descending
    dormant_off: np.ndarray  # [k] day the interest goes to sleep (inf: never)
    dormant_on: np.ndarray  # [k] day it returns (inf: never)
    dislikes: np.ndarray  # disliked topics
    bias: float  # offset of the positive-action logits


def _user_rng(seed: int, user_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, user_id])


def _draw_activity(rng: np.random.Generator, cfg: WorldConfig) -> tuple[float, float]:
    """(sessions per day, join day): the first draws of a user's stream (cheap to redo)."""
    rate = min(cfg.sessions_per_day_median * math.exp(cfg.sessions_per_day_sigma * rng.standard_normal()),
               cfg.sessions_per_day_max)
    late, when = rng.random(2)
    join_day = float(when * (cfg.days - 1)) if late < cfg.late_join_frac else 0.0
    return rate, join_day


def _draw_profile(rng: np.random.Generator, cfg: WorldConfig, user_id: int) -> UserProfile:
    rate, join_day = _draw_activity(rng, cfg)
    k = int(min(1 + rng.poisson(cfg.interests_mean - 1), cfg.max_interests, cfg.n_topics // 2))
    topics = rng.choice(cfg.n_topics, k, replace=False, p=topic_weights(cfg))
    weights = np.sort(rng.dirichlet(np.full(k, cfg.interest_alpha)))[::-1]
    # dormancy: return day around the request window, sleep of a few months before it
    dormant = rng.random(k) < cfg.dormant_frac
    dormant[0] = False  # the main interest stays awake: every user has something to look for
    on = rng.uniform(cfg.days - cfg.request_days - cfg.return_lead_days, cfg.days, k)
    off = on - rng.uniform(cfg.dormant_min_days, cfg.dormant_max_days, k)
    off, on = np.where(dormant, off, np.inf), np.where(dormant, on, np.inf)
    others = np.setdiff1d(np.arange(cfg.n_topics), topics)
    n_dis = int(min(rng.poisson(cfg.dislikes_mean), len(others)))
    dislikes = np.sort(rng.choice(others, n_dis, replace=False))
    bias = float(rng.standard_normal() * cfg.user_bias_std)
    return UserProfile(user_id, rate, join_day, topics.astype(np.int64), weights, off, on,
                       dislikes.astype(np.int64), bias)


def draw_user(config: WorldConfig, seed: int, user_id: int) -> UserProfile:
    """The latent profile of one user (for analyses and tests; no tables needed)."""
    return _draw_profile(_user_rng(seed, user_id), config, user_id)


def heaviest_users(config: WorldConfig, seed: int, k: int) -> list[int]:
    """Ids of the ``k`` users with the longest expected lifelong history (sorted ids),
    found from the activity draws only; use with ``replace(config, user_ids=...)``."""
    expected = np.empty(config.n_users)
    for u in range(config.n_users):
        rate, join = _draw_activity(_user_rng(seed, u), config)
        expected[u] = rate * (config.days - join)
    return sorted(np.argsort(-expected, kind="stable")[:k].tolist())


# --------------------------------------------------------------------------- one user


@dataclass
class _Context:
    cfg: WorldConfig
    drift: DriftConfig
    items: _Items
    seed: int
    window_ms: int  # first ts of the request window
    end_ms: int  # end of the horizon
    drift_ms: int  # first drifted ts (beyond end_ms when drift is off)
    source_cum: np.ndarray  # [surfaces, sources]
    surface_cum: np.ndarray
    coef: np.ndarray  # [5, N_ACT]: bias, w_long, w_short, w_dislike, w_pop


def _categorical(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index i with cum[..., i-1] <= u < cum[..., i] along the last axis of ``cum``."""
    return np.minimum((cum <= u[..., None]).sum(-1), cum.shape[-1] - 1)


def _draw_requests(rng, cfg: WorldConfig, rate: float, start_ms: int, end_ms: int):
    """Request timestamps of a Poisson process of sessions, and session-start flags.

    One cumulative sum over gaps: the gap before a session's first request is an idle
    gap (exponential, mean 1/rate days), the others are within-session gaps. Batches
    are sized from the expected count, so the draws do not depend on anything else.
    """
    ts_parts, first_parts, t = [], [], start_ms
    while True:
        expect = rate * max(end_ms - t, 0) / DAY_MS
        n = int(expect + 4 * math.sqrt(expect) + 8)
        idle = cfg.min_session_gap_ms + rng.exponential(DAY_MS / rate, n)
        n_req = 1 + rng.poisson(cfg.requests_per_session - 1, n)
        gaps = cfg.min_request_gap_ms + rng.exponential(
            cfg.mean_request_gap_ms - cfg.min_request_gap_ms, int(n_req.sum()))
        first = np.zeros(len(gaps), dtype=bool)
        first[np.cumsum(n_req) - n_req] = True
        gaps[first] = idle
        ts = t + np.cumsum(gaps.astype(np.int64))
        keep = ts < end_ms
        ts_parts.append(ts[keep])
        first_parts.append(first[keep])
        if not keep.all() or len(ts) == 0:
            break
        t = int(ts[-1])
    return np.concatenate(ts_parts), np.concatenate(first_parts)


def _mixtures(p: UserProfile, ctx: _Context, drng, ts: np.ndarray):
    """Per-request interest state over the user's topic support.

    Returns (support [m], active [n, m], lifelong [n, m], lt [n, m]): ``active`` is the
    weight of the topics the user currently seeks (dormant ones drop out when they
    fall asleep and never come back to it), ``lifelong`` the topic weights of the
    lifelong retrieval source, ``lt`` the long-term affinity LT of each topic.
    Interest-shift drift swaps the weights from the drift start on.
    """
    cfg, k = ctx.cfg, len(p.topics)
    support, w0, w1 = p.topics, p.weights, p.weights
    off, on = p.dormant_off, p.dormant_on
    if ctx.drift.kind == "interest_shift":
        taken = np.concatenate([p.topics, p.dislikes])
        free = np.setdiff1d(np.arange(cfg.n_topics), taken)
        targets = drng.choice(free, min(k, len(free)), replace=False)
        s, pad = ctx.drift.strength, np.zeros(len(targets))
        support = np.concatenate([p.topics, targets])
        w0 = np.concatenate([p.weights, pad])
        w1 = np.concatenate([(1 - s) * p.weights, s * p.weights[: len(targets)]])
        off = np.concatenate([off, pad + np.inf])
        on = np.concatenate([on, pad + np.inf])
    day = ((ts - EPOCH_MS) / DAY_MS)[:, None]
    full = np.where((ts >= ctx.drift_ms)[:, None], w1, w0)  # [n, m]
    awake, returned = day < off, day >= on
    active = full * awake
    # LT: weight relative to the main interest; nearly nothing while asleep; a returned
    # interest comes back at ``return_affinity`` whatever its old weight
    rel = full / np.maximum(full.max(axis=1, keepdims=True), 1e-12)
    lt = np.where(awake, rel, np.where(returned, cfg.return_affinity, cfg.dormant_affinity * rel))
    # the lifelong source surfaces interests missing from recent activity with
    # probability ``lifelong_dormant_share`` (when the user has any), else any interest
    quiet = full * ~awake
    share = np.where(quiet.sum(1, keepdims=True) > 0, cfg.lifelong_dormant_share, 0.0)
    lifelong = ((1 - share) * full / np.maximum(full.sum(1, keepdims=True), 1e-12)
                + share * quiet / np.maximum(quiet.sum(1, keepdims=True), 1e-12))
    return support, active, lifelong, lt


def _short_term(rng, cfg: WorldConfig, ctx: _Context, support, active, first):
    """Intent topic walk (local index into support) and short-term unit embeddings."""
    n = len(first)
    cum_active = np.cumsum(active, axis=1)
    cum_active /= cum_active[:, -1:]
    redraw = rng.random(n) < np.where(first, 1 - cfg.session_carry, cfg.intent_switch)
    fresh = _categorical(cum_active, rng.random(n))
    redraw[:1] = True
    intent = fresh[np.maximum.accumulate(np.where(redraw, np.arange(n), 0))]
    asleep = active[np.arange(n), intent] <= 0  # kept across the moment it fell asleep
    intent = np.where(asleep, fresh, intent)
    session = np.cumsum(first) - 1
    noise = rng.standard_normal((int(first.sum()), EMB_DIM)) * (cfg.intent_noise / math.sqrt(EMB_DIM))
    centres = ctx.items.centres[support[intent]]  # [n, D]
    st = np.zeros_like(centres)
    for d in range(min(cfg.intent_memory, n)):  # decayed average of the last intents (all sessions)
        st[d:] += cfg.intent_decay ** d * centres[: n - d]
    return intent, _unit(st + noise[session]).astype(np.float32)


def _candidates(rng, drng, ctx: _Context, support, active, lifelong, intent, surface, ts):
    """[n, C] candidate item ids, unique within each request."""
    cfg, items = ctx.cfg, ctx.items
    n, C = len(ts), cfg.chunk_size
    src = _categorical(ctx.source_cum[surface][:, None, :], rng.random((n, C)))
    u_topic, u_item = rng.random((n, C)), rng.random((n, C))
    alt = rng.integers(1, cfg.n_items, (n, C))
    cum_life = np.cumsum(lifelong, axis=1)[:, None, :]
    cum_act = np.cumsum(active, axis=1)[:, None, :]
    recent = _categorical(cum_act / cum_act[..., -1:], u_topic)
    life = _categorical(cum_life / cum_life[..., -1:], u_topic)
    local = np.where(src == _S_SESSION, intent[:, None], np.where(src == _S_RECENT, recent, life))
    item = _sample_in_topic(items, support[local], u_item)
    item = np.where(src == _S_POPULAR, items.order[_sample_popular(items.cum, u_item)], item)
    item = np.where(src == _S_RANDOM, (u_item * cfg.n_items).astype(np.int64), item)
    if ctx.drift.kind == "new_items":
        u_new, u_pick = drng.random((n, C)), drng.random((n, C))
        assert items.new_cum is not None  # the new_items drift builds it with the catalogue
        new = items.n_base + _sample_popular(items.new_cum, u_pick)
        item = np.where((ts >= ctx.drift_ms)[:, None] & (u_new < ctx.drift.strength), new, item)
    return _dedup(item, alt, items)


def _dedup(item: np.ndarray, alt: np.ndarray, items: _Items) -> np.ndarray:
    """Replaces repeated items of a row, deterministically (no extra random draws)."""
    n_all = len(items.topic)
    for step in range(64):
        order = np.argsort(item, axis=1, kind="stable")
        srt = np.take_along_axis(item, order, axis=1)
        dup_sorted = np.zeros_like(srt, dtype=bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        if not dup_sorted.any():
            return item
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        is_new = item >= items.n_base
        lo = np.where(is_new, items.n_base, 0)
        size = np.where(is_new, n_all - items.n_base, items.n_base)
        shifted = lo + (item - lo + alt + step) % size
        item = np.where(dup, shifted, item)
    raise RuntimeError("could not de-duplicate candidates (chunk_size too close to n_items?)")


def _engage(rng, ctx: _Context, p: UserProfile, support, lt_topic, st, item, surface):
    """[n, C] multi-hot action bitmask (0 = not engaged) from the logistic model."""
    cfg, items = ctx.cfg, ctx.items
    n, C = item.shape
    base_topic = items.parent[items.topic[item]]  # new clusters inherit their parent's taste
    local_of = np.full(cfg.n_topics, -1)
    local_of[support] = np.arange(len(support))
    loc = local_of[base_topic]
    rows = np.broadcast_to(np.arange(n)[:, None], (n, C))
    lt = np.where(loc >= 0, lt_topic[rows, np.maximum(loc, 0)], 0.0)
    short = np.einsum("ncd,nd->nc", items.unit[item], st)
    dis = np.isin(base_topic, p.dislikes).astype(np.float64)
    pop = items.pop_z[item]
    b, wl, ws, wd, wp = ctx.coef
    logit = (b + wl * lt[..., None] + ws * short[..., None] + wd * dis[..., None]
             + wp * pop[..., None])  # [n, C, A]
    offset = p.bias + np.asarray(cfg.surface_bias)[surface][:, None]  # [n, 1]
    logit = logit + (offset[..., None] * _POSITIVE)
    logit = logit - cfg.position_bias * (np.arange(C) / C)[None, :, None]
    hit = rng.random((n, C, N_ACT)) < 1.0 / (1.0 + np.exp(-logit))
    # A user who hides an item does not also click or repin it: the labels of a real log
    # never combine them, and validation rejects a row that does.
    hit[..., _POSITIVE_OF_HIDE] &= ~hit[..., _HIDE, None]
    return (hit * _BITS).sum(-1).astype(np.uint8)


def _simulate_user(uid: int, ctx: _Context) -> dict:
    cfg = ctx.cfg
    rng = _user_rng(ctx.seed, uid)
    drng = np.random.default_rng([ctx.seed, 2, uid])
    p = _draw_profile(rng, cfg, uid)
    ts, first = _draw_requests(rng, cfg, p.sessions_per_day, EPOCH_MS + int(p.join_day * DAY_MS),
                               ctx.end_ms)
    n, C = len(ts), cfg.chunk_size
    if n == 0:  # joined too late to have a session
        return _empty_user()
    surface = _categorical(ctx.surface_cum, rng.random(n))
    support, active, lifelong, lt = _mixtures(p, ctx, drng, ts)
    intent, st = _short_term(rng, cfg, ctx, support, active, first)
    item = _candidates(rng, drng, ctx, support, active, lifelong, intent, surface, ts)
    delay = ((np.arange(C) + 1 + rng.random((n, C))) * cfg.action_delay_ms).astype(np.int64)
    action = _engage(rng, ctx, p, support, lt, st, item, surface)

    engaged = action > 0
    r_idx, pos = np.nonzero(engaged)  # row-major: ordered by request ts, then position
    act_ts = ts[r_idx] + delay[r_idx, pos]
    win = ts >= ctx.window_ms
    last_req = ts[win][-1] if win.any() else None
    return {
        "actions": {"item_id": item[r_idx, pos], "ts": act_ts, "action": action[r_idx, pos],
                    "surface": surface[r_idx].astype(np.int8)},
        "window": {"ts": ts[win], "surface": surface[win].astype(np.int8), "item": item[win],
                   "action": action[win]},
        "lifelong_len": int((act_ts < last_req).sum()) if last_req is not None else 0,
    }


def _empty_user() -> dict:
    z = np.zeros(0, dtype=np.int64)
    return {"actions": {"item_id": z, "ts": z, "action": z.astype(np.uint8), "surface": z.astype(np.int8)},
            "window": {"ts": z, "surface": z.astype(np.int8), "item": z.reshape(0, 1),
                       "action": z.astype(np.uint8).reshape(0, 1)},
            "lifelong_len": 0}


# --------------------------------------------------------------------------- writing


class _RowBuffer:
    """Collects column chunks and writes exactly ROWS_PER_GROUP-row groups, so the file
    layout does not depend on how users were blocked."""

    def __init__(self, writer: AtomicParquetWriter) -> None:
        self.writer, self.rows = writer, 0
        self.parts: list[dict] = []

    def add(self, cols: dict) -> None:
        n = len(next(iter(cols.values())))
        if n:
            self.parts.append(cols)
            self.rows += n
        while self.rows >= ROWS_PER_GROUP:
            self._emit(ROWS_PER_GROUP)

    def _emit(self, n: int) -> None:
        cols = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        self.writer.write(pa.table({k: v[:n] for k, v in cols.items()}, schema=self.writer.schema))
        rest = {k: v[n:] for k, v in cols.items()}
        self.rows -= n
        self.parts = [rest] if self.rows else []

    def finish(self) -> None:
        if self.rows:
            self._emit(self.rows)


def label_window_ms(cfg: WorldConfig) -> int:
    """The world's label window: every engagement is logged within this long after its
    request (delay < (position + 2) * action_delay_ms <= (chunk_size + 1) * action_delay_ms),
    and before the user's next request (``WorldConfig`` checks it is < min_request_gap_ms)."""
    return cfg.action_delay_ms * (cfg.chunk_size + 1)


def _block_columns(uids: Sequence[int], outs: list[dict], next_request_id: int, C: int, window_ms: int):
    """Per-table column dicts of a block of users; returns (tables, next_request_id).

    Labels are attached by the production join (:mod:`transact.data.labels`), the one
    implementation validation holds every log against; here it gives each request row
    exactly its own engagement, because every engagement comes within the label window
    and before the user's next request (tests/data/test_simulator.py checks the two agree)."""
    acts = [o["actions"] for o in outs]
    wins = [o["window"] for o in outs]
    n_act = [len(a["ts"]) for a in acts]
    n_req = np.array([len(w["ts"]) for w in wins], dtype=np.int64)
    cat = np.concatenate
    actions: dict[str, np.ndarray] = {"user_id": np.repeat(np.asarray(uids, dtype=np.int64), n_act),
                                      "item_id": cat([a["item_id"] for a in acts]).astype(np.int64),
                                      "ts": cat([a["ts"] for a in acts]).astype(np.int64),
                                      "action": cat([a["action"] for a in acts]).astype(np.uint8),
                                      "surface": cat([a["surface"] for a in acts]).astype(np.int8)}
    req_id = next_request_id + np.arange(int(n_req.sum()), dtype=np.int64)
    user = np.repeat(np.asarray(uids, dtype=np.int64), n_req * C)
    ts = np.repeat(cat([w["ts"] for w in wins]).astype(np.int64), C)
    surface = np.repeat(cat([w["surface"] for w in wins]), C)
    item = cat([w["item"].reshape(-1) for w in wins]).astype(np.int64)
    position = np.tile(np.arange(C, dtype=np.int16), int(n_req.sum()))
    common = {"user_id": user, "item_id": item, "ts": ts, "surface": surface,
              "request_id": np.repeat(req_id, C), "position": position}
    impressions = {k: common[k] for k in IMPRESSIONS.names}
    requests = {k: common[k] for k in REQUESTS.names if k in common}
    # only actions at or after the block's first request can belong to a request row
    recent = actions["ts"] >= (int(ts.min()) if len(ts) else 0)
    requests.update(label_requests(requests, {k: v[recent] for k, v in actions.items()}, window_ms))
    return ({"actions": actions, "impressions": impressions, "requests": requests},
            next_request_id + int(n_req.sum()))


def _context(cfg: WorldConfig, drift: DriftConfig, items: _Items, seed: int) -> _Context:
    end_ms = EPOCH_MS + cfg.days * DAY_MS
    drift_ms = (EPOCH_MS + drift.resolved_start_day(cfg) * DAY_MS
                if drift.kind != "none" else end_ms + DAY_MS)
    return _Context(
        cfg=cfg, drift=drift, items=items, seed=seed,
        window_ms=EPOCH_MS + (cfg.days - cfg.request_days) * DAY_MS, end_ms=end_ms,
        drift_ms=drift_ms,
        source_cum=np.cumsum(np.asarray(cfg.source_probs), axis=1),
        surface_cum=np.cumsum(np.asarray(cfg.surface_probs)),
        coef=np.array([cfg.action_bias, cfg.w_long, cfg.w_short, cfg.w_dislike, cfg.w_pop]),
    )


def _blocks(ids: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), size):
        yield ids[i: i + size]


def simulate(config: WorldConfig, out: Path, seed: int, drift: DriftConfig | None = None,
             progress: bool = True) -> dict:
    """Simulates the world and writes ``out/{items,actions,impressions,requests}.parquet``
    and ``out/world.json``; returns the summary written to ``world.json``.

    The world is written into a staging folder and published as one unit with its
    ``manifest.json`` (:func:`transact.data.world.publishing`); on an error or a kill
    the previous world at ``out`` (if any) stays as it was.
    """
    cfg, drift = config, drift or DriftConfig()
    out = Path(out)
    items = _make_items(cfg, seed, drift)
    ctx = _context(cfg, drift, items, seed)
    uids = list(cfg.user_ids) if cfg.user_ids is not None else list(range(cfg.n_users))
    ll_lens, next_request_id = [], 0
    schemas = {"actions": ACTIONS_TABLE, "impressions": IMPRESSIONS, "requests": REQUESTS}
    # Everything goes into a staging folder, sealed by its manifest and swapped in whole
    # (transact.data.world): a reader sees the old world or the new one, never a mix.
    with publishing(out) as stage, contextlib.ExitStack() as stack:
        item_writer = stack.enter_context(AtomicParquetWriter(table_path(stage, "items"), ITEMS))
        item_writer.write(_items_table(items))  # the writer cuts ROWS_PER_GROUP-row groups
        writers = {name: stack.enter_context(AtomicParquetWriter(table_path(stage, name), schema))
                   for name, schema in schemas.items()}
        buffers = {name: _RowBuffer(w) for name, w in writers.items()}
        bar = stack.enter_context(tqdm(total=len(uids), disable=not progress, unit="user",
                                       desc="simulate"))
        for block in _blocks(uids, cfg.block_users):
            outs = [_simulate_user(u, ctx) for u in block]
            ll_lens += [o["lifelong_len"] for o in outs]
            tables, next_request_id = _block_columns(block, outs, next_request_id, cfg.chunk_size,
                                                     label_window_ms(cfg))
            for name, cols in tables.items():
                buffers[name].add(cols)
            bar.update(len(block))
        for b in buffers.values():
            b.finish()
        stack.close()  # the tables are complete before world.json and the manifest
        rows = {"items": item_writer.rows, **{name: w.rows for name, w in writers.items()}}
        summary = _summary(cfg, drift, seed, uids, len(items.topic), rows, next_request_id, ll_lens)
        write_world_json(stage, summary, indent=2, sort_keys=True)
    return summary


def _summary(cfg, drift, seed, uids, n_items, rows, n_requests, ll_lens) -> dict:
    ll = np.asarray(ll_lens, dtype=np.int64)
    eval_days = max(1, int(round(cfg.eval_frac * cfg.request_days))) if cfg.eval_frac > 0 else 0
    end_ts = EPOCH_MS + cfg.days * DAY_MS
    return {
        "config": asdict(cfg),
        "seed": seed,
        "drift": asdict(drift) | {"start_ts": (EPOCH_MS + drift.resolved_start_day(cfg) * DAY_MS
                                               if drift.kind != "none" else None)},
        "rows": rows,
        "n_users": len(uids),
        "n_items": n_items,
        "n_requests": n_requests,
        "start_ts": EPOCH_MS,
        "min_ts": EPOCH_MS,  # no event is older (validation's lower time bound)
        # every engagement is logged within this long after its request
        "label_window_ms": label_window_ms(cfg),
        "request_start_ts": EPOCH_MS + (cfg.days - cfg.request_days) * DAY_MS,
        "train_end_ts": end_ts - eval_days * DAY_MS,
        "end_ts": end_ts,
        "eval_days": eval_days,
        # explicit actions before each user's last request: the lifelong lengths reached
        "lifelong_len": {
            "max": int(ll.max(initial=0)),
            "p50": float(np.percentile(ll, 50)) if len(ll) else 0.0,
            "p90": float(np.percentile(ll, 90)) if len(ll) else 0.0,
            "users_ge_16384": int((ll >= 16_384).sum()),
        },
    }
