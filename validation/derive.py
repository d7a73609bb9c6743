"""Derived frames: each table as the pandas frame GX validates -- its scalar columns plus
per-row scalar columns derived with numpy from what GX cannot hold (list columns,
cross-table links): lengths, non-finite counts, max quantisation error, padding
violations, duplicate and link flags, ..."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from transact.data import schema as S
from transact.data.quantization import QMAX, SCALE, STEP
from transact.validation.links import impression_links, label_links
from transact.validation.params import (
    _ID_COLUMNS,
    ALL_ACTIONS_MASK,
    EVENT_KEYS,
    ROWS_TABLE,
    Params,
)


def _scalar(table: pa.Table, name: str) -> pd.Series | None:
    """A scalar column as pandas (nulls in ints become NaN floats), or None if absent/list."""
    if name not in table.column_names:
        return None
    col = table.column(name)
    if pa.types.is_nested(col.type) or pa.types.is_binary(col.type) or \
            pa.types.is_fixed_size_binary(col.type):
        return pd.Series(np.full(table.num_rows, np.nan))
    if pa.types.is_integer(col.type) and col.null_count == 0:
        # int64: GX's pandas "between" is vectorised only for int64/float64 columns
        return pd.Series(col.cast(pa.int64()).to_numpy())
    return col.to_pandas()


# --- list columns -> per-row scalars --------------------------------------------------------
def _list_lengths(col: pa.ChunkedArray | pa.Array | None, n: int) -> np.ndarray:
    """float64 [n]: length of each list (or binary) cell; NaN on null cells; -1 when the
    column is not a list at all (a broken upstream wrote something else)."""
    if col is None:
        return np.full(n, np.nan)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lens = pc.list_value_length(arr)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        lens = pc.binary_length(arr)
    else:
        return np.full(n, -1.0)
    return lens.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _list_matrix(col: pa.ChunkedArray, rows: np.ndarray, width: int) -> np.ndarray:
    """float64 [len(rows), width]: the values of the list cells ``rows`` (all of length
    ``width``); null elements become NaN."""
    arr = col.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type) and len(rows) == len(arr):
        vals = arr.values.slice(arr.offset * width, len(arr) * width)
    else:
        vals = pc.list_flatten(arr.take(pa.array(rows)))
    out = vals.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return out.reshape(len(rows), width)


def _packed_bytes(arr: pa.Array, width: int) -> np.ndarray:
    """fixed_size_binary(width) [N] -> uint8 [N, width] (null cells read as zeros)."""
    n = len(arr)
    if pa.types.is_fixed_size_binary(arr.type):
        buf = arr.buffers()[1]
        flat = np.frombuffer(buf, dtype=np.uint8, count=(arr.offset + n) * width)[arr.offset * width:]
        return flat.reshape(n, width)
    # variable binary of uniform length
    flat = np.frombuffer(b"".join(v if v is not None else bytes(width)
                                  for v in arr.to_pylist()), dtype=np.uint8)
    return flat.reshape(n, width)


# ----------------------------------------------------------------------------- derived frames
def derive_frame(name: str, table: pa.Table, known_items: np.ndarray | None = None,
                 cfg=None, others: dict[str, pa.Table] | None = None,
                 params: Params | None = None) -> pd.DataFrame:
    """The pandas frame GX validates for table ``name``: its scalar columns plus derived
    scalar columns (list columns are replaced by per-row lengths, counts, extrema).

    ``known_items``: the items table's ids (referential checks; None skips them).
    ``cfg``: the :class:`~transact.features.config.FeatureConfig` of an NN-row table.
    ``others``: the world's other tables, for the cross-table columns (labels against
    actions, impressions against requests; skipped when absent). ``params``: their
    windows (default :class:`Params` values).
    Columns whose type is not the schema's are listed in ``frame.attrs["type_errors"]``.
    """
    if name == ROWS_TABLE:
        from transact.features.nn_features import nn_rows_schema

        wrong = _type_errors(name, table, nn_rows_schema(cfg))
        df = _derive_rows(table, cfg, known_items)
    elif name == "items":
        wrong = _type_errors(name, table, S.ITEMS)
        df = _derive_items(table)
    else:
        wrong = _type_errors(name, table, S.TABLES[name])
        df = _derive_events(name, table, known_items, others or {}, params or Params(now_ms=0), wrong)
    df.attrs[TYPE_ERRORS] = wrong
    return df


#: ``frame.attrs`` key: column -> (expected type, what was found, how to fix it).
TYPE_ERRORS = "type_errors"


def _type_errors(name: str, table: pa.Table, schema: pa.Schema) -> dict[str, tuple[str, str, str]]:
    """The schema's integer columns that hold something else (strings, timestamps,
    floats): each check reading them would be wrong or raise, so they are reported once,
    with the fix, and their checks are skipped."""
    out = {}
    for f in schema:
        if f.name not in table.column_names or not pa.types.is_integer(f.type):
            continue
        got = table.column(f.name).type
        if pa.types.is_integer(got):
            continue
        want = "int64" if f.type == pa.int64() else "an integer type"
        found = f"{name}: column '{f.name}' is {got}, expected {want}"
        if pa.types.is_timestamp(got):
            tz = f" with time zone {got.tz}" if got.tz else ""
            found = f"{name}: column '{f.name}' is a timestamp{tz} ({got}), expected int64 ms since the epoch (UTC)"
            fix = ("store ts as int64 epoch milliseconds UTC: `transact import-logs` converts timestamp "
                   "columns, time zones included")
        elif pa.types.is_string(got) or pa.types.is_large_string(got):
            found = f"{name}: column '{f.name}' holds strings, expected {want}"
            fix = ("ids must be integers: `transact import-logs` parses strings of digits; map other ids "
                   "to integers (a dictionary or a stable 63-bit hash)" if f.name in _ID_COLUMNS
                   else f"write {f.name} as integers")
        elif pa.types.is_floating(got):
            fix = f"write {f.name} as integers (floats lose exactness past 2^53)"
        else:
            fix = f"write {f.name} as {f.type}"
        out[f.name] = (want, found, fix)
    return out


def _widths(lens: np.ndarray) -> list[int]:
    """The distinct list lengths present (one, normally)."""
    w = lens[np.isfinite(lens) & (lens >= 0)]
    if not len(w):
        return []
    if (w == w[0]).all():
        return [int(w[0])]
    return [int(x) for x in np.unique(w)]


def _derive_items(table: pa.Table) -> pd.DataFrame:
    n = table.num_rows
    df = pd.DataFrame({c: _scalar(table, c) for c in ("item_id", "topic") if c in table.column_names})
    emb = table.column("emb") if "emb" in table.column_names else None
    emb_q = table.column("emb_q") if "emb_q" in table.column_names else None
    e_len, q_len = _list_lengths(emb, n), _list_lengths(emb_q, n)
    if emb is not None:  # a list column stands in the frame as its length column
        df["emb_len"] = e_len
    if emb_q is not None:
        df["emb_q_len"] = q_len
    nonfinite = np.full(n, np.nan)
    absmax = np.full(n, np.nan)
    max_err = np.full(n, np.nan)
    sat_err = np.full(n, np.nan)
    all_zero = np.full(n, np.nan)
    saturated = np.full(n, np.nan)
    e_rows = {}
    if emb is not None:
        for w in _widths(e_len):
            rows = np.flatnonzero(e_len == w)
            e = _list_matrix(emb, rows, w)  # [r, w]
            nonfinite[rows] = (~np.isfinite(e)).sum(1)
            e_rows[w] = (rows, e)
    if emb_q is not None:
        for w in _widths(q_len):
            rows = np.flatnonzero(q_len == w)
            q = _list_matrix(emb_q, rows, w)  # [r, w]
            absmax[rows] = np.nanmax(np.abs(q), axis=1, initial=0.0)
            all_zero[rows] = (q == 0).all(1)  # a missing embedding written as zeros
            saturated[rows] = (np.abs(q) >= QMAX).mean(1)  # the float value was past ±SCALE
            if w in e_rows:  # quantisation consistency where both widths agree
                er, e = e_rows[w]
                both = np.intersect1d(rows, er)
                e = e[np.searchsorted(er, both)]
                qq = q[np.searchsorted(rows, both)]
                e32 = e.astype(np.float32).astype(np.float64)  # the fp16 value, exactly
                ok = np.isfinite(e32) & np.isfinite(qq)
                inside = ok & (np.abs(e32) <= SCALE)
                err = np.where(inside, np.abs(qq * STEP - e32), 0.0)
                max_err[both] = err.max(axis=1, initial=0.0)
                outside = ok & (np.abs(e32) > SCALE)
                sat_err[both] = (outside & (qq != np.sign(e32) * QMAX)).sum(1)
    df["emb_nonfinite"] = nonfinite
    df["emb_q_absmax"] = absmax
    df["emb_q_max_err"] = max_err
    df["emb_q_saturation_errors"] = sat_err
    df["emb_q_all_zero"] = all_zero
    df["emb_q_saturated_share"] = saturated
    return df


def _flag(bad: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """float64 0/1 flag (1 = the row breaks the rule), NaN where it cannot be told."""
    out = bad.astype(np.float64)
    return out if known is None else np.where(known, out, np.nan)


def _derive_events(name: str, table: pa.Table, known_items: np.ndarray | None,
                   others: dict[str, pa.Table], p: Params, wrong: dict) -> pd.DataFrame:
    schema = S.TABLES[name]
    df = pd.DataFrame({f.name: _scalar(table, f.name) for f in schema if f.name in table.column_names})
    n = len(df)
    if "item_id" in df and known_items is not None and "item_id" not in wrong:
        df["item_known"] = np.isin(df["item_id"].to_numpy(), known_items)
    keys = [k for k in EVENT_KEYS[name] if k in df]
    if keys and n:
        df["is_duplicate"] = df.duplicated(subset=keys, keep="first").to_numpy()
    elif keys:
        df["is_duplicate"] = np.zeros(0, dtype=bool)
    # the same event logged twice, every column equal: a replayed log segment or a retried
    # write, never a real second event -- rejected at any rate
    every = [f.name for f in schema if f.name in df]
    df["exact_duplicate"] = _flag(df.duplicated(subset=every, keep="first").to_numpy()) if n \
        else np.zeros(0)
    if name == "actions" and "action" in df:
        a = pd.to_numeric(df["action"], errors="coerce").to_numpy(dtype=np.float64)
        finite = np.isfinite(a)
        ai = np.where(finite, a, 0).astype(np.int64)
        for act in S.EXPLICIT_ACTIONS:  # 0/1 per action type: the mix the reference compares
            df[f"has_{act}"] = np.where(finite, (ai & S.ACTION_BIT[act]) > 0, np.nan)
        df["action_contradicts"] = _flag(((ai & S.ACTION_BIT["hide"]) > 0)
                                         & ((ai & S.CONTRADICTS_HIDE_MASK) > 0), finite)
    if name == "requests" and all(c in df for c in ("label_hide", *(f"label_{a}" for a in S.CONTRADICTS_HIDE))):
        hide = pd.to_numeric(df["label_hide"], errors="coerce").to_numpy(dtype=np.float64)
        pos = np.zeros(n, dtype=bool)
        known = np.isfinite(hide)
        for a in S.CONTRADICTS_HIDE:
            v = pd.to_numeric(df[f"label_{a}"], errors="coerce").to_numpy(dtype=np.float64)
            pos |= v == 1
            known &= np.isfinite(v)
        df["labels_contradict"] = _flag((hide == 1) & pos, known)
    if name in ("requests", "impressions") and "request_id" in df:
        _derive_request_groups(df, consistency=name == "requests")
    if name == "requests" and "actions" in others:
        links = label_links(table, others["actions"], p.label_window_ms, p.leak_window_ms)
        if links is not None:
            for k, v in links.items():
                df[k] = _flag(v)
    if name in ("requests", "impressions") and "impressions" in others.keys() | {name} \
            and "requests" in others.keys() | {name}:
        imp = table if name == "impressions" else others["impressions"]
        req = table if name == "requests" else others["requests"]
        links = impression_links(imp, req)
        if links is not None:
            if name == "impressions":
                df["impression_unmatched"] = _flag(~links["impression_matched"])
            else:
                df["request_not_impressed"] = _flag(~links["request_impressed"])
    return df


def _derive_request_groups(df: pd.DataFrame, consistency: bool = True) -> None:
    g = df.groupby("request_id", sort=False, dropna=True)
    size = g["request_id"].transform("size")
    if "position" in df and pd.api.types.is_numeric_dtype(df["position"]):
        # a request's n rows hold positions 0..n-1, each once (what the ranker returned)
        pos = df["position"]
        bad = (pos < 0) | (pos >= size) | df.duplicated(subset=["request_id", "position"], keep=False)
        df["position_bad"] = np.where(df["request_id"].notna() & pos.notna(), bad.astype(np.float64), np.nan)
    if not consistency:
        return
    df["request_size"] = size
    consistent = pd.Series(True, index=df.index)
    for c in ("user_id", "ts"):
        if c in df:
            consistent &= g[c].transform("min") == g[c].transform("max")
    # rows whose request_id is null have no request: leave them to the not-null check
    df["request_consistent"] = consistent.where(df["request_id"].notna(), True)


def _valid_mask_np(seg_len: np.ndarray, sizes: Iterable[int]) -> np.ndarray:
    """numpy twin of :func:`transact.features.nn_features.valid_mask`: bool [N, S]."""
    parts = []
    for s, size in enumerate(sizes):
        slot = np.arange(size)
        parts.append(slot[None, :] >= size - seg_len[:, s : s + 1].astype(np.int64))
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(seg_len), 0), bool)


def _derive_rows(table: pa.Table, cfg, known_items: np.ndarray | None) -> pd.DataFrame:
    from transact.features.config import SEGMENTS

    n = table.num_rows
    Sq, D = cfg.seq_len, S.EMB_DIM
    meta_cols = ("request_id", "user_id", "item_id", "ts", "surface", "position") + S.LABEL_COLUMNS
    df = pd.DataFrame({c: _scalar(table, c) for c in meta_cols if c in table.column_names})
    if "item_id" in df and known_items is not None:
        df["item_known"] = np.isin(df["item_id"].to_numpy(), known_items)
    col = lambda c: table.column(c) if c in table.column_names else None  # noqa: E731
    widths = {"cand_emb_q": D, "tok_emb_q": Sq * D, "tok_action": Sq, "tok_surface": Sq,
              "tok_age_s": Sq, "seg_len": len(SEGMENTS)}
    lens = {c: _list_lengths(col(c), n) for c in widths}
    for c in widths:
        if c in table.column_names:  # a list column stands in the frame as its length column
            df[f"{c}_len"] = lens[c]
    derived = {k: np.full(n, np.nan) for k in (
        "cand_emb_q_absmax", "tok_emb_q_absmax", "pad_emb_nonzero", "pad_action_nonzero",
        "pad_surface_nonzero", "pad_age_not_pad", "valid_age_negative", "valid_action_bad",
        "valid_surface_bad")}
    for segment in SEGMENTS:
        derived[f"seg_len_{segment}"] = np.full(n, np.nan)
    ok = np.ones(n, bool)
    for c, w in widths.items():
        ok &= lens[c] == w
    if ok.all() and n:
        # Whole-table fast path in row chunks (bounded memory): every cell has its width.
        chunk = 4096
        arrays = {c: table.column(c).combine_chunks() for c in widths}
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            sl = {c: a.slice(lo, hi - lo) for c, a in arrays.items()}
            seg = sl["seg_len"].values.slice(sl["seg_len"].offset * len(SEGMENTS),
                                             (hi - lo) * len(SEGMENTS))
            seg = seg.cast(pa.int64()).to_numpy(zero_copy_only=False).reshape(hi - lo, len(SEGMENTS))
            age = sl["tok_age_s"].values.slice(sl["tok_age_s"].offset * Sq, (hi - lo) * Sq)
            age = age.cast(pa.int64()).to_numpy(zero_copy_only=False).reshape(hi - lo, Sq)
            emb = _packed_bytes(sl["tok_emb_q"], Sq * D).view(np.int8).reshape(hi - lo, Sq, D)
            act = _packed_bytes(sl["tok_action"], Sq)
            surf = _packed_bytes(sl["tok_surface"], Sq).view(np.int8)
            cand = _packed_bytes(sl["cand_emb_q"], D).view(np.int8)
            valid = _valid_mask_np(seg, cfg.segment_sizes)  # [r, S]
            pad = ~valid
            r = slice(lo, hi)
            for s, name in enumerate(SEGMENTS):
                derived[f"seg_len_{name}"][r] = seg[:, s]
            derived["cand_emb_q_absmax"][r] = np.abs(cand.astype(np.int16)).max(1)
            derived["tok_emb_q_absmax"][r] = np.abs(emb.astype(np.int16)).max(axis=(1, 2))
            derived["pad_emb_nonzero"][r] = ((emb != 0).any(-1) & pad).sum(1)
            derived["pad_action_nonzero"][r] = ((act != 0) & pad).sum(1)
            derived["pad_surface_nonzero"][r] = ((surf != 0) & pad).sum(1)
            derived["pad_age_not_pad"][r] = ((age != -1) & pad).sum(1)
            derived["valid_age_negative"][r] = ((age < 0) & valid).sum(1)
            bad_act = (act == 0) | ((act.astype(np.int64) & ~ALL_ACTIONS_MASK) != 0)
            derived["valid_action_bad"][r] = (bad_act & valid).sum(1)
            bad_surf = (surf < 0) | (surf >= len(S.SURFACES))
            derived["valid_surface_bad"][r] = (bad_surf & valid).sum(1)
    elif "seg_len" in table.column_names:  # widths are off: keep what can be read
        rows = np.flatnonzero(lens["seg_len"] == len(SEGMENTS))
        if len(rows):
            seg = _list_matrix(table.column("seg_len"), rows, len(SEGMENTS))
            for s, name in enumerate(SEGMENTS):
                derived[f"seg_len_{name}"][rows] = seg[:, s]
    for k, v in derived.items():
        df[k] = v
    return df

