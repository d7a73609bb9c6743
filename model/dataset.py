"""Logged NN-feature rows -> tensor batches, split by time or per user, sharded across DDP ranks.

The row files (``transact log-nn``) are parquet in the :func:`nn_rows_schema` layout,
with the :class:`FeatureConfig` as JSON in the schema metadata key ``feature_config``.
``path`` is one file or a folder of ``*.parquet`` parts.

Two ways to split (a :class:`Split`, the ``split_by`` of :class:`RowDataset`):

- ``Split("time")`` (the default): ``split="train"`` keeps rows with ``ts < train_end_ts``;
  ``split="eval"`` keeps ``ts >= train_end_ts`` (and ``ts < eval_end_ts`` when given).
- ``Split("user", n)``: each user's last ``n`` request times are held out (``"eval"``); ``"train"``
  keeps every row of that user strictly before the user's cut (:func:`per_user_cut`).

``"all"`` keeps every row. ``min_ts`` / ``max_ts`` further bound either part to
``[min_ts, max_ts)`` (the trainer's calibration slice is the end of the training rows).

Two modes, same batches: when the selected rows fit in ``max_memory_mb`` they are
loaded once as tensors; otherwise they are streamed row group by row group through a
shuffle buffer of at least ``buffer_rows`` rows.

Batch order (deterministic for a seed). Epoch e of a shuffled run draws a permutation
from ``numpy.random.default_rng([seed, e])`` (in streaming mode: of the row groups,
then of the rows inside each buffer). The resulting stream is cut into *global*
batches of ``batch_size * world_size`` rows; rank k takes rows
``[k * batch_size, (k + 1) * batch_size)`` of each. A final short global batch of m rows
gives every rank ``m // world_size`` rows (the remainder, < world_size rows, is
dropped). So every rank runs the same number of steps -- which DDP needs -- and the
data a run sees does not depend on how it is split into processes. The price: every
rank reads (and, in memory mode, holds) the whole split and keeps its share; parquet
decoding is far faster than training, so on one machine this costs memory, not time.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from transact.data.parts import parquet_files
from transact.data.schema import EMB_DIM, LABEL_COLUMNS
from transact.features.config import FeatureConfig
from transact.features.nn_features import arrow_to_s_all
from transact.model.transact import Batch

SPLITS = ("all", "train", "eval")
#: the kinds of :class:`Split`
SPLIT_KINDS = ("time", "user")
#: the largest int64: the cut of a user who holds nothing out (every row of theirs is before it)
NO_CUT = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Split:
    """How the rows divide into training and evaluation rows; a pure function of the rows.

    ``kind="time"``: one global cut, ``train_end_ts`` (given, or from the rows' world.json):
    no row of any user after it is trained on -- what a deployed model faces -- but on a log
    whose users live in different eras few users have rows on both sides.

    ``kind="user"``: per user, the last ``eval_requests_per_user`` request times are held out
    and every row of that user strictly before the first of them is training data (leave-one-
    out for 1, the split of sequential-recommendation benchmarks). Every user with more request
    times than that is evaluated; a user with at most that many keeps all rows in training and
    none in evaluation (there is no history before a cut to learn from). Training sees other
    users' rows later than a user's cut: leakage across users in time.

    A request time is a distinct ``ts`` of the user's rows (the rows of one request share it):
    two requests logged in the same millisecond count as one, so the split depends on
    (user_id, ts) alone, never on request ids, file order or partitioning.
    """

    kind: str = "time"
    eval_requests_per_user: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_KINDS)}, got {self.kind!r}")
        n = self.eval_requests_per_user
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"eval_requests_per_user must be an integer >= 1, got {n!r}")
        if self.kind == "time" and n != 1:
            raise ValueError("eval_requests_per_user applies to the per-user split (split 'user') only")

    @classmethod
    def parse(cls, spec: Split | str | dict | None) -> Split:
        """A Split from itself, None (the time split), a dict (:meth:`to_dict`) or a string:
        ``"time"``, ``"user"`` (the last request) or ``"user:N"`` (the last N)."""
        if spec is None:
            return cls()
        if isinstance(spec, Split):
            return spec
        if isinstance(spec, dict):
            unknown = set(spec) - {"kind", "eval_requests_per_user", "description"}
            if unknown:
                raise ValueError(f"split: unknown keys {sorted(unknown)}")
            return cls(spec.get("kind", "time"), spec.get("eval_requests_per_user", 1))
        if not isinstance(spec, str):
            raise ValueError(f"split must be 'time', 'user' or 'user:N', got {spec!r}")
        kind, sep, n = spec.strip().partition(":")
        if not sep:
            return cls(kind)
        if not n.strip().isdigit():
            raise ValueError(f"split: 'user:N' needs a whole number N >= 1, got {spec!r}")
        return cls(kind, int(n))

    def __str__(self) -> str:
        """The spec :meth:`parse` reads back: ``time``, ``user:N``."""
        return "time" if self.kind == "time" else f"user:{self.eval_requests_per_user}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "eval_requests_per_user": int(self.eval_requests_per_user)}

    def describe(self, train_end_ts: int | None = None) -> str:
        """The line every table prints: ``split: time (train_end_ts=...)`` or ``split: per user, last N requests``."""
        if self.kind == "time":
            return f"split: time (train_end_ts={train_end_ts})"
        n = self.eval_requests_per_user
        return f"split: per user, last {n} request{'s' if n > 1 else ''}"


def per_user_cut(user_id: np.ndarray, ts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(users [U] sorted, cut [U]): a user's cut is the ts of their n-th most recent distinct
    request time; :data:`NO_CUT` for a user with at most n of them (nothing held out).

    A row is held out when ``ts >= cut[user]``, trained on when ``ts < cut[user]``. Depends on
    the set of (user_id, ts) pairs only: any order or partition of the rows gives the same cuts.
    """
    user_id, ts = np.asarray(user_id, np.int64), np.asarray(ts, np.int64)
    order = np.lexsort((ts, user_id))  # by user, then ts
    u, t = user_id[order], ts[order]  # [N]
    first = np.ones(len(u), bool)
    first[1:] = (u[1:] != u[:-1]) | (t[1:] != t[:-1])
    pu, pt = u[first], t[first]  # distinct (user, ts) pairs, sorted [P]
    users, start, count = np.unique(pu, return_index=True, return_counts=True)  # [U]
    cut = np.full(len(users), NO_CUT, np.int64)  # [U]
    has = count > n  # a prefix to train on before the held-out requests
    cut[has] = pt[start[has] + count[has] - n]
    return users, cut


def row_files(path: str | Path) -> list[Path]:
    """The parquet files of a row path (a file, a folder of parts, a published copy; the rule
    is :func:`transact.data.parts.parquet_files`), sorted by path."""
    return parquet_files(path)


def read_feature_config(path: str | Path) -> FeatureConfig:
    """The FeatureConfig stored in the row files' schema metadata (all parts must agree)."""
    cfgs: dict[FeatureConfig, Path] = {}  # config -> first file holding it
    for f in row_files(path):
        meta = pq.read_schema(f).metadata or {}
        raw = meta.get(b"feature_config")
        if raw is None:
            raise ValueError(f"{f}: no 'feature_config' in the parquet schema metadata "
                             "(not a `transact log-nn` row file?)")
        cfg = FeatureConfig.from_dict(json.loads(raw), where=f"{f}: feature_config")
        cfgs.setdefault(cfg, f)
    if len(cfgs) != 1:
        (a, fa), (b, fb) = list(cfgs.items())[:2]
        a.check_same(b, f"rows {fa}", f"rows {fb}")  # raises, naming the field
    return next(iter(cfgs))


def rows_train_end_ts(path: str | Path) -> tuple[int, str] | None:
    """The rows' train/eval split and where it came from: the ``train_end_ts`` that
    `transact log-nn` stores in the row files' metadata, else a ``world.json`` beside the
    rows (the rows' folder, or the one above it: a folder of parts sits in its run or
    world folder); None when neither names one. The one place that looks (training,
    evaluation and the drift monitor all ask here)."""
    from transact.data.world import TRAIN_END_KEYS, read_world_json
    from transact.features.nn_logging import TRAIN_END_META

    path = Path(path)
    for f in row_files(path):
        raw = (pq.read_schema(f).metadata or {}).get(TRAIN_END_META)
        if raw is not None:
            return int(raw), f"{f}: train_end_ts"
    for folder in ([path] if path.is_dir() else []) + [path.parent, path.parent.parent]:
        meta = read_world_json(folder)
        for key in TRAIN_END_KEYS:
            if key in meta:
                return int(meta[key]), f"{folder / 'world.json'}:{key}"
    return None


def split_point(path: str | Path, train_end_ts: int | None, split: Split) -> tuple[int | None, str]:
    """The global split point a run uses and where it came from: the one given, else the rows'
    own (:func:`default_train_end_ts`) under the time split; none under the per-user split,
    which refuses one (each user's cut is their own)."""
    if split.kind == "user":
        if train_end_ts is not None:
            raise ValueError("train_end_ts: the per-user split holds out each user's last requests and takes no "
                             "global split point")
        return None, "none (per-user split)"
    if train_end_ts is None:
        return default_train_end_ts(path)
    return train_end_ts, "given"


def default_train_end_ts(path: str | Path) -> tuple[int, str]:
    """train_end_ts of the rows (:func:`rows_train_end_ts`), else the 80% quantile of row ts.

    Returns (ts, where it came from).
    """
    found = rows_train_end_ts(path)
    if found is not None:
        return found
    ts = np.concatenate([pq.read_table(f, columns=["ts"]).column("ts").to_numpy() for f in row_files(path)])
    if len(ts) == 0:
        return 0, "empty rows"
    return int(np.quantile(ts, 0.8)), "80% quantile of row ts (no train_end_ts in the rows or world.json)"


def table_to_batch(table: pa.Table, cfg: FeatureConfig) -> Batch:
    """Arrow rows (:func:`nn_rows_schema`) -> :class:`Batch` (CPU tensors)."""
    s_all, cand = arrow_to_s_all(table, cfg)

    def i64(name):
        return torch.from_numpy(table.column(name).to_numpy().astype(np.int64))

    labels = np.stack([table.column(c).to_numpy().astype(np.float32) for c in LABEL_COLUMNS], axis=1) \
        if table.num_rows else np.zeros((0, len(LABEL_COLUMNS)), np.float32)
    return Batch(emb_q=s_all.emb_q, action=s_all.action, tok_surface=s_all.surface, age_s=s_all.age_s,
                 seg_len=s_all.seg_len, cand_emb_q=cand.reshape(-1, EMB_DIM), surface=i64("surface"),
                 labels=torch.from_numpy(labels), user_id=i64("user_id"), request_id=i64("request_id"),
                 item_id=i64("item_id"), ts=i64("ts"))


def batches_per_epoch(n_rows: int, batch_size: int, world_size: int = 1) -> int:
    return sum(1 for _ in global_batches(n_rows, batch_size, world_size))


def global_batches(n_rows: int, batch_size: int, world_size: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, rows per rank) of each global batch of a stream of n_rows rows.

    Rank k takes stream rows ``[start + k * per, start + (k + 1) * per)``.
    """
    g = batch_size * world_size
    for s in range(0, n_rows, g):
        e = min(s + g, n_rows)
        per = batch_size if e - s == g else (e - s) // world_size
        if per == 0:
            return
        yield s, e, per


class RowDataset:
    """The rows of one part ("train", "eval" or "all") of a :class:`Split`, as tensor batches.

    Args:
        path: row file or folder of parts.
        split: "train", "eval" or "all".
        train_end_ts: split point (ms) of the time split; required there unless split == "all".
            The per-user split takes none.
        eval_end_ts: optional end of the time split's eval window (exclusive).
        max_memory_mb: load in memory when the selected rows take at most this much.
        buffer_rows: streaming shuffle-buffer size (rows, rounded up to whole row groups).
        split_by: the :class:`Split` (or its spec, "time" / "user:N"); default the time split.
        min_ts, max_ts: keep only rows with ``min_ts <= ts < max_ts`` of the part as well.
    """

    def __init__(self, path: str | Path, split: str = "all", train_end_ts: int | None = None,
                 eval_end_ts: int | None = None, max_memory_mb: float = 1024,
                 buffer_rows: int = 65_536, *, split_by: Split | str | dict | None = None,
                 min_ts: int | None = None, max_ts: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split_by = Split.parse(split_by)
        if self.split_by.kind == "time" and split != "all" and train_end_ts is None:
            raise ValueError("train_end_ts is needed to split rows by time")
        if self.split_by.kind == "user" and (train_end_ts is not None or eval_end_ts is not None):
            raise ValueError("the per-user split holds out each user's last requests: it takes no "
                             "train_end_ts / eval_end_ts (use min_ts / max_ts to bound it in time)")
        self.path, self.split = Path(path), split
        self.train_end_ts, self.eval_end_ts = train_end_ts, eval_end_ts
        self.min_ts, self.max_ts = min_ts, max_ts
        self.files = row_files(path)
        self.feature_config = read_feature_config(path)
        self.buffer_rows = buffer_rows
        self._pf: dict[int, pq.ParquetFile] = {}
        # the columns _select reads: the per-user split needs the user of each row too
        self._sel_cols = ["ts", "user_id"] if self.split_by.kind == "user" else ["ts"]
        self._cut: tuple[np.ndarray, np.ndarray] | None = None  # per_user_cut over every row
        if self.split_by.kind == "user" and split != "all":
            uid, ts = [], []
            for f in self.files:
                t = pq.read_table(f, columns=["user_id", "ts"])
                uid.append(t.column("user_id").to_numpy())
                ts.append(t.column("ts").to_numpy())
            self._cut = per_user_cut(np.concatenate(uid), np.concatenate(ts), self.split_by.eval_requests_per_user)
        # (file index, row group, selected rows) for row groups with any selected row.
        self.groups: list[tuple[int, int, int]] = []
        for fi in range(len(self.files)):
            pf = self._file(fi)
            for rg in range(pf.num_row_groups):
                n = int(self._select(pf.read_row_group(rg, columns=self._sel_cols)).sum())
                if n:
                    self.groups.append((fi, rg, n))
        self.num_rows = sum(n for _, _, n in self.groups)
        S = self.feature_config.seq_len
        self.row_bytes = S * (EMB_DIM + 1 + 1 + 4) + EMB_DIM + 8 * 6 + 4 * len(LABEL_COLUMNS)
        self.in_memory = self.num_rows * self.row_bytes <= max_memory_mb * 2**20
        self._cache: Batch | None = None

    def __len__(self) -> int:
        return self.num_rows

    def describe(self) -> str:
        """The split line of a table (:meth:`Split.describe`)."""
        return self.split_by.describe(self.train_end_ts)

    def _file(self, fi: int) -> pq.ParquetFile:
        if fi not in self._pf:
            self._pf[fi] = pq.ParquetFile(self.files[fi])
        return self._pf[fi]

    def _select(self, table: pa.Table) -> np.ndarray:
        ts = table.column("ts").to_numpy()
        keep = np.ones(len(ts), dtype=bool)
        if self._cut is not None and self.split != "all":
            users, cut = self._cut
            # every user of the files is in users (the cuts were taken over all rows)
            row_cut = cut[np.searchsorted(users, table.column("user_id").to_numpy())]  # [n]
            keep &= (ts < row_cut) if self.split == "train" else (ts >= row_cut)
        elif self.split == "train":
            keep &= ts < self.train_end_ts
        elif self.split == "eval":
            keep &= ts >= self.train_end_ts
            if self.eval_end_ts is not None:
                keep &= ts < self.eval_end_ts
        if self.min_ts is not None:
            keep &= ts >= self.min_ts
        if self.max_ts is not None:
            keep &= ts < self.max_ts
        return keep

    def ts(self) -> np.ndarray:
        """The selected rows' ts [N] (file order), reading no other column than the split's."""
        parts = [np.zeros(0, np.int64)]
        for fi, rg, _ in self.groups:
            t = self._file(fi).read_row_group(rg, columns=self._sel_cols)
            parts.append(t.column("ts").to_numpy()[self._select(t)])
        return np.concatenate(parts)

    def _read_group(self, fi: int, rg: int) -> pa.Table:
        t = self._file(fi).read_row_group(rg)
        keep = self._select(t)
        return t if keep.all() else t.filter(pa.array(keep))

    def load(self) -> Batch:
        """All selected rows as one CPU Batch (cached), in file order."""
        if self._cache is None:
            parts = [table_to_batch(self._read_group(fi, rg), self.feature_config)
                     for fi, rg, _ in self.groups]
            self._cache = Batch.cat(parts) if parts else table_to_batch(
                pq.read_table(self.files[0]).slice(0, 0), self.feature_config)
        return self._cache

    def table(self) -> pa.Table:
        """Selected rows as one arrow table (file order): ids, ts, labels (no tokens)."""
        cols = ["request_id", "user_id", "item_id", "ts", "surface", "position", *LABEL_COLUMNS]
        parts = []
        for fi, rg, _ in self.groups:
            t = self._file(fi).read_row_group(rg, columns=cols)
            keep = self._select(t)
            parts.append(t if keep.all() else t.filter(pa.array(keep)))
        return pa.concat_tables(parts) if parts else pq.read_table(self.files[0], columns=cols).slice(0, 0)

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        return batches_per_epoch(self.num_rows, batch_size, world_size)

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                     rank: int = 0, world_size: int = 1, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches of one epoch (see the module docstring), from ``start_batch``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        if self.in_memory:
            data = self.load()
            order = rng.permutation(self.num_rows) if rng is not None else np.arange(self.num_rows)
            for b, (lo, _, per) in enumerate(global_batches(self.num_rows, batch_size, world_size)):
                if b >= start_batch:
                    yield data.index(torch.from_numpy(order[lo + rank * per : lo + (rank + 1) * per]))
            return
        yield from self._stream(batch_size, rng, rank, world_size, start_batch)

    def _stream(self, batch_size, rng, rank, world_size, start_batch) -> Iterator[Batch]:
        groups = list(self.groups)
        if rng is not None:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        pending: pa.Table | None = None  # stream rows read but not yet consumed
        pending_start, gi = 0, 0  # stream index of pending's first row; next row group
        for b, (s, e, per) in enumerate(global_batches(self.num_rows, batch_size, world_size)):
            while pending is None or pending_start + pending.num_rows < e:
                buf, n = [], 0  # a shuffle buffer of whole row groups
                while gi < len(groups) and n < self.buffer_rows:
                    fi, rg, cnt = groups[gi]
                    buf.append(self._read_group(fi, rg))
                    n, gi = n + cnt, gi + 1
                t = pa.concat_tables(buf)
                if rng is not None:
                    t = t.take(pa.array(rng.permutation(t.num_rows)))
                pending = t if pending is None else pa.concat_tables([pending, t])
            if b >= start_batch:
                lo = s + rank * per - pending_start
                yield table_to_batch(pending.take(pa.array(np.arange(lo, lo + per))), self.feature_config)
            pending = pending.slice(e - pending_start)
            pending_start = e


# --- synthetic rows (tests and benchmarks) ---------------------------------------------------

def synthetic_rows(n_requests: int, cfg: FeatureConfig | None = None, *, per_request: int = 8,
                   n_users: int = 16, seed: int = 0, t0: int = 1_700_000_000_000,
                   span_ms: int = 10 * 86_400_000, fill: float = 1.0) -> pa.Table:
    """Random rows in the :func:`nn_rows_schema` layout, with learnable labels.

    Each request belongs to a user with a fixed taste vector; the user's tokens and the
    candidates are drawn around topic centres, and the label probabilities rise with
    the candidate's affinity to the user's taste (hides fall with it), so a model that
    reads the sequence can beat one that does not. ``fill`` scales how full the
    segments are (1.0: uniformly 0..size valid tokens).
    """
    from transact.data.quantization import quantize
    from transact.data.schema import ACTION_BIT, REQUESTS
    from transact.features.nn_features import SAll, s_all_to_arrow

    cfg = cfg or FeatureConfig()
    rng = np.random.default_rng(seed)
    N, S, D = n_requests * per_request, cfg.seq_len, EMB_DIM
    topics = rng.normal(size=(8, D)) * 0.12
    user_topic = rng.integers(0, 8, n_users)
    req_user = rng.integers(0, n_users, n_requests)
    req_ts = np.sort(t0 + rng.integers(0, span_ms, n_requests))
    user = np.repeat(req_user, per_request)  # [N]
    ut = user_topic[user]  # [N]
    # candidates: half on-taste, half random topics
    cand_topic = np.where(rng.random(N) < 0.5, ut, rng.integers(0, 8, N))
    cand = topics[cand_topic] + rng.normal(size=(N, D)) * 0.05  # [N, D]
    # tokens: mostly the user's topic
    tok_topic = np.where(rng.random((N, S)) < 0.7, ut[:, None], rng.integers(0, 8, (N, S)))
    tok = topics[tok_topic] + rng.normal(size=(N, S, D)) * 0.05  # [N, S, D]
    seg_len = np.stack([np.minimum(rng.integers(0, size + 1, N), int(round(size * fill)))
                        for size in cfg.segment_sizes], axis=1).astype(np.int16)  # [N, 4]
    valid = valid_mask_np(seg_len, cfg)  # [N, S]
    action = rng.integers(1, 16, (N, S)).astype(np.uint8)
    imp = slice(cfg.segment_starts[3], cfg.seq_len)
    action[:, imp] = ACTION_BIT["impression"]
    action[~valid] = 0
    age = np.where(valid, rng.integers(0, 3 * 86_400, (N, S)), -1).astype(np.int32)
    surface = rng.integers(0, 4, (N, S)).astype(np.int8) * valid
    emb_q = np.where(valid[..., None], quantize(tok.astype(np.float32)), 0).astype(np.int8)
    s_all = SAll(torch.from_numpy(emb_q), torch.from_numpy(action), torch.from_numpy(surface),
                 torch.from_numpy(age), torch.from_numpy(seg_len))
    aff = (cand_topic == ut).astype(np.float64)
    logit = -2.0 + 2.5 * aff
    labels = {
        "label_click": rng.random(N) < 1 / (1 + np.exp(-logit)),
        "label_repin": rng.random(N) < 1 / (1 + np.exp(-(logit - 0.5))),
        "label_hide": rng.random(N) < 1 / (1 + np.exp(-(-1.5 - 2.5 * aff))),
        "label_closeup": rng.random(N) < 1 / (1 + np.exp(-logit)),
    }
    meta = pa.table({
        "request_id": pa.array(np.repeat(np.arange(n_requests) + 1000, per_request), pa.int64()),
        "user_id": pa.array(user.astype(np.int64) * 7 + 1, pa.int64()),
        "item_id": pa.array(rng.integers(0, 10**6, N), pa.int64()),
        "ts": pa.array(np.repeat(req_ts, per_request), pa.int64()),
        "surface": pa.array(rng.integers(0, 4, N).astype(np.int8), pa.int8()),
        "position": pa.array(np.tile(np.arange(per_request), n_requests).astype(np.int16), pa.int16()),
        **{c: pa.array(labels[c].astype(np.uint8), pa.uint8()) for c in LABEL_COLUMNS},
    }, schema=pa.schema([REQUESTS.field(n) for n in ("request_id", "user_id", "item_id", "ts", "surface",
                                                      "position", *LABEL_COLUMNS)]))
    cand_q = torch.from_numpy(quantize(cand.astype(np.float32)))
    return s_all_to_arrow(s_all, cand_q, meta, cfg)


def valid_mask_np(seg_len: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    from transact.features.nn_features import valid_mask

    return valid_mask(torch.from_numpy(np.asarray(seg_len)), cfg).numpy()


def write_synthetic_rows(path: str | Path, n_requests: int, cfg: FeatureConfig | None = None,
                         row_group_size: int | None = None, **kw) -> Path:
    """Writes :func:`synthetic_rows` to a parquet file (feature config in the metadata)."""
    table = synthetic_rows(n_requests, cfg, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
