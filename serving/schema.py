"""The public request / response of ``POST /rank`` (pydantic, strict).

The JSON body is an object keyed by these field names (BentoML passes each field to the
API as a keyword). Validation is *strict*: JSON types must match exactly (``"5"`` or
``5.0`` is not an id, ``true`` is not a number), unknown fields are rejected (a typo such
as ``item_id`` is an error, not silently ignored), floats must be finite (``NaN`` and
``Infinity`` are rejected; score weights lie within +-1e6), ids are non-negative int64,
and embeddings have exactly 32 values. ``request_ts`` must lie near the server clock
(``TRANSACT_MAX_CLOCK_SKEW_S``, checked by the service: a bound around a moving clock is no
static minimum/maximum, so the served document states it as ``x-max-clock-skew-s``, see
:func:`transact.serving.guard.served_openapi`). Every failure is an HTTP 400 whose message
names the field (:mod:`transact.serving.guard` formats it).

Example::

    {"user_id": 42, "item_ids": [3, 10, 17], "surface": "homefeed"}
    {"user_id": 42, "item_ids": [3, 10], "item_embeddings": [[0.01, ...32], [...]],
     "request_id": 7, "score_weights": {"repin": 1, "hide": -2}}
    {"user_id": 42, "item_ids": [3], "request_ts": 1700000000000}   # a replay (skew check off)
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from transact.data.schema import EMB_DIM, SURFACES
from transact.serving.settings import read_setting

MAX_ID: int = 2**63 - 1
#: Request timestamps: ms since the epoch, up to the year 9999.
MAX_TS: int = 253_402_300_799_999
#: Per-request score weights: at most this many heads, each within +-MAX_WEIGHT (larger
#: weights mean nothing for a ranking and would overflow S = sum_h w_h f_h to infinity).
MAX_WEIGHTS: int = 16
MAX_WEIGHT: float = 1e6

#: Candidates per request (TRANSACT_MAX_CANDIDATES), read when this module is imported: the
#: request schema -- and so the OpenAPI document -- states it, and BentoML builds both when the
#: service class is defined. A server process is started with its settings in its
#: environment (:mod:`transact.serving.launch`), so its import reads its own value.
MAX_CANDIDATES: int = read_setting("max_candidates", fallback=True)

Id = Annotated[int, Field(ge=0, le=MAX_ID)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Weight = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
Embedding = Annotated[list[Finite], Field(min_length=EMB_DIM, max_length=EMB_DIM)]
Surface = Literal[SURFACES]  # type: ignore[valid-type]


class RankRequest(BaseModel):
    """One ranking request: one user, N candidates."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: Id = Field(description="The user; unknown users are ranked cold-start (empty sequences).")
    item_ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_CANDIDATES)] = Field(
        description=f"Candidate item ids (1..{MAX_CANDIDATES}); their embeddings come from the item table "
                    "unless item_embeddings is given.")
    item_embeddings: Annotated[list[Embedding], Field(min_length=1, max_length=MAX_CANDIDATES)] | None = Field(
        default=None,
        description=f"Raw {EMB_DIM}-d content embeddings, one per item id, in the same order "
                    "(quantised to int8 like the item table); for items the table does not know.")
    surface: Surface = Field(default="homefeed", description="Surface of the request (context feature).")
    request_ts: Annotated[int, Field(ge=0, le=MAX_TS)] | None = Field(
        default=None, description="Request time, ms since the epoch (default: the server clock). "
                                  "Sequences are cut point-in-time before it. A client time further than "
                                  "TRANSACT_MAX_CLOCK_SKEW_S (default 300 s) from the server clock is a 400, "
                                  "unless the service trusts client times (=off, for replays).")
    request_id: Id | None = Field(
        default=None, description="Caller's request id, logged with every served row so labels can be "
                                  "attached later (default: generated).")
    score_weights: Annotated[dict[str, Weight], Field(max_length=MAX_WEIGHTS)] | None = Field(
        default=None, description="Per-request head weights w_h of S = sum_h w_h f_h (default: the "
                                  "service's); heads not named get weight 0.")
    top_k: Annotated[int, Field(ge=1, le=MAX_CANDIDATES)] | None = Field(
        default=None, description="Return only the best top_k candidates (default: all).")
    raw_probs: bool = Field(
        default=False, description="Also return each head's raw output (the plain sigmoid of its logit, "
                                   "trained with label weights: inflated odds, not a probability).")

    @model_validator(mode="after")
    def _same_length(self) -> RankRequest:
        if self.item_embeddings is not None and len(self.item_embeddings) != len(self.item_ids):
            raise ValueError(f"item_embeddings: {len(self.item_embeddings)} rows for "
                             f"{len(self.item_ids)} item_ids (need one per item id)")
        return self


class RankedItem(BaseModel):
    item_id: int
    position: int = Field(description="Index of the item in the request's item_ids.")
    score: float = Field(description="S = sum_h w_h f_h.")
    probs: dict[str, float] = Field(description="Per-head probability f_h, calibrated (the model's Platt "
                                                "scaling, fitted on held-out rows after training).")
    raw_probs: dict[str, float] | None = Field(
        default=None, description="Per-head raw output, when the request set raw_probs.")


class RankResponse(BaseModel):
    request_id: int
    user_id: int
    model_version: str
    served_ts: int = Field(description="Server time the request was served, ms since the epoch.")
    request_ts: int
    cold_start: bool = Field(description="True when the user had no sequence tokens (unknown or new user).")
    heads: list[str]
    score_weights: dict[str, float]
    ranked: list[RankedItem] = Field(description="Candidates, best first (ties: request order).")
