"""Requests in one total order, and the integrity every reader of them relies on.

A request is one user's ranking call at one instant: its rows share ``request_id``,
``user_id`` and ``ts``. Readers (import, NN-feature logging, the served-log join) take
requests through :func:`sorted_requests`, so their output never depends on row order.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from transact.data.io import SchemaError


def sorted_requests(requests: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Sorts requests by (ts, request_id, position, item_id) -- a total order on what
    validation accepts, whatever the input's row order; returns it and each request's first row.

    Raises SchemaError when a request_id mixes users or timestamps: a request is one
    user's ranking call at one instant.
    """
    requests = requests.sort_by([("ts", "ascending"), ("request_id", "ascending"),
                                 ("position", "ascending"), ("item_id", "ascending")])
    rid = requests.column("request_id").to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], rid[1:] != rid[:-1]])) if len(rid) else np.zeros(0, int)
    if len(np.unique(rid)) != len(starts):
        raise SchemaError("requests: a request_id appears at more than one ts (rows of one request "
                          "must share ts)")
    for col in ("user_id", "ts"):
        v = requests.column(col).to_numpy()
        first = np.repeat(v[starts], np.diff(np.append(starts, len(v))))
        bad = np.flatnonzero(v != first)
        if len(bad):
            raise SchemaError(f"requests: request_id {int(rid[bad[0]])} has rows with different {col}")
    return requests, starts
