"""Schemathesis hooks for ``POST /rank``: positive cases grounded in the served world.

A schema cannot say which item ids the item table holds, which heads the model has, or
what the server clock reads: a schema-valid body with a random item id, head name or
``request_ts`` is a (documented) 400, and ``positive_data_acceptance`` would report it.
Every *positive* case is therefore grounded before it is sent -- known item ids, known
heads, ``request_ts`` at the server clock, one embedding row per id -- and must then be
accepted (2xx); negative cases are sent as generated and must be refused.

Use: ``SCHEMATHESIS_HOOKS=tests/serving/schemathesis_hooks.py TRANSACT_FUZZ_GROUND=<ground.json>
schemathesis run <url>/docs.json --checks all`` from outside the repository (its
``schemathesis.toml`` lets positive cases of /rank get a 400; the grounded run needs no such
allowance), where ground.json is ``{"item_ids": [...], "heads": [...]}``. Without hooks,
from the repository, the plain command passes too (``schemathesis.toml``).
"""
from __future__ import annotations

import json
import os
import time

import schemathesis

#: The environment variable naming the ground file.
GROUND_ENV = "TRANSACT_FUZZ_GROUND"


def ground_body(body: dict, item_ids: list[int], heads: list[str], now_ms: int) -> dict:
    """A schema-valid body made semantically valid (the values the schema cannot know)."""
    body = dict(body)
    body["item_ids"] = [item_ids[i % len(item_ids)] for i in body["item_ids"]]
    emb = body.get("item_embeddings")
    if emb is not None and len(emb) != len(body["item_ids"]):
        del body["item_embeddings"]
    if body.get("score_weights") is not None:
        body["score_weights"] = dict(zip(heads, body["score_weights"].values()))
    if body.get("request_ts") is not None:
        body["request_ts"] = now_ms
    return body


def before_call(context, case, kwargs):
    """Grounds positive ``/rank`` bodies; everything else goes out as generated."""
    meta = case.meta
    if (meta is None or not meta.generation.mode.is_positive or case.path != "/rank"
            or not isinstance(case.body, dict) or not isinstance(case.body.get("item_ids"), list)):
        return
    case.body = ground_body(case.body, _GROUND["item_ids"], _GROUND["heads"], int(time.time() * 1000))


# Registered only where a ground file is named (the schemathesis run): importing this module
# for ground_body, as the tests do, must not change how other schemathesis tests send cases.
if os.environ.get(GROUND_ENV):
    with open(os.environ[GROUND_ENV]) as f:
        _GROUND = json.load(f)
    schemathesis.hook(before_call)
