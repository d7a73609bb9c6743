"""The suites: the named expectations of each table (:func:`build_checks`), each a GX
expectation with a stable human-readable name in ``meta["name"]`` (also its
``description``), e.g. ``"actions: action is a non-empty mask of explicit action bits"``;
reports, ``CAUGHT_BY`` and tests use these names."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from transact.data import schema as S
from transact.data.quantization import MAX_ERROR, QMAX, SCALE, STEP
from transact.validation.params import (
    _ID_COLUMNS,
    EVENT_KEYS,
    QUANT_TOL,
    ROWS_TABLE,
    WORLD_TABLES,
    Params,
    _iso,
)


@dataclass
class Check:
    """A named expectation of one table; ``show`` lists the columns of its example rows."""

    name: str
    table: str
    expectation: Any  # a great_expectations.expectations.Expectation
    show: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()  # frame columns it reads (skipped when one is absent)
    hint: str = ""  # shown with a failure: the bound in words, the option that sets it



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
                       hint=f"no action of the label's type belongs to the row; {_attribution(p)}"),
                _check(table, "no labelled engagement logged only before its request (clock shift)",
                       "ExpectColumnValuesToBeBetween", keys + ("ts",) + S.LABEL_COLUMNS,
                       column="label_before_only", min_value=0, max_value=0,
                       hint=f"the engagement a label counts is in actions up to {p.leak_window_ms:,} ms "
                            f"before the request instead of after it, and no earlier showing of the item "
                            f"owns it: the request and action clocks disagree (time zone?), and the label "
                            f"leaks into the request's own S_RT; {_attribution(p)}"),
                _check(table, "label rates match the action log (unlabelled engagements within "
                              "max_missed_label_share)",
                       "ExpectColumnValuesToBeBetween", keys + ("ts",) + S.LABEL_COLUMNS,
                       column="label_missed", min_value=0, max_value=0,
                       mostly=1.0 - p.max_missed_label_share,
                       hint=f"at most {p.max_missed_label_share:.2%} of request rows may own an action "
                            f"that no label of theirs counts; {_attribution(p)}"),
            ]
            checks += _rate_checks(table, [(c, c) for c in S.LABEL_COLUMNS], ref, n_rows, p,
                                   "{key} rate matches the reference")
        return checks
    if table == ROWS_TABLE:
        return _rows_checks(p, ref, n_rows, cfg, with_items)
    raise ValueError(f"unknown table {table!r}; valid: {', '.join(WORLD_TABLES + (ROWS_TABLE,))}")


def _attribution(p: Params) -> str:
    """The label rule and the label window in force, for every label message (one line)."""
    return (f"an action belongs to the most recent showing of its item to its user at or before it, "
            f"within the label window label_window_ms = {p.label_window_ms:,} ms (from "
            f"{p.label_window_source}; set --label-window-ms or label_window_ms in world.json)")


def _rows_checks(p: Params, ref: dict | None, n_rows: int, cfg, with_items: bool) -> list[Check]:
    from transact.features.config import SEGMENTS
    from transact.features.nn_features import nn_rows_schema

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
