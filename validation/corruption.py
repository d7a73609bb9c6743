"""Corruption injection: one kind of bad data into an otherwise clean batch, the way a
broken upstream would write it (tables are rewritten with plain ``pyarrow.parquet``,
bypassing the schema-checked writer).

Validation's fault-injection tool: used to prove that validation (:mod:`transact.validation`)
rejects each kind with a *named* expectation (:data:`CAUGHT_BY`) and quarantines the batch.

    corrupt(world_dir, "unknown_surface", seed=0)              # in place
    corrupt(world_dir, "nan_embedding", seed=0, out=copy_dir)  # on a copy

NN-feature row files have their own kinds, :func:`corrupt_rows`.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from transact.data import schema as S
from transact.data.io import table_path
from transact.data.world import publishing

DAY_MS = 86_400_000
#: An oversized request has at least this many rows (past validation's default cap of
#: 1,000 candidates when a world does not state its chunk size).
OVERSIZED_MIN = 1_001

#: kind -> (table it touches, what it does).
KINDS: dict[str, tuple[str, str]] = {
    "null_user_id": ("actions", "user_id set to null on ~2% of action rows"),
    "unknown_action_bits": ("actions", "an unknown bit (0x20) set on ~2% of action rows"),
    "unknown_surface": ("requests", "surface set to an index past SURFACES on ~2% of request rows"),
    "nan_embedding": ("items", "NaN written into the fp16 embedding of ~2% of items"),
    "wrong_embedding_width": ("items", "items written with 16-wide emb and emb_q lists"),
    "emb_q_inconsistent": ("items", "emb_q of ~2% of items shifted by 20 steps (no longer quantize(emb))"),
    "emb_q_out_of_range": ("items", "emb_q value -128 (outside ±127) in ~2% of items"),
    "future_timestamps": ("requests", "~2% of requests stamped 30 days after now"),
    "unknown_items": ("impressions", "~2% of impressions point at item ids that do not exist"),
    "non_binary_label": ("requests", "label_repin = 2 on ~2% of request rows"),
    "duplicated_events": ("actions", "5% of action rows logged twice"),
    "oversized_request": ("requests", "one request given 10x the usual number of candidates "
                                      "(at least OVERSIZED_MIN rows)"),
    "mixed_request": ("requests", "rows of one request spread over two users"),
    "duplicate_item_ids": ("items", "~2% of items repeat another item's id"),
    "click_rate_shift": ("requests", "label_click flipped to 1 on 40% of request rows"),
    "action_mix_shift": ("actions", "half of the action rows (those no label counts) turned into hide-only actions"),
    "missing_table": ("impressions", "impressions table deleted"),
    "exact_duplicate_events": ("actions", "3 action rows logged twice, every column equal (below any rate)"),
    "contradictory_actions": ("actions", "hide and click set together on ~2% of action rows"),
    "contradictory_labels": ("requests", "label_hide and label_click both 1 on ~2% of request rows"),
    "labels_without_actions": ("requests", "label_repin set to 1 on ~2% of unlabelled request rows "
                                           "(no repin in actions)"),
    "labels_dropped": ("requests", "label_click cleared on half of the clicked request rows"),
    "clock_shift": ("requests", "every request stamped 2 hours later (request clock ahead of the "
                                "action clock): labels precede their requests"),
    "orphan_impressions": ("impressions", "~2% of impressions point at request ids that do not exist"),
    "requests_without_impressions": ("impressions", "the impressions of ~2% of requests deleted"),
    "zero_embeddings": ("items", "emb and emb_q of 5% of items written as zeros"),
    "saturated_embeddings": ("items", "emb of 10% of items scaled by 8 (not normalised), emb_q "
                                      "quantised from it"),
    "negative_ids": ("actions", "user_id negative on ~2% of action rows"),
    "bad_positions": ("requests", "positions of ~2% of requests start at 1 instead of 0"),
    "string_ids": ("actions", "user_id stored as strings"),
    "tz_timestamps": ("requests", "ts stored as a timestamp with a time zone instead of int64 ms"),
    "seconds_timestamps": ("actions", "ts of ~2% of action rows in seconds instead of milliseconds"),
}

#: kind -> the expectation (name) that must reject it. The distribution kinds need a
#: reference profile (the clean batch's).
CAUGHT_BY: dict[str, str] = {
    "null_user_id": "actions: user_id is not null",
    "unknown_action_bits": "actions: action is a non-empty mask of explicit action bits",
    "unknown_surface": "requests: surface is a known surface",
    "nan_embedding": "items: emb values are finite",
    "wrong_embedding_width": f"items: emb has {S.EMB_DIM} values",
    "emb_q_inconsistent": "items: emb_q matches emb within half a quantisation step",
    "emb_q_out_of_range": "items: emb_q values within [-127, 127]",
    "future_timestamps": "requests: ts in range (not before min_ts, not in the future)",
    "unknown_items": "impressions: item_id refers to a known item",
    "non_binary_label": "requests: label_repin is 0 or 1",
    "duplicated_events": "actions: duplicate-event rate within max_duplicate_rate",
    "oversized_request": "requests: candidates per request within [1, max_candidates]",
    "mixed_request": "requests: rows of a request share one user and one ts",
    "duplicate_item_ids": "items: item_id is unique",
    "click_rate_shift": "requests: label_click rate matches the reference",
    "action_mix_shift": "actions: 'hide' share of actions matches the reference",
    "missing_table": "world: impressions table is present",
    "exact_duplicate_events": "actions: no event is logged twice (exact duplicate rows)",
    "contradictory_actions": "actions: action does not combine hide with click or repin",
    "contradictory_labels": "requests: labels do not combine hide with click or repin",
    "labels_without_actions": "requests: positive labels have their engagement in actions within the label window",
    "labels_dropped": "requests: label rates match the action log (unlabelled engagements within "
                      "max_missed_label_share)",
    "clock_shift": "requests: no labelled engagement logged only before its request (clock shift)",
    "orphan_impressions": "impressions: every impression matches a request row (request_id, item_id)",
    "requests_without_impressions": "requests: every request row has its impression",
    "zero_embeddings": "items: all-zero embedding share within max_zero_embedding_share",
    "saturated_embeddings": "items: saturated emb_q value share within max_saturated_share",
    "negative_ids": "actions: user_id is non-negative",
    "bad_positions": "requests: positions of a request are 0..n-1, each once",
    "string_ids": "actions: user_id has type int64",
    "tz_timestamps": "requests: ts has type int64",
    "seconds_timestamps": "actions: ts in range (not before min_ts, not in the future)",
}
NEEDS_REFERENCE: frozenset[str] = frozenset({"click_rate_shift", "action_mix_shift"})

ROW_KINDS: dict[str, str] = {
    "rows_seg_len_overflow": "seg_len of the lifelong segment set past its size on ~2% of rows",
    "rows_padding_not_empty": "a padding slot given an age and an action on ~2% of rows",
    "rows_negative_age": "a valid slot given a negative age on ~2% of rows",
    "rows_non_binary_label": "label_click = 3 on ~2% of rows",
}
ROWS_CAUGHT_BY: dict[str, str] = {
    "rows_seg_len_overflow": "nn_rows: ll_nn segment length within [0, k_ll]",
    "rows_padding_not_empty": "nn_rows: padding slots have age -1",
    "rows_negative_age": "nn_rows: valid slots have age >= 0",
    "rows_non_binary_label": "nn_rows: label_click is 0 or 1",
}


def _pick(rng: np.random.Generator, n: int, frac: float = 0.02) -> np.ndarray:
    k = max(1, int(round(n * frac)))
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def _write(path: Path, table: pa.Table) -> None:
    """Plain parquet write (no schema conform), atomic like every writer of the project."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _publish(world: Path, name: str, table: pa.Table | None) -> None:
    """Re-publishes ``world`` with table ``name`` replaced (None: deleted), copy-on-write
    and sealed by a *valid* manifest, the way a broken upstream publishes: validation's
    named expectations must catch the fault, not a checksum."""
    with publishing(world, copy_from=world) as stage:
        if table is None:
            table_path(stage, name).unlink()
        else:
            _write(table_path(stage, name), table)


def _set(table: pa.Table, name: str, values, type_=None, nullable: bool | None = None) -> pa.Table:
    i = table.schema.get_field_index(name)
    f = table.schema.field(i)
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type_ or f.type)
    f = pa.field(name, arr.type, nullable=f.nullable if nullable is None else nullable)
    return table.set_column(i, f, arr)


def _fixed_list(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    n, w = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type_), w)


def _list_np(table: pa.Table, name: str, dtype) -> np.ndarray:
    arr = table.column(name).combine_chunks()
    w = arr.type.list_size
    return arr.values.slice(arr.offset * w, len(arr) * w).to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, w)


def corrupt(world_dir: str | os.PathLike, kind: str, seed: int = 0,
            out: str | os.PathLike | None = None, now_ms: int | None = None) -> dict:
    """Injects corruption ``kind`` (see :data:`KINDS`) into the world at ``world_dir``,
    in place, or into a copy at ``out``. Returns ``{"kind", "table", "rows", "path",
    "description", "caught_by"}`` (``rows``: rows touched or added).

    ``now_ms`` (default: the wall clock) is where "the future" starts for
    ``future_timestamps``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown corruption kind {kind!r}; valid: {', '.join(KINDS)}")
    src = Path(world_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"corrupt: no world folder {src}")
    world = src
    if out is not None:
        world = Path(out)
        if world.exists():
            raise FileExistsError(f"corrupt: {world} already exists")
        shutil.copytree(src, world)
    rng = np.random.default_rng([seed, sorted(KINDS).index(kind)])
    name = KINDS[kind][0]
    path = table_path(world, name)
    if kind == "missing_table":
        n = pq.ParquetFile(path).metadata.num_rows
        _publish(world, name, None)
        return _summary(kind, name, n, world)
    t = pq.read_table(path)
    n = t.num_rows
    rows = _pick(rng, n)
    touched = len(rows)

    if kind == "null_user_id":
        v = t.column("user_id").to_numpy().astype(object)
        v[rows] = None
        t = _set(t, "user_id", pa.array(list(v), pa.int64()), nullable=True)
    elif kind == "unknown_action_bits":
        v = t.column("action").to_numpy().copy()
        v[rows] |= 0x20
        t = _set(t, "action", v)
    elif kind == "unknown_surface":
        v = t.column("surface").to_numpy().copy()
        v[rows] = len(S.SURFACES) + 3
        t = _set(t, "surface", v)
    elif kind == "nan_embedding":
        e = _list_np(t, "emb", np.float16)
        e[rows, rng.integers(0, e.shape[1], len(rows))] = np.nan
        t = _set(t, "emb", _fixed_list(e, pa.float16()))
    elif kind == "wrong_embedding_width":
        e = _list_np(t, "emb", np.float16)[:, :16]
        q = _list_np(t, "emb_q", np.int8)[:, :16]
        t = _set(t, "emb", _fixed_list(e, pa.float16()))
        t = _set(t, "emb_q", _fixed_list(q, pa.int8()))
        touched = n
    elif kind == "emb_q_inconsistent":
        q = _list_np(t, "emb_q", np.int16)
        q[rows] = np.clip(q[rows] + np.where(q[rows] > 0, -20, 20), -127, 127)
        t = _set(t, "emb_q", _fixed_list(q.astype(np.int8), pa.int8()))
    elif kind == "emb_q_out_of_range":
        q = _list_np(t, "emb_q", np.int8)
        q[rows, 0] = -128
        t = _set(t, "emb_q", _fixed_list(q, pa.int8()))
    elif kind == "future_timestamps":
        # Whole requests move, so every other property of the table still holds.
        now = int(time.time() * 1000) if now_ms is None else int(now_ms)
        rid = t.column("request_id").to_numpy()
        ids = np.unique(rid)
        bad = rng.choice(ids, size=max(1, len(ids) // 50), replace=False)
        mask = np.isin(rid, bad)
        v = t.column("ts").to_numpy().copy()
        v[mask] = now + 30 * DAY_MS
        t = _set(t, "ts", v)
        touched = int(mask.sum())
    elif kind == "unknown_items":
        v = t.column("item_id").to_numpy().copy()
        items = pq.read_table(table_path(world, "items"), columns=["item_id"]).column("item_id").to_numpy()
        v[rows] = items.max() + 1_000 + np.arange(len(rows))
        t = _set(t, "item_id", v)
    elif kind == "non_binary_label":
        v = t.column("label_repin").to_numpy().copy()
        v[rows] = 2
        t = _set(t, "label_repin", v)
    elif kind == "duplicated_events":
        dup = _pick(rng, n, 0.05)
        t = pa.concat_tables([t, t.take(pa.array(dup))])
        touched = len(dup)
    elif kind == "oversized_request":
        # The first request is given 10x its usual size (new, distinct item ids).
        rid = t.column("request_id").to_numpy()
        sizes = np.unique(rid, return_counts=True)[1]
        size = max(int(sizes.max()) * 10, OVERSIZED_MIN)
        first = t.slice(0, 1)
        extra = first.take(pa.array(np.zeros(size - int((rid == rid[0]).sum()), dtype=np.int64)))
        items = pq.read_table(table_path(world, "items"), columns=["item_id"]).column("item_id").to_numpy()
        m = extra.num_rows
        extra = _set(extra, "item_id", rng.choice(items, size=m, replace=m > len(items)))
        extra = _set(extra, "position", (np.arange(m) + 1000).astype(np.int16))
        t = pa.concat_tables([t, extra.cast(t.schema)])
        touched = m
    elif kind == "mixed_request":
        rid = t.column("request_id").to_numpy()
        ids, counts = np.unique(rid, return_counts=True)
        target = ids[np.argmax(counts >= 2)]
        where = np.flatnonzero(rid == target)
        v = t.column("user_id").to_numpy().copy()
        v[where[len(where) // 2:]] = v.max() + 11
        t = _set(t, "user_id", v)
        touched = len(where) - len(where) // 2
    elif kind == "duplicate_item_ids":
        v = t.column("item_id").to_numpy().copy()
        v[rows] = v[(rows + 1) % n]
        t = _set(t, "item_id", v)
    elif kind == "click_rate_shift":
        v = t.column("label_click").to_numpy().copy()
        flip = _pick(rng, n, 0.4)
        v[flip] = 1
        t = _set(t, "label_click", v)
        touched = len(flip)
    elif kind == "action_mix_shift":
        # Only actions that no label counts change, so the labels still agree with the
        # action log: a shift of the mix that only the reference profile can see.
        v = t.column("action").to_numpy().copy()
        req = pq.read_table(table_path(world, "requests"), columns=["user_id", "item_id"]).to_pandas()
        pairs = pd.MultiIndex.from_frame(req)
        free = np.flatnonzero(~pd.MultiIndex.from_arrays(
            [t.column("user_id").to_numpy(), t.column("item_id").to_numpy()]).isin(pairs))
        flip = np.sort(rng.choice(free, size=min(len(free), n // 2), replace=False))
        v[flip] = S.ACTION_BIT["hide"]
        t = _set(t, "action", v)
        touched = len(flip)
    elif kind in NEW_KINDS:
        t, touched = _corrupt_more(kind, t, rows, rng, world)
    _publish(world, name, t)
    return _summary(kind, name, touched, world)


#: The kinds :func:`_corrupt_more` injects (faults of real logs that pass every
#: single-table check: cross-table links, shares, types).
NEW_KINDS: frozenset[str] = frozenset({
    "exact_duplicate_events", "contradictory_actions", "contradictory_labels",
    "labels_without_actions", "labels_dropped", "clock_shift", "orphan_impressions",
    "requests_without_impressions", "zero_embeddings", "saturated_embeddings", "negative_ids",
    "bad_positions", "string_ids", "tz_timestamps", "seconds_timestamps"})


def _requests_hit(rng: np.random.Generator, rid: np.ndarray, frac: float = 0.02) -> np.ndarray:
    """bool [rows]: the rows of ~``frac`` of the requests (whole requests are hit)."""
    ids = np.unique(rid)
    return np.isin(rid, rng.choice(ids, size=max(1, int(len(ids) * frac)), replace=False))


def _corrupt_more(kind: str, t: pa.Table, rows: np.ndarray, rng: np.random.Generator,
                  world: Path) -> tuple[pa.Table, int]:
    """(corrupted table, rows touched) for the kinds of :data:`NEW_KINDS`."""
    from transact.data.quantization import quantize

    n = t.num_rows
    if kind == "exact_duplicate_events":
        dup = rows[:3]
        return pa.concat_tables([t, t.take(pa.array(dup))]), len(dup)
    if kind == "contradictory_actions":
        v = t.column("action").to_numpy().copy()
        v[rows] |= S.ACTION_BIT["hide"] | S.ACTION_BIT["click"]
        return _set(t, "action", v), len(rows)
    if kind == "contradictory_labels":
        for c in ("label_hide", "label_click"):
            v = t.column(c).to_numpy().copy()
            v[rows] = 1
            t = _set(t, c, v)
        return t, len(rows)
    if kind == "labels_without_actions":
        v = t.column("label_repin").to_numpy().copy()
        free = np.flatnonzero(v == 0)
        hit = np.sort(rng.choice(free, size=max(1, len(free) // 50), replace=False))
        v[hit] = 1
        return _set(t, "label_repin", v), len(hit)
    if kind == "labels_dropped":
        v = t.column("label_click").to_numpy().copy()
        pos = np.flatnonzero(v == 1)
        hit = np.sort(rng.choice(pos, size=max(1, len(pos) // 2), replace=False))
        v[hit] = 0
        return _set(t, "label_click", v), len(hit)
    if kind == "clock_shift":
        return _set(t, "ts", t.column("ts").to_numpy() + 2 * 3_600_000), n
    if kind == "orphan_impressions":
        v = t.column("request_id").to_numpy().copy()
        v[rows] = v.max() + 1_000 + np.arange(len(rows))
        return _set(t, "request_id", v), len(rows)
    if kind == "requests_without_impressions":
        hit = _requests_hit(rng, t.column("request_id").to_numpy())
        return t.filter(pa.array(~hit)), int(hit.sum())
    if kind == "zero_embeddings":
        hit = _pick(rng, n, 0.05)
        e, q = _list_np(t, "emb", np.float16), _list_np(t, "emb_q", np.int8)
        e[hit], q[hit] = 0, 0
        t = _set(t, "emb", _fixed_list(e, pa.float16()))
        return _set(t, "emb_q", _fixed_list(q, pa.int8())), len(hit)
    if kind == "saturated_embeddings":
        hit = _pick(rng, n, 0.10)
        e = _list_np(t, "emb", np.float16)
        e[hit] = (e[hit].astype(np.float32) * 8).astype(np.float16)
        t = _set(t, "emb", _fixed_list(e, pa.float16()))
        return _set(t, "emb_q", _fixed_list(quantize(e), pa.int8())), len(hit)
    if kind == "negative_ids":
        v = t.column("user_id").to_numpy().copy()
        v[rows] = -v[rows] - 1
        return _set(t, "user_id", v), len(rows)
    if kind == "bad_positions":
        hit = _requests_hit(rng, t.column("request_id").to_numpy())
        v = t.column("position").to_numpy().copy()
        v[hit] += 1
        return _set(t, "position", v), int(hit.sum())
    if kind == "string_ids":
        return _set(t, "user_id", pa.array([str(u) for u in t.column("user_id").to_pylist()])), n
    if kind == "tz_timestamps":
        ts = pa.array(t.column("ts").to_numpy(), pa.timestamp("ms", tz="Europe/Berlin"))
        return _set(t, "ts", ts), n
    if kind == "seconds_timestamps":
        v = t.column("ts").to_numpy().copy()
        v[rows] //= 1000
        return _set(t, "ts", v), len(rows)
    raise AssertionError(kind)


def _summary(kind: str, table: str, rows: int, world: Path) -> dict:
    return {"kind": kind, "table": table, "rows": int(rows), "path": str(world),
            "description": KINDS[kind][1], "caught_by": CAUGHT_BY[kind]}


def corrupt_rows(rows_path: str | os.PathLike, kind: str, seed: int = 0,
                 out: str | os.PathLike | None = None) -> dict:
    """Injects ``kind`` (see :data:`ROW_KINDS`) into an NN-feature row file (in place, or
    into a copy at ``out``), keeping its metadata (the feature config)."""
    import json

    from transact.features.config import FeatureConfig

    if kind not in ROW_KINDS:
        raise ValueError(f"unknown row corruption kind {kind!r}; valid: {', '.join(ROW_KINDS)}")
    src = Path(rows_path)
    path = src
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, path)
    t = pq.read_table(path)
    cfg = FeatureConfig.from_dict(json.loads(t.schema.metadata[b"feature_config"]))
    rng = np.random.default_rng([seed, sorted(ROW_KINDS).index(kind)])
    n = t.num_rows
    rows = _pick(rng, n)
    Sq = cfg.seq_len
    if kind == "rows_seg_len_overflow":
        seg = _list_np(t, "seg_len", np.int16)
        seg[rows, 0] = cfg.k_ll + 5
        t = _set(t, "seg_len", _fixed_list(seg, pa.int16()))
    elif kind in ("rows_padding_not_empty", "rows_negative_age"):
        import torch

        from transact.features.nn_features import valid_mask

        seg = _list_np(t, "seg_len", np.int64)
        valid = valid_mask(torch.from_numpy(seg), cfg).numpy()  # [N, S]
        age = _list_np(t, "tok_age_s", np.int32)
        want = ~valid if kind == "rows_padding_not_empty" else valid
        cand = np.flatnonzero(want.any(1))
        if not len(cand):
            which = "padding" if kind == "rows_padding_not_empty" else "valid"
            raise ValueError(f"corrupt_rows: no row has a {which} slot")
        rows = np.sort(rng.choice(cand, size=min(len(cand), max(1, n // 50)), replace=False))
        slots = want[rows].argmax(1)  # first such slot of each row
        age[rows, slots] = 5 if kind == "rows_padding_not_empty" else -7
        t = _set(t, "tok_age_s", _fixed_list(age, pa.int32()))
        if kind == "rows_padding_not_empty":
            arr = t.column("tok_action").combine_chunks()
            act = np.frombuffer(arr.buffers()[1], np.uint8, count=(arr.offset + n) * Sq)[arr.offset * Sq:]
            act = act.reshape(n, Sq).copy()
            act[rows, slots] = S.ACTION_BIT["click"]
            t = _set(t, "tok_action", pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(Sq), n, [None, pa.py_buffer(act.tobytes())]))
    elif kind == "rows_non_binary_label":
        v = t.column("label_click").to_numpy().copy()
        v[rows] = 3
        t = _set(t, "label_click", v)
    t = t.replace_schema_metadata(pq.read_schema(src).metadata)
    _write(path, t)
    return {"kind": kind, "table": "nn_rows", "rows": int(len(rows)), "path": str(path),
            "description": ROW_KINDS[kind],
            "caught_by": ROWS_CAUGHT_BY[kind]}
