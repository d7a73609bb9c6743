"""The checks' parameters: the bounds and defaults every suite is built from
(:class:`Params`, :class:`Tolerance`), "now", and where each value comes from (an
explicit argument, then the world's ``world.json``, then the default)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from transact.data import schema as S

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
#: Share of request rows allowed to own an engagement that no label of theirs counts
#: (ownership: :mod:`transact.data.labels`, so a re-shown item's engagement is owned by
#: the later showing only and clean logs miss none; the slack is for late-logged labels).
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
_ID_COLUMNS = ("user_id", "item_id", "request_id")


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


def now_ms(now: Any = None) -> int:
    """``now`` as epoch milliseconds: None (wall clock), datetime (naive = UTC), int/float
    epoch **ms**, or an ISO-8601 string / a string of digits (ms)."""
    if now is None:
        return int(time.time() * 1000)
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
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
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y%m%dT%H%M%SZ")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def world_meta(world: Path) -> dict:
    """``world.json`` of a world folder ({} when absent or unreadable: the defaults apply)."""
    try:
        meta = json.loads((Path(world) / "world.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _make_params(now, min_ts, max_candidates, max_duplicate_rate, tolerance, meta: dict | None = None,
                 label_window_ms: int | None = None, no_meta: str = "") -> Params:
    """The checks' parameters: an explicit argument wins, then the world's ``world.json``
    (``min_ts``, ``label_window_ms``, ``config.chunk_size``), then the defaults. ``no_meta``
    says why there is no world.json (e.g. "no world.json in the batch"): every default's
    source then names it, so a message never hides that the file was missing."""
    meta = meta or {}
    why = f"; {no_meta}" if no_meta else ""
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
        min_ts, min_ts_source = MIN_TS_MS, f"the default (2010-01-01{why})"
        if isinstance(meta.get("min_ts"), int):
            min_ts, min_ts_source = meta["min_ts"], "world.json"
    window_source = "--label-window-ms"
    if label_window_ms is None:
        label_window_ms, window_source = S.DEFAULT_LABEL_WINDOW_MS, f"the default (one hour{why})"
        if isinstance(meta.get("label_window_ms"), int):
            label_window_ms, window_source = meta["label_window_ms"], "world.json"
    if label_window_ms <= 0:
        raise ValueError(f"label_window_ms must be > 0, got {label_window_ms}")
    return Params(now_ms=now_ms(now), min_ts_ms=int(min_ts), max_candidates=int(max_candidates),
                  max_duplicate_rate=float(max_duplicate_rate), tolerance=tolerance or Tolerance(),
                  min_ts_source=min_ts_source, label_window_ms=int(label_window_ms),
                  label_window_source=window_source)
