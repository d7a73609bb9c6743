"""The event schema: defined once here, used by every step (simulator, adapters,
sequence building, NN-feature logging, Feast, validation, serving, monitoring).

Tables (parquet):

| table       | one row per                          | key columns                         |
|-------------|--------------------------------------|-------------------------------------|
| items       | item                                 | item_id                             |
| actions     | explicit action of a user on an item | user_id, item_id, ts                |
| impressions | item shown to a user                 | user_id, item_id, ts, request_id    |
| requests    | (request, candidate) with labels     | request_id, user_id, item_id, ts    |

Conventions:
- ``ts`` is int64 milliseconds since the Unix epoch (UTC).
- ``action`` is a multi-hot bitmask over :data:`ACTIONS` (bit i <=> ``ACTIONS[i]``);
  a user who close-ups then repins the same item in one visit has both bits set.
- ``surface`` is an index into :data:`SURFACES`.
- ``emb`` is the item's 32-d fp16 content embedding; ``emb_q`` its int8 copy
  (see :mod:`transact.data.quantization`).
- ``requests`` carries one 0/1 label column per action type (``label_<action>``), so
  any head list and label-weight matrix can be built from it.
"""
from __future__ import annotations

import pyarrow as pa

EMB_DIM: int = 32

#: Action types, in bit order. ``impression`` is never an explicit action: it marks
#: tokens of the impression sequence so that their action embedding is not empty.
ACTIONS: tuple[str, ...] = ("click", "repin", "hide", "closeup", "impression")
ACTION_BIT: dict[str, int] = {a: 1 << i for i, a in enumerate(ACTIONS)}
#: Explicit (engagement) action types: what the actions table and labels hold.
EXPLICIT_ACTIONS: tuple[str, ...] = ("click", "repin", "hide", "closeup")
#: Actions that count as positive engagement (NAL positives); ``hide`` is negative.
POSITIVE_ACTIONS: tuple[str, ...] = ("click", "repin", "closeup")
POSITIVE_MASK: int = sum(ACTION_BIT[a] for a in POSITIVE_ACTIONS)
EXPLICIT_MASK: int = sum(ACTION_BIT[a] for a in EXPLICIT_ACTIONS)

#: Engagements that never come with a ``hide`` of the same item in the same event or
#: label row: a row holding both is a logging fault.
CONTRADICTS_HIDE: tuple[str, ...] = ("click", "repin")
CONTRADICTS_HIDE_MASK: int = sum(ACTION_BIT[a] for a in CONTRADICTS_HIDE)

SURFACES: tuple[str, ...] = ("homefeed", "search", "related", "profile")

LABEL_COLUMNS: tuple[str, ...] = tuple(f"label_{a}" for a in EXPLICIT_ACTIONS)

emb_type = pa.list_(pa.float16(), EMB_DIM)
emb_q_type = pa.list_(pa.int8(), EMB_DIM)

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("topic", pa.int32()),  # simulator only; -1 when unknown
        pa.field("emb", emb_type, nullable=False),
        pa.field("emb_q", emb_q_type, nullable=False),
    ]
)

ACTIONS_TABLE = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("action", pa.uint8(), nullable=False),
        pa.field("surface", pa.int8(), nullable=False),
    ]
)

IMPRESSIONS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("surface", pa.int8(), nullable=False),
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
    ]
)

REQUESTS = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("surface", pa.int8(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
    ]
    + [pa.field(c, pa.uint8(), nullable=False) for c in LABEL_COLUMNS]
)

#: World metadata (``world.json``) every reader may rely on, with the defaults used when a
#: world does not state them:
#: - ``min_ts``: no event is older (epoch ms); validation's lower time bound. Public
#:   data sets go back further than a live service's logs: state it at import.
#: - ``label_window_ms``: the label window. An action belongs to the most recent impression
#:   of its item to its user at or before it, when that is at most this long before the
#:   action (:mod:`transact.data.labels`); labels are attached, and validated, by that rule.
DEFAULT_MIN_TS_MS: int = 1_262_304_000_000  # 2010-01-01 UTC
DEFAULT_LABEL_WINDOW_MS: int = 3_600_000  # one hour

#: Table name -> schema; file name is ``<name>.parquet`` (or a directory of parts).
TABLES: dict[str, pa.Schema] = {
    "items": ITEMS,
    "actions": ACTIONS_TABLE,
    "impressions": IMPRESSIONS,
    "requests": REQUESTS,
}
