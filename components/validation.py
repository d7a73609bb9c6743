"""Data validation with Great Expectations (DESIGN.md §9): suites, checkpoint, decision,
quarantine.

Every batch -- a world folder (items, actions, impressions, requests) or a file of
logged NN-feature rows -- is checked table by table with one GX checkpoint per table
(ephemeral context, pandas data source, whole-dataframe batch definition,
``ValidationDefinition`` + ``Checkpoint``). Then one decision for the whole batch:

* pass: the batch goes on; its profile (action-type mix, label rates, row counts) is
  written as the new *reference* JSON that the next batch is compared with;
* fail: the batch is **moved** whole to ``quarantine_dir/<batch>-<UTC time>/`` with the
  GX result JSON and a Markdown report naming each failed expectation with example
  rows; the caller stops. Rows are never dropped one by one, so per table
  ``rows in = accepted + quarantined`` (written in the report, checked after the move).

GX has no array-column support, so list columns (embeddings, token blocks) are
validated through *derived scalar columns* computed here with numpy: lengths,
non-finite counts, max quantisation error, padding violations per row, ... Each
expectation carries a stable human-readable name in ``meta["name"]`` (also its
``description``), e.g. ``"actions: action is a non-empty mask of explicit action bits"``.

Public API: :func:`validate_world`, :func:`validate_rows`, :class:`ValidationResult`,
:func:`build_checks` / :func:`build_suite` (the suites), :func:`derive_frame` (the
derived columns), :func:`world_profile`, :class:`Tolerance`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transact.data import schema as S
from transact.data.io import table_path
from transact.components.validation_links import impression_links, label_links
from transact.model.quantization import MAX_ERROR, QMAX, SCALE, STEP

#: The world tables, in validation order (items first: the others reference it).
WORLD_TABLES: tuple[str, ...] = ("items", "actions", "impressions", "requests")
ROWS_TABLE = "nn_rows"
#: Default lower bound of every ``ts``: 2010-01-01 UTC (ms), used when neither the
#: caller (``--min-ts``) nor the world's ``world.json`` (``min_ts``) gives one.
MIN_TS_MS: int = S.DEFAULT_MIN_TS_MS
#: Clock skew allowed beyond ``now`` before a timestamp counts as "in the future".
FUTURE_SKEW_MS: int = 5 * 60_000
#: Candidates per request allowed when world.json does not give ``chunk_size``.
DEFAULT_MAX_CANDIDATES: int = 1_000
DEFAULT_MAX_DUPLICATE_RATE: float = 0.01
#: Shares of items allowed with an all-zero int8 embedding, and of int8 values allowed at
#: ±QMAX (saturated: the float embedding was beyond ±SCALE, e.g. not normalised).
DEFAULT_MAX_ZERO_EMBEDDING_SHARE: float = 0.01
DEFAULT_MAX_SATURATED_SHARE: float = 0.01
#: Share of request rows allowed with an engagement in the label window that no label
#: counts (the same item shown again within the window can attribute one engagement to
#: two requests).
DEFAULT_MAX_MISSED_LABEL_SHARE: float = 0.01
#: How far before a request an engagement that should have been its label is looked for
#: (a clock or time-zone shift moves it there): one day covers every time-zone offset.
LEAK_WINDOW_MS: int = 86_400_000
#: Slack on the quantisation bound for float rounding (fp32 division and rint).
QUANT_TOL: float = 1e-6
#: Every action bit, explicit or not (valid NN-row tokens may carry ``impression``).
ALL_ACTIONS_MASK: int = sum(S.ACTION_BIT.values())

#: Event keys: two rows with the same key are the same event logged twice.
EVENT_KEYS: dict[str, tuple[str, ...]] = {
    "actions": ("user_id", "item_id", "ts"),
    "impressions": ("user_id", "item_id", "ts", "request_id"),
    "requests": ("request_id", "user_id", "item_id", "ts"),
}

# Files written next to (or into the quarantine folder of) a batch.
REPORT_MD = "validation_report.md"
RESULTS_JSON = "validation_results.json"
PROFILE_JSON = "validation_profile.json"
PROFILE_VERSION = 1


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Tolerance:
    """How far a rate may move from the reference before the batch fails.

    The band around a reference rate ``p`` is ``p ± max(rel * p, abs, z * se)`` where
    ``se = sqrt(p (1 - p) (1/n + 1/n_ref))`` is the sampling noise of the two batches.
    """

    rel: float = 0.3
    abs: float = 0.005
    z: float = 5.0

    def band(self, p_ref: float, n: int, n_ref: int) -> tuple[float, float]:
        se = math.sqrt(max(p_ref * (1 - p_ref), 0.0) * (1 / max(n, 1) + 1 / max(n_ref, 1)))
        d = max(self.rel * p_ref, self.abs, self.z * se)
        return max(0.0, p_ref - d), min(1.0, p_ref + d)


@dataclass(frozen=True)
class Params:
    """What the suites are built from (besides the table itself)."""

    now_ms: int
    min_ts_ms: int = MIN_TS_MS
    future_skew_ms: int = FUTURE_SKEW_MS
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    max_duplicate_rate: float = DEFAULT_MAX_DUPLICATE_RATE
    tolerance: Tolerance = Tolerance()
    min_ts_source: str = "the default (2010-01-01)"
    label_window_ms: int = S.DEFAULT_LABEL_WINDOW_MS
    label_window_source: str = "the default (one hour)"
    leak_window_ms: int = LEAK_WINDOW_MS
    max_missed_label_share: float = DEFAULT_MAX_MISSED_LABEL_SHARE
    max_zero_embedding_share: float = DEFAULT_MAX_ZERO_EMBEDDING_SHARE
    max_saturated_share: float = DEFAULT_MAX_SATURATED_SHARE


# ----------------------------------------------------------------------------- results
@dataclass
class Failure:
    """One failed check: a GX expectation (``gx``) or a structural problem (missing table)."""

    name: str
    table: str
    expectation: str
    kwargs: dict
    unexpected_count: int | None = None
    element_count: int | None = None
    observed: Any = None
    sample_values: list = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    exception: str | None = None
    gx: bool = True
    hint: str | None = None  # what the bound was and how to change it, or how to fix the data


@dataclass
class ValidationResult:
    """What :func:`validate_world` / :func:`validate_rows` decided, and where things went.

    ``rows`` maps each table to ``{"in", "accepted", "quarantined"}``; ``location`` is
    where the batch is now (its own folder on pass, the quarantine folder on fail).
    """

    passed: bool
    batch: str
    kind: str  # "world" | "rows"
    source: str
    location: str
    quarantine: str | None
    rows: dict[str, dict[str, int | None]]
    checks: dict[str, dict[str, int]]  # table -> {"evaluated", "failed", "skipped"}
    failures: list[Failure]
    checked_at: str
    now_ms: int
    seconds: float
    reference: str | None  # where the reference came from ("none" notes why)
    reference_written: str | None
    reports: dict[str, str]
    profile: dict | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: read, derive, gx, decide
    summary: str = ""

    @property
    def failed_names(self) -> list[str]:
        return [f.name for f in self.failures]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed_names"] = self.failed_names
        return _json_safe(d)


@dataclass
class Check:
    """A named expectation of one table; ``show`` lists the columns of its example rows."""

    name: str
    table: str
    expectation: Any  # a great_expectations.expectations.Expectation
    show: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()  # frame columns it reads (skipped when one is absent)
    hint: str = ""  # shown with a failure: the bound in words, the option that sets it


# ----------------------------------------------------------------------------- helpers
def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (str, int)):
        return x
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    return str(x)


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2, sort_keys=False))
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def now_ms(now: Any = None) -> int:
    """``now`` as epoch milliseconds: None (wall clock), datetime (naive = UTC), int/float
    epoch **ms**, or an ISO-8601 string / a string of digits (ms)."""
    if now is None:
        return int(time.time() * 1000)
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        return int(now.timestamp() * 1000)
    if isinstance(now, (int, np.integer)):
        return int(now)
    if isinstance(now, float):
        return int(now)
    if isinstance(now, str):
        s = now.strip()
        if s.isdigit():
            return int(s)
        try:
            return now_ms(datetime.fromisoformat(s.replace("Z", "+00:00")))
        except ValueError:
            raise ValueError(f"now: cannot read {now!r} (ISO-8601 time or epoch milliseconds)") from None
    raise ValueError(f"now: unsupported value {now!r}")


def _utc_stamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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
    ``cfg``: the :class:`~transact.model.config.FeatureConfig` of an NN-row table.
    ``others``: the world's other tables, for the cross-table columns (labels against
    actions, impressions against requests; skipped when absent). ``params``: their
    windows (default :class:`Params` values).
    Columns whose type is not the schema's are listed in ``frame.attrs["type_errors"]``.
    """
    if name == ROWS_TABLE:
        from transact.model.nn_features import nn_rows_schema

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
_ID_COLUMNS = ("user_id", "item_id", "request_id")


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
    """numpy twin of :func:`transact.model.nn_features.valid_mask`: bool [N, S]."""
    parts = []
    for s, size in enumerate(sizes):
        slot = np.arange(size)
        parts.append(slot[None, :] >= size - seg_len[:, s : s + 1].astype(np.int64))
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(seg_len), 0), bool)


def _derive_rows(table: pa.Table, cfg, known_items: np.ndarray | None) -> pd.DataFrame:
    from transact.model.config import SEGMENTS

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
    for seg in SEGMENTS:
        derived[f"seg_len_{seg}"] = np.full(n, np.nan)
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


# ----------------------------------------------------------------------------- suites
def _import_gx() -> None:
    import great_expectations  # noqa: F401


def _gxe():
    import great_expectations.expectations as gxe

    return gxe


def _check(table: str, name: str, cls_name: str, show: Iterable[str] = (), hint: str = "",
           **kw) -> Check:
    full = f"{table}: {name}"
    cls = getattr(_gxe(), cls_name)
    exp = cls(meta={"name": full, "table": table}, description=full, **kw)
    return Check(full, table, exp, tuple(show), tuple(c for c in (kw.get("column"),) if c), hint)


def _not_null(table: str, cols: Iterable[str], keys: tuple[str, ...]) -> list[Check]:
    return [_check(table, f"{c} is not null", "ExpectColumnValuesToNotBeNull", keys + (c,), column=c)
            for c in cols]


def _ts_check(table: str, p: Params, keys: tuple[str, ...]) -> Check:
    hi = p.now_ms + p.future_skew_ms
    return _check(table, "ts in range (not before min_ts, not in the future)",
                  "ExpectColumnValuesToBeBetween", keys + ("ts",), column="ts",
                  min_value=p.min_ts_ms, max_value=hi,
                  hint=f"allowed ts: {p.min_ts_ms} ({_iso(p.min_ts_ms)}) to {hi} ({_iso(hi)}); min_ts from "
                       f"{p.min_ts_source}: logs older than that need --min-ts (or min_ts in world.json)")


def _id_checks(table: str, cols: Iterable[str], keys: tuple[str, ...]) -> list[Check]:
    return [_check(table, f"{c} is non-negative", "ExpectColumnValuesToBeBetween", keys + (c,),
                   column=c, min_value=0) for c in cols]


def _surface_check(table: str, keys: tuple[str, ...]) -> Check:
    return _check(table, "surface is a known surface", "ExpectColumnValuesToBeInSet",
                  keys + ("surface",), column="surface", value_set=list(range(len(S.SURFACES))))


def _frame_columns(schema: pa.Schema) -> list[str]:
    """The frame columns that stand for ``schema``'s columns (``<c>_len`` for list and
    binary columns, which GX cannot hold)."""
    return [f"{f.name}_len" if (pa.types.is_nested(f.type) or pa.types.is_binary(f.type)
                               or pa.types.is_fixed_size_binary(f.type)) else f.name
            for f in schema]


def _columns_check(table: str, schema: pa.Schema) -> Check:
    return _check(table, "has the schema's columns", "ExpectTableColumnsToMatchSet",
                  column_set=_frame_columns(schema), exact_match=False)


def _rate_checks(table: str, columns: Iterable[tuple[str, str]], section: dict | None,
                 n: int, p: Params, what: str) -> list[Check]:
    """Mean of 0/1 ``column`` near the reference's ``section[key]`` (distribution checks)."""
    if not section:
        return []
    n_ref = int(section.get("n", 0))
    checks = []
    for column, key in columns:
        ref = section.get("rates", {}).get(key)
        if ref is None or n_ref <= 0:
            continue
        lo, hi = p.tolerance.band(float(ref), n, n_ref)
        checks.append(_check(table, what.format(key=key), "ExpectColumnMeanToBeBetween",
                             column=column, min_value=lo, max_value=hi))
    return checks


def build_checks(table: str, params: Params, reference: dict | None = None, n_rows: int = 0,
                 cfg=None, with_items: bool = True) -> list[Check]:
    """The named expectations of ``table`` (one of :data:`WORLD_TABLES` or ``"nn_rows"``).

    ``reference``: a profile from :func:`world_profile` (distribution checks are added
    for the sections it has); ``n_rows``: the batch's row count (sets the noise part of
    the distribution bands); ``cfg``: FeatureConfig of NN rows; ``with_items``: add the
    referential checks (the items table was readable).
    """
    p = params
    ref = (reference or {}).get(table)
    if table == "items":
        k = ("item_id",)
        return [
            _columns_check(table, S.ITEMS),
            _check(table, "table is not empty", "ExpectTableRowCountToBeBetween", min_value=1),
            *_not_null(table, ["item_id"], ()),
            _check(table, "item_id is unique", "ExpectColumnValuesToBeUnique", k, column="item_id"),
            _check(table, "emb is not null", "ExpectColumnValuesToNotBeNull", k + ("emb_len",),
                   column="emb_len"),
            _check(table, f"emb has {S.EMB_DIM} values", "ExpectColumnValuesToBeInSet",
                   k + ("emb_len",), column="emb_len", value_set=[S.EMB_DIM]),
            _check(table, "emb_q is not null", "ExpectColumnValuesToNotBeNull", k + ("emb_q_len",),
                   column="emb_q_len"),
            _check(table, f"emb_q has {S.EMB_DIM} values", "ExpectColumnValuesToBeInSet",
                   k + ("emb_q_len",), column="emb_q_len", value_set=[S.EMB_DIM]),
            _check(table, "emb values are finite", "ExpectColumnValuesToBeBetween",
                   k + ("emb_nonfinite",), column="emb_nonfinite", min_value=0, max_value=0),
            _check(table, f"emb_q values within [-{QMAX}, {QMAX}]", "ExpectColumnValuesToBeBetween",
                   k + ("emb_q_absmax",), column="emb_q_absmax", min_value=0, max_value=QMAX),
            _check(table, "emb_q matches emb within half a quantisation step",
                   "ExpectColumnValuesToBeBetween", k + ("emb_q_max_err",), column="emb_q_max_err",
                   min_value=0, max_value=MAX_ERROR + QUANT_TOL),
            _check(table, f"emb_q saturates at ±{QMAX} where |emb| > {SCALE}",
                   "ExpectColumnValuesToBeBetween", k + ("emb_q_saturation_errors",),
                   column="emb_q_saturation_errors", min_value=0, max_value=0),
            *_id_checks(table, ["item_id"], ()),
            _check(table, "all-zero embedding share within max_zero_embedding_share",
                   "ExpectColumnValuesToBeInSet", k + ("emb_q_all_zero",), column="emb_q_all_zero",
                   value_set=[False], mostly=1.0 - p.max_zero_embedding_share,
                   hint=f"at most {p.max_zero_embedding_share:.2%} of items may have an all-zero int8 "
                        f"embedding (a missing embedding written as zeros, or values far below one "
                        f"quantisation step {STEP:.4f})"),
            _check(table, "saturated emb_q value share within max_saturated_share",
                   "ExpectColumnMeanToBeBetween", column="emb_q_saturated_share", min_value=0,
                   max_value=p.max_saturated_share,
                   hint=f"at most {p.max_saturated_share:.2%} of int8 values may sit at ±{QMAX}: values "
                        f"beyond ±{SCALE} saturate (normalise the embeddings before import)"),
        ]
    if table in EVENT_KEYS:
        schema = S.TABLES[table]
        keys = EVENT_KEYS[table] if table != "requests" else ("request_id", "user_id", "item_id")
        checks = [
            _columns_check(table, schema),
            _check(table, "table is not empty", "ExpectTableRowCountToBeBetween", min_value=1),
            *_not_null(table, [f.name for f in schema], keys),
            _surface_check(table, keys),
            _ts_check(table, p, keys),
            _check(table, "duplicate-event rate within max_duplicate_rate",
                   "ExpectColumnValuesToBeInSet", EVENT_KEYS[table] + ("is_duplicate",),
                   column="is_duplicate", value_set=[False], mostly=1.0 - p.max_duplicate_rate),
        ]
        if with_items:
            checks.append(_check(table, "item_id refers to a known item", "ExpectColumnValuesToBeInSet",
                                 keys + ("item_known",), column="item_known", value_set=[True]))
        checks += _id_checks(table, [c for c in _ID_COLUMNS if c in schema.names], keys)
        checks.append(_check(table, "no event is logged twice (exact duplicate rows)",
                             "ExpectColumnValuesToBeBetween", EVENT_KEYS[table] + ("exact_duplicate",),
                             column="exact_duplicate", min_value=0, max_value=0))
        if "position" in schema.names:
            checks.append(_check(table, "position is non-negative", "ExpectColumnValuesToBeBetween",
                                 keys + ("position",), column="position", min_value=0))
            checks.append(_check(table, "positions of a request are 0..n-1, each once",
                                 "ExpectColumnValuesToBeBetween", ("request_id", "item_id", "position",
                                                                   "position_bad"),
                                 column="position_bad", min_value=0, max_value=0))
        if table == "impressions":
            checks.append(_check(table, "every impression matches a request row (request_id, item_id)",
                                 "ExpectColumnValuesToBeBetween", keys + ("impression_unmatched",),
                                 column="impression_unmatched", min_value=0, max_value=0))
        if table == "actions":
            allowed = [m for m in range(1, 256) if m & ~S.EXPLICIT_MASK == 0]
            checks.append(_check(table, "action is a non-empty mask of explicit action bits",
                                 "ExpectColumnValuesToBeInSet", keys + ("action",), column="action",
                                 value_set=allowed))
            checks.append(_check(table, "action does not combine hide with click or repin",
                                 "ExpectColumnValuesToBeBetween", keys + ("action",),
                                 column="action_contradicts", min_value=0, max_value=0))
            checks += _rate_checks(table, [(f"has_{a}", a) for a in S.EXPLICIT_ACTIONS], ref,
                                   n_rows, p, "'{key}' share of actions matches the reference")
        if table == "requests":
            checks += [
                _check(table, f"{c} is 0 or 1", "ExpectColumnValuesToBeInSet", keys + (c,), column=c,
                       value_set=[0, 1]) for c in S.LABEL_COLUMNS]
            checks += [
                _check(table, "candidates per request within [1, max_candidates]",
                       "ExpectColumnValuesToBeBetween", ("request_id", "request_size"),
                       column="request_size", min_value=1, max_value=p.max_candidates),
                _check(table, "rows of a request share one user and one ts",
                       "ExpectColumnValuesToBeInSet", ("request_id", "user_id", "ts",
                                                      "request_consistent"),
                       column="request_consistent", value_set=[True]),
                _check(table, "labels do not combine hide with click or repin",
                       "ExpectColumnValuesToBeBetween", keys + S.LABEL_COLUMNS,
                       column="labels_contradict", min_value=0, max_value=0),
                _check(table, "every request row has its impression", "ExpectColumnValuesToBeBetween",
                       keys + ("request_not_impressed",), column="request_not_impressed",
                       min_value=0, max_value=0),
                _check(table, "positive labels have their engagement in actions within the label window",
                       "ExpectColumnValuesToBeBetween", keys + ("ts",) + S.LABEL_COLUMNS,
                       column="label_unbacked", min_value=0, max_value=0,
                       hint=f"a label counts an action of its type on (user_id, item_id) logged at "
                            f"most label_window_ms = {p.label_window_ms:,} ms after the request "
                            f"(from {p.label_window_source}; set --label-window-ms or label_window_ms "
                            f"in world.json)"),
                _check(table, "no labelled engagement logged only before its request (clock shift)",
                       "ExpectColumnValuesToBeBetween", keys + ("ts",) + S.LABEL_COLUMNS,
                       column="label_before_only", min_value=0, max_value=0,
                       hint=f"the engagement a label counts is in actions up to {p.leak_window_ms:,} ms "
                            f"before the request instead of after it: the request and action clocks "
                            f"disagree (time zone?), and the label leaks into the request's own S_RT"),
                _check(table, "label rates match the action log (unlabelled engagements within "
                              "max_missed_label_share)",
                       "ExpectColumnValuesToBeBetween", keys + ("ts",) + S.LABEL_COLUMNS,
                       column="label_missed", min_value=0, max_value=0,
                       mostly=1.0 - p.max_missed_label_share,
                       hint=f"at most {p.max_missed_label_share:.2%} of request rows may have an action "
                            f"on the candidate within the label window that no label counts"),
            ]
            checks += _rate_checks(table, [(c, c) for c in S.LABEL_COLUMNS], ref, n_rows, p,
                                   "{key} rate matches the reference")
        return checks
    if table == ROWS_TABLE:
        return _rows_checks(p, ref, n_rows, cfg, with_items)
    raise ValueError(f"unknown table {table!r}; valid: {', '.join(WORLD_TABLES + (ROWS_TABLE,))}")


def _rows_checks(p: Params, ref: dict | None, n_rows: int, cfg, with_items: bool) -> list[Check]:
    from transact.model.config import SEGMENTS
    from transact.model.nn_features import nn_rows_schema

    t = ROWS_TABLE
    keys = ("request_id", "item_id")
    Sq, D = cfg.seq_len, S.EMB_DIM
    meta = ["request_id", "user_id", "item_id", "ts", "surface", "position", *S.LABEL_COLUMNS]
    checks = [
        _columns_check(t, nn_rows_schema(cfg)),
        _check(t, "table is not empty", "ExpectTableRowCountToBeBetween", min_value=1),
        *_not_null(t, meta, keys),
        *_id_checks(t, _ID_COLUMNS, keys),
        _surface_check(t, keys),
        _ts_check(t, p, keys),
        *[_check(t, f"{c} is 0 or 1", "ExpectColumnValuesToBeInSet", keys + (c,), column=c,
                 value_set=[0, 1]) for c in S.LABEL_COLUMNS],
    ]
    if with_items:
        checks.append(_check(t, "item_id refers to a known item", "ExpectColumnValuesToBeInSet",
                             keys + ("item_known",), column="item_known", value_set=[True]))
    widths = {"cand_emb_q": (D, f"{D} bytes"), "tok_emb_q": (Sq * D, f"S x {D} = {Sq * D} bytes"),
              "tok_action": (Sq, f"S = {Sq} bytes"), "tok_surface": (Sq, f"S = {Sq} bytes"),
              "tok_age_s": (Sq, f"S = {Sq} values"), "seg_len": (len(SEGMENTS), f"{len(SEGMENTS)} values")}
    for c, (w, txt) in widths.items():
        checks.append(_check(t, f"{c} is not null", "ExpectColumnValuesToNotBeNull", keys + (f"{c}_len",),
                             column=f"{c}_len"))
        checks.append(_check(t, f"{c} holds {txt}", "ExpectColumnValuesToBeInSet", keys + (f"{c}_len",),
                             column=f"{c}_len", value_set=[w]))
    for seg, size, cap in zip(SEGMENTS, cfg.segment_sizes, ("k_ll", "k_rt", "r", "k_imp")):
        checks.append(_check(t, f"{seg} segment length within [0, {cap}]", "ExpectColumnValuesToBeBetween",
                             keys + (f"seg_len_{seg}",), column=f"seg_len_{seg}", min_value=0,
                             max_value=size))
    zero = [
        ("cand_emb_q_absmax", f"cand_emb_q values within [-{QMAX}, {QMAX}]", QMAX),
        ("tok_emb_q_absmax", f"token emb_q values within [-{QMAX}, {QMAX}]", QMAX),
        ("pad_emb_nonzero", "padding slots have a zero embedding", 0),
        ("pad_action_nonzero", "padding slots have action 0", 0),
        ("pad_surface_nonzero", "padding slots have surface 0", 0),
        ("pad_age_not_pad", "padding slots have age -1", 0),
        ("valid_age_negative", "valid slots have age >= 0", 0),
        ("valid_action_bad", "valid slots have a non-empty known action mask", 0),
        ("valid_surface_bad", "valid slots have a known surface", 0),
    ]
    for c, name, hi in zero:
        checks.append(_check(t, name, "ExpectColumnValuesToBeBetween", keys + (c,), column=c,
                             min_value=0, max_value=hi))
    checks += _rate_checks(t, [(c, c) for c in S.LABEL_COLUMNS], ref, n_rows, p,
                           "{key} rate matches the reference")
    return checks


def build_suite(table: str, params: Params, reference: dict | None = None, n_rows: int = 0,
                cfg=None, with_items: bool = True):
    """``build_checks`` as a ``great_expectations.ExpectationSuite`` named ``table``."""
    import great_expectations as gx

    return gx.ExpectationSuite(name=table, expectations=[
        c.expectation for c in build_checks(table, params, reference, n_rows, cfg, with_items)])


# ----------------------------------------------------------------------------- GX run
class _GX:
    """One ephemeral GX context with a pandas data source: one checkpoint per table."""

    def __init__(self) -> None:
        import logging

        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.ctx.data_sources.add_pandas("transact")

    def run(self, table: str, df: pd.DataFrame, checks: list[Check]):
        gx = self.gx
        asset = self.source.add_dataframe_asset(name=table)
        batch_def = asset.add_batch_definition_whole_dataframe(f"{table}-whole")
        # Expectations given at construction: one store write instead of one per expectation.
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=table,
                                                        expectations=[c.expectation for c in checks]))
        vd = self.ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate-{table}", data=batch_def, suite=suite))
        cp = self.ctx.checkpoints.add(gx.Checkpoint(
            name=f"checkpoint-{table}", validation_definitions=[vd],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20}))
        result = cp.run(batch_parameters={"dataframe": df})
        return next(iter(result.run_results.values()))


def _exception_message(info: Any) -> str | None:
    if not info:
        return None
    if isinstance(info, dict):
        if "raised_exception" in info:
            return info.get("exception_message") if info.get("raised_exception") else None
        for v in info.values():  # keyed by metric id
            msg = _exception_message(v)
            if msg:
                return msg
    return None


def _example_rows(df: pd.DataFrame, idx: list, show: tuple[str, ...], k: int = 5) -> list[dict]:
    cols = [c for c in dict.fromkeys(show) if c in df.columns]
    out = []
    for i in idx[:k]:
        try:
            row = df.loc[i, cols] if cols else df.loc[i]
        except KeyError:
            continue
        out.append({"row": i, **{c: _json_safe(v.item() if hasattr(v, "item") else v)
                                 for c, v in row.items()}})
    return out


def _collect(checks: list[Check], vr, df: pd.DataFrame) -> list[Failure]:
    by_name = {c.name: c for c in checks}
    failures = []
    for r in vr.results:
        if r.success:
            continue
        cfg = r.expectation_config
        name = (cfg.meta or {}).get("name", cfg.type)
        check = by_name.get(name)
        res = dict(r.result or {})
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        if isinstance(kwargs.get("value_set"), list) and len(kwargs["value_set"]) > 12:
            vs = kwargs["value_set"]
            kwargs["value_set"] = f"{len(vs)} values, {vs[0]}..{vs[-1]}"
        idx = res.get("partial_unexpected_index_list") or []
        failures.append(Failure(
            name=name, table=check.table if check else "?", expectation=cfg.type, kwargs=kwargs,
            hint=(check.hint or None) if check else None,
            unexpected_count=res.get("unexpected_count"), element_count=res.get("element_count"),
            observed=_json_safe(res["details"]["mismatched"] if isinstance(res.get("details"), dict)
                                and "mismatched" in res["details"]
                                else res.get("observed_value", res.get("details"))),
            sample_values=[] if all(isinstance(v, (bool, np.bool_)) for v in
                                    res.get("partial_unexpected_list") or [True])
            else _json_safe((res.get("partial_unexpected_list") or [])[:5]),
            examples=_example_rows(df, list(idx), check.show if check else ()),
            exception=_exception_message(r.exception_info),
        ))
    order = {c.name: i for i, c in enumerate(checks)}
    failures.sort(key=lambda f: order.get(f.name, 1 << 30))
    return failures


def _validate_frame(gxr: _GX, table: str, df: pd.DataFrame, checks: list[Check]):
    """Runs the checks whose columns exist and have the schema's type; the others count as
    skipped (the columns check names the missing columns, the type check the wrong types)."""
    wrong = df.attrs.get(TYPE_ERRORS, {})
    run = [c for c in checks if all(col in df.columns and col not in wrong for col in c.columns)]
    vr = gxr.run(table, df, run)
    failures = [Failure(f"{table}: {col} has type {want}", table, "column type", {"column": col},
                        gx=False, exception=msg, hint=fix)
                for col, (want, msg, fix) in wrong.items()]
    failures += _collect(run, vr, df)
    stats = {"evaluated": len(run) + len(wrong), "failed": len(failures),
             "skipped": len(checks) - len(run)}
    return vr, failures, stats


# ----------------------------------------------------------------------------- profile / reference
def _rate_section(df: pd.DataFrame, cols: Iterable[tuple[str, str]]) -> dict:
    rates = {}
    for col, key in cols:
        if col in df:
            v = pd.to_numeric(df[col], errors="coerce")
            if v.notna().any():
                rates[key] = float(v.mean())
    return {"n": int(len(df)), "rates": rates}


def world_profile(frames: dict[str, pd.DataFrame], batch: str = "", checked_at: str = "") -> dict:
    """The profile of an accepted batch: what the next batch's distribution checks compare
    with (per-type action shares, label rates, row counts, surface mix)."""
    prof: dict[str, Any] = {"version": PROFILE_VERSION, "batch": batch, "checked_at": checked_at,
                            "rows": {t: int(len(df)) for t, df in frames.items()}}
    if "actions" in frames:
        prof["actions"] = _rate_section(frames["actions"], [(f"has_{a}", a) for a in S.EXPLICIT_ACTIONS])
    for t in ("requests", ROWS_TABLE):
        if t in frames:
            prof[t] = _rate_section(frames[t], [(c, c) for c in S.LABEL_COLUMNS])
    for t, df in frames.items():
        if "surface" in df and len(df) and t in prof:
            share = df["surface"].value_counts(normalize=True)
            prof[t]["surface_share"] = {S.SURFACES[int(k)] if 0 <= k < len(S.SURFACES) else str(k): float(v)
                                        for k, v in share.items() if pd.notna(k)}
    return prof


def load_reference(reference: str | os.PathLike | dict | None) -> tuple[dict | None, str]:
    """(profile or None, a note saying where it came from)."""
    if reference is None or reference == "":
        return None, "none (distribution checks skipped)"
    if isinstance(reference, dict):
        return reference, "given as a dict"
    path = Path(reference)
    if not path.exists():
        return None, f"none: {path} does not exist yet (distribution checks skipped; written on pass)"
    try:
        ref = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"reference {path}: not valid JSON ({e})") from None
    if not isinstance(ref, dict) or ref.get("version") != PROFILE_VERSION:
        raise ValueError(f"reference {path}: not a validation profile (version {PROFILE_VERSION})")
    return ref, f"{path} (batch {ref.get('batch') or '?'}, checked {ref.get('checked_at') or '?'})"


# ----------------------------------------------------------------------------- decision
def _quarantine_dest(quarantine_dir: Path, batch: str, stamp: str) -> Path:
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    dest = quarantine_dir / f"{batch}-{stamp}"
    i = 1
    while dest.exists():
        dest = quarantine_dir / f"{batch}-{stamp}-{i}"
        i += 1
    return dest


def _parquet_rows(path: Path) -> int | None:
    try:
        return int(pq.ParquetFile(path).metadata.num_rows) if path.is_file() else \
            int(pq.ParquetDataset(path).read(columns=[]).num_rows)
    except Exception:  # noqa: BLE001 - unreadable: count unknown
        return None


def _world_manifest(world: Path) -> dict:
    """The batch's manifest; refuses (one line, nothing touched) a folder that is not a
    sealed world, so validation never moves a folder of something else to quarantine."""
    from transact.data.world import SEAL_HINT, has_world_tables, read_manifest, recover

    if not world.exists():
        recover(world)  # a publish killed between its two renames
    if not world.is_dir():
        raise FileNotFoundError(f"validate: no world folder {world}")
    manifest = read_manifest(world)
    if manifest is None and not has_world_tables(world):
        raise ValueError(f"validate: {world} is not a world folder (no manifest.json, no "
                         f"{', '.join(WORLD_TABLES)} tables); nothing was moved")
    if manifest is None:
        raise ValueError(f"validate: {world} has no manifest.json (tables written by hand?); "
                         f"{SEAL_HINT.format(dir=world)}; nothing was moved")
    return manifest


def _manifest_failures(world: Path, manifest: dict) -> list[Failure]:
    """A present table (or world.json) that differs from the manifest: the batch changed
    after it was published. Missing tables are the "table is present" failures."""
    from transact.data.world import WORLD_JSON, manifest_differences

    out = []
    for name, what in manifest_differences(world, manifest).items():
        path = world / (WORLD_JSON if name == WORLD_JSON else f"{name}.parquet")
        if not path.exists():
            continue
        table = name if name in WORLD_TABLES else "world"
        out.append(Failure(f"world: {name} matches the manifest", table, "matches manifest",
                           {"path": str(path)}, gx=False, exception=what,
                           hint="the batch was changed after it was published; re-publish it "
                                "(or `transact seal-world` for tables written by hand)"))
    for name in WORLD_TABLES:
        if table_path(world, name).exists() and name not in manifest["tables"]:
            out.append(Failure(f"world: {name} matches the manifest", name, "matches manifest",
                               {"path": str(table_path(world, name))}, gx=False,
                               exception=f"{name}.parquet is not in the manifest"))
    return out


def _move_dir(src: Path, dest: Path) -> None:
    """Moves a folder in one rename; across file systems copies into a hidden folder
    beside ``dest`` first, so ``dest`` appears whole or not at all."""
    import errno

    try:
        os.rename(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    incoming = dest.with_name(f".{dest.name}.incoming-{os.getpid()}")
    shutil.copytree(src, incoming)
    os.rename(incoming, dest)
    shutil.rmtree(src)


def _quarantine_world(world: Path, quarantine: Path, result: ValidationResult, gx_results: dict,
                      params: Params, rows_in: dict[str, int | None]) -> Path:
    """Reports first, move last: the reports are written into the batch, which then moves
    to quarantine in one rename; a kill at any point leaves the batch at its place or in
    quarantine, always with its reasons."""
    from transact.data.world import fault_point

    dest = _quarantine_dest(quarantine, result.batch, _utc_stamp(int(time.time() * 1000)))
    result.location = result.quarantine = str(dest)
    result.rows = {t: {"in": n, "accepted": 0, "quarantined": n} for t, n in rows_in.items()}
    (world / PROFILE_JSON).unlink(missing_ok=True)  # a stale profile from an earlier pass
    _finish(result, gx_results, params, world)
    fault_point("quarantine-reported")
    _move_dir(world, dest)
    fault_point("quarantine-moved")
    for t, n in rows_in.items():  # the whole batch moved: every row is accounted for
        p = table_path(dest, t)
        if p.exists() and n is not None and _parquet_rows(p) != n:
            raise RuntimeError(f"quarantine of {result.batch}: table {t} has {_parquet_rows(p)} rows "
                               f"after the move, {n} before")
    return dest


def _results_json(result: ValidationResult, gx_results: dict, params: Params) -> dict:
    return {"batch": result.batch, "kind": result.kind, "passed": result.passed,
            "checked_at": result.checked_at, "source": result.source, "location": result.location,
            "params": asdict(params), "rows": result.rows, "checks": result.checks,
            "failures": [asdict(f) for f in result.failures],
            "great_expectations": gx_results}


def _finish(result: ValidationResult, gx_results: dict, params: Params, report_dir: Path,
            stem: str = "") -> None:
    from transact.components.validation_report import render_markdown

    result.reports = {"markdown": str(report_dir / f"{stem}{REPORT_MD}"),
                      "json": str(report_dir / f"{stem}{RESULTS_JSON}")}
    if result.profile is not None:
        result.reports["profile"] = str(report_dir / f"{stem}{PROFILE_JSON}")
        _write_json(Path(result.reports["profile"]), result.profile)
    result.summary = render_markdown(result)
    _write_json(Path(result.reports["json"]), _results_json(result, gx_results, params))
    _write_text(Path(result.reports["markdown"]), result.summary)


def world_meta(world: Path) -> dict:
    """``world.json`` of a world folder ({} when absent or unreadable: the defaults apply)."""
    try:
        meta = json.loads((Path(world) / "world.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _make_params(now, min_ts, max_candidates, max_duplicate_rate, tolerance, meta: dict | None = None,
                 label_window_ms: int | None = None) -> Params:
    """The checks' parameters: an explicit argument wins, then the world's ``world.json``
    (``min_ts``, ``label_window_ms``, ``config.chunk_size``), then the defaults."""
    meta = meta or {}
    if not 0 <= max_duplicate_rate < 1:
        raise ValueError("max_duplicate_rate must be in [0, 1)")
    if max_candidates is None:
        try:
            max_candidates = int(meta["config"]["chunk_size"])
        except (KeyError, TypeError, ValueError):
            max_candidates = DEFAULT_MAX_CANDIDATES
    if max_candidates < 1:
        raise ValueError("max_candidates must be >= 1")
    min_ts_source = "--min-ts"
    if min_ts is None:
        min_ts, min_ts_source = MIN_TS_MS, "the default (2010-01-01)"
        if isinstance(meta.get("min_ts"), int):
            min_ts, min_ts_source = meta["min_ts"], "world.json"
    window_source = "--label-window-ms"
    if label_window_ms is None:
        label_window_ms, window_source = S.DEFAULT_LABEL_WINDOW_MS, "the default (one hour)"
        if isinstance(meta.get("label_window_ms"), int):
            label_window_ms, window_source = meta["label_window_ms"], "world.json"
    if label_window_ms <= 0:
        raise ValueError(f"label_window_ms must be > 0, got {label_window_ms}")
    return Params(now_ms=now_ms(now), min_ts_ms=int(min_ts), max_candidates=int(max_candidates),
                  max_duplicate_rate=float(max_duplicate_rate), tolerance=tolerance or Tolerance(),
                  min_ts_source=min_ts_source, label_window_ms=int(label_window_ms),
                  label_window_source=window_source)


def validate_world(world_dir: str | os.PathLike, quarantine_dir: str | os.PathLike,
                   reference: str | os.PathLike | dict | None = None, now: Any = None, *,
                   reference_out: str | os.PathLike | None = None, update_reference: bool = True,
                   max_candidates: int | None = None,
                   max_duplicate_rate: float = DEFAULT_MAX_DUPLICATE_RATE,
                   min_ts: int | None = None, tolerance: Tolerance | None = None,
                   label_window_ms: int | None = None) -> ValidationResult:
    """Validates the four tables of a world folder and decides.

    Args:
        world_dir: the batch (a world folder); its name is the batch name.
        quarantine_dir: where a failed batch is moved (``<batch>-<UTC stamp>/``).
        reference: the previous accepted batch's profile (a JSON path or a dict); None
            skips the distribution checks. A path that does not exist yet is the first
            batch: no distribution checks, and the profile is written there on pass.
        now: "the future" starts here (see :func:`now_ms`); default: the wall clock.
        reference_out: where a passing batch writes its profile as the new reference
            (default: the ``reference`` path when one was given). The profile is always
            also written to ``<world>/validation_profile.json``.
        update_reference: False never writes ``reference_out``.
        max_candidates: rows per request allowed; default ``chunk_size`` from
            ``world.json``, else :data:`DEFAULT_MAX_CANDIDATES`.
        max_duplicate_rate: share of duplicated events allowed per event table.
        min_ts: lower bound of every ``ts`` (epoch ms); default ``min_ts`` from
            ``world.json``, else :data:`MIN_TS_MS` (2010-01-01).
        tolerance: bands of the distribution checks.
        label_window_ms: how long after its request a label's engagement may be logged;
            default ``label_window_ms`` from ``world.json``, else one hour.

    Returns:
        A :class:`ValidationResult`; on fail the batch is no longer at ``world_dir``
        but at ``result.quarantine``. Reports: ``validation_report.md`` and
        ``validation_results.json`` (GX results) in the batch's folder (wherever it is).
    """
    _import_gx()  # paid once per process; not part of the batch's time
    t0 = time.perf_counter()
    world = Path(world_dir).resolve()
    manifest = _world_manifest(world)
    quarantine = Path(quarantine_dir).resolve()
    if quarantine.is_relative_to(world):
        raise ValueError(f"validate: the quarantine folder {quarantine} must not be inside the batch {world}")
    params = _make_params(now, min_ts, max_candidates, max_duplicate_rate, tolerance,
                          world_meta(world), label_window_ms)
    ref, ref_note = load_reference(reference)
    if reference_out is None and update_reference and reference is not None \
            and not isinstance(reference, dict) and str(reference):
        reference_out = reference
    checked_at = _iso(int(time.time() * 1000))
    batch = world.name

    failures: list[Failure] = []
    rows_in: dict[str, int | None] = {}
    tables: dict[str, pa.Table] = {}
    timings = {"read": 0.0, "derive": 0.0, "gx": 0.0}
    t = time.perf_counter()
    for name in WORLD_TABLES:
        path = table_path(world, name)
        if not path.exists():
            rows_in[name] = 0
            failures.append(Failure(f"world: {name} table is present", name, "table present",
                                    {"path": str(path)}, gx=False,
                                    exception=f"no file {path.name} in the batch"))
            continue
        try:
            tables[name] = pq.read_table(path)
            rows_in[name] = tables[name].num_rows
        except Exception as e:  # noqa: BLE001 - any unreadable file fails the batch
            rows_in[name] = _parquet_rows(path)
            failures.append(Failure(f"world: {name} table is readable", name, "table readable",
                                    {"path": str(path)}, gx=False, exception=f"{type(e).__name__}: {e}"))
    failures += _manifest_failures(world, manifest)

    known = None
    if "items" in tables and "item_id" in tables["items"].column_names:
        known = np.unique(tables["items"].column("item_id").drop_null().to_numpy())
    timings["read"] = time.perf_counter() - t
    gxr = _GX() if tables else None
    frames: dict[str, pd.DataFrame] = {}
    gx_results: dict[str, Any] = {}
    checks_stats: dict[str, dict[str, int]] = {}
    for name in WORLD_TABLES:
        if name not in tables:
            continue
        t = time.perf_counter()
        df = derive_frame(name, tables[name], known, others=tables, params=params)
        frames[name] = df
        timings["derive"] += time.perf_counter() - t
        t = time.perf_counter()
        checks = build_checks(name, params, ref, len(df), with_items=known is not None)
        vr, fails, stats = _validate_frame(gxr, name, df, checks)
        failures += fails
        gx_results[name] = vr.to_json_dict()
        checks_stats[name] = stats
        timings["gx"] += time.perf_counter() - t
    passed = not failures
    t_decide = time.perf_counter()

    result = ValidationResult(
        passed=passed, batch=batch, kind="world", source=str(world), location=str(world),
        quarantine=None, rows={}, checks=checks_stats, failures=failures, checked_at=checked_at,
        now_ms=params.now_ms, seconds=0.0, reference=ref_note, reference_written=None, reports={})
    if passed:
        result.profile = world_profile(frames, batch, checked_at)
        result.rows = {t: {"in": n, "accepted": n, "quarantined": 0} for t, n in rows_in.items()}
        if reference_out is not None and update_reference:
            result.reference_written = str(_write_json(Path(reference_out), result.profile))
        report_dir = world
    else:
        report_dir = _quarantine_world(world, quarantine, result, gx_results, params, rows_in)
    timings["decide"] = time.perf_counter() - t_decide
    result.timings = {k: round(v, 3) for k, v in timings.items()}
    result.seconds = round(time.perf_counter() - t0, 3)
    _finish(result, gx_results, params, report_dir)
    return result


def _rows_config(pf: pq.ParquetFile, cfg):
    from transact.model.config import FeatureConfig

    if cfg is not None:
        return cfg, None
    meta = pf.schema_arrow.metadata or {}
    raw = meta.get(b"feature_config")
    if raw is None:
        return FeatureConfig(), "the row file has no feature_config metadata: checked against the default FeatureConfig"
    return FeatureConfig.from_dict(json.loads(raw)), None


def validate_rows(rows_path: str | os.PathLike, quarantine_dir: str | os.PathLike,
                  reference: str | os.PathLike | dict | None = None, now: Any = None, *,
                  cfg=None, items: str | os.PathLike | None = None,
                  reference_out: str | os.PathLike | None = None, update_reference: bool = True,
                  min_ts: int | None = None, tolerance: Tolerance | None = None) -> ValidationResult:
    """Validates a file of logged NN-feature rows (:func:`~transact.model.nn_features.nn_rows_schema`).

    Checks ids, labels, surfaces, timestamps, the widths of the token blocks, segment
    lengths within their sizes (``seg_len``), padding (padding slots: emb 0, action 0,
    surface 0, age -1; valid slots: age >= 0, a known action and surface), int8 range,
    and label rates against ``reference["nn_rows"]``. ``cfg`` defaults to the file's
    ``feature_config`` metadata. ``items``: a world folder or items parquet, to check that
    candidates are known items (optional). On fail the row file (and its ``<stem>.json``
    summary) moves to ``quarantine_dir/<stem>-<UTC stamp>/``; on pass the reports are
    written beside it as ``<stem>.validation_report.md`` etc.
    """
    _import_gx()
    t0 = time.perf_counter()
    path = Path(rows_path).resolve()
    if path.is_dir():
        path = path / "nn_rows.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"validate: no row file {path}")
    quarantine = Path(quarantine_dir).resolve()
    params = _make_params(now, min_ts, DEFAULT_MAX_CANDIDATES, DEFAULT_MAX_DUPLICATE_RATE, tolerance,
                          world_meta(path.parent))  # rows live beside a copy of their world.json
    ref, ref_note = load_reference(reference)
    if reference_out is None and update_reference and reference is not None \
            and not isinstance(reference, dict) and str(reference):
        reference_out = reference
    checked_at = _iso(int(time.time() * 1000))
    batch = path.stem
    failures: list[Failure] = []
    notes: list[str] = []
    known = None
    if items is not None:
        ip = Path(items)
        ip = table_path(ip, "items") if ip.is_dir() else ip
        known = np.unique(pq.read_table(ip, columns=["item_id"]).column("item_id").drop_null().to_numpy())
    frames, gx_results, checks_stats = {}, {}, {}
    try:
        pf = pq.ParquetFile(path)
        table = pf.read()
        n_in: int | None = table.num_rows
    except Exception as e:  # noqa: BLE001
        table, n_in = None, _parquet_rows(path)
        failures.append(Failure(f"{ROWS_TABLE}: file is readable", ROWS_TABLE, "table readable",
                                {"path": str(path)}, gx=False, exception=f"{type(e).__name__}: {e}"))
    if table is not None:
        cfg, note = _rows_config(pf, cfg)
        if note:
            notes.append(note)
        df = derive_frame(ROWS_TABLE, table, known, cfg)
        frames[ROWS_TABLE] = df
        checks = build_checks(ROWS_TABLE, params, ref, len(df), cfg, with_items=known is not None)
        vr, fails, stats = _validate_frame(_GX(), ROWS_TABLE, df, checks)
        failures += fails
        gx_results[ROWS_TABLE] = vr.to_json_dict()
        checks_stats[ROWS_TABLE] = stats
    passed = not failures
    result = ValidationResult(
        passed=passed, batch=batch, kind="rows", source=str(path), location=str(path), quarantine=None,
        rows={}, checks=checks_stats, failures=failures, checked_at=checked_at, now_ms=params.now_ms,
        seconds=0.0, reference=ref_note, reference_written=None, reports={}, notes=notes)
    if passed:
        result.profile = world_profile(frames, batch, checked_at)
        result.rows = {ROWS_TABLE: {"in": n_in, "accepted": n_in, "quarantined": 0}}
        if reference_out is not None and update_reference:
            result.reference_written = str(_write_json(Path(reference_out), result.profile))
        result.seconds = round(time.perf_counter() - t0, 3)
        _finish(result, gx_results, params, path.parent, stem=f"{path.stem}.")
    else:
        from transact.data.world import fault_point

        dest = _quarantine_dest(quarantine, batch, _utc_stamp(int(time.time() * 1000)))
        dest.mkdir(parents=True)
        result.location = str(dest / path.name)
        result.quarantine = str(dest)
        result.rows = {ROWS_TABLE: {"in": n_in, "accepted": 0, "quarantined": n_in}}
        _finish(result, gx_results, params, dest)  # the reasons first, then the move
        fault_point("quarantine-reported")
        shutil.move(str(path), str(dest / path.name))
        side = path.with_suffix(".json")
        if side.exists():
            shutil.move(str(side), str(dest / side.name))
        fault_point("quarantine-moved")
        if n_in is not None and _parquet_rows(dest / path.name) != n_in:
            raise RuntimeError(f"quarantine of {path.name}: row count changed in the move")
        result.seconds = round(time.perf_counter() - t0, 3)
        _finish(result, gx_results, params, dest)
    return result


# ----------------------------------------------------------------------------- benchmark
def bench_validation(n_actions: int = 1_000_000, n_request_rows: int = 200_000,
                     n_items: int = 200_000, workdir: str | os.PathLike | None = None,
                     seed: int = 0) -> dict:
    """Times :func:`validate_world` on a synthetic world of the given size: a clean batch
    (pass, writes the reference), then the same batch with one corruption against that
    reference (fail, quarantined). GX's import is timed apart (paid once per process)."""
    import tempfile

    from transact.data.corruption import corrupt, synthetic_world

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        import great_expectations  # noqa: F401

        t_import = time.perf_counter() - t
        t = time.perf_counter()
        world = synthetic_world(tmp / "world", n_items=n_items, n_actions=n_actions,
                                n_request_rows=n_request_rows, seed=seed)
        t_gen = time.perf_counter() - t
        ok = validate_world(world, tmp / "quarantine", reference=tmp / "reference.json")
        corrupt(world, "unknown_surface", seed=seed)
        bad = validate_world(world, tmp / "quarantine", reference=tmp / "reference.json")
    runs = {}
    for label, r in (("clean", ok), ("corrupted", bad)):
        runs[label] = {"passed": r.passed, "seconds": r.seconds, "timings": r.timings,
                       "expectations": sum(c["evaluated"] for c in r.checks.values()),
                       "failed": r.failed_names}
    return {"rows": {t: r["in"] for t, r in ok.rows.items()},
            "total_rows": sum(r["in"] for r in ok.rows.values()),
            "gx_import_seconds": round(t_import, 3), "generate_seconds": round(t_gen, 3), "runs": runs}


def format_bench(result: dict) -> str:
    rows = ", ".join(f"{t} {n:,}" for t, n in result["rows"].items())
    lines = [f"validation benchmark: {rows} ({result['total_rows']:,} rows)",
             f"  GX import (once per process): {result['gx_import_seconds']:.2f} s",
             "  run        result  expectations  seconds   read  derive     gx  decide"]
    for label, r in result["runs"].items():
        tm = r["timings"]
        lines.append(f"  {label:9s}  {'pass' if r['passed'] else 'FAIL':6s}  {r['expectations']:12d}  "
                     f"{r['seconds']:7.2f}  {tm['read']:5.2f}  {tm['derive']:6.2f}  {tm['gx']:5.2f}  "
                     f"{tm['decide']:6.2f}")
    return "\n".join(lines)
