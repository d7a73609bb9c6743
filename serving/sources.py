"""Where the service reads a user's three sequences and the candidates' embeddings.

A :class:`SequenceSource` has the two methods of
:class:`transact.features.sequences.EventStore`, so the EventStore (a world folder's
parquet events, point-in-time) plugs in as it is; the Feast online store plugs in
through :class:`FeastSource` (an adapter over
``transact.features.feast.online.OnlineSequences``). Unknown users get empty sequences (cold start), never an error; unknown items
raise ``ValueError`` (the service answers 400 and asks for ``item_embeddings``).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from transact.features.config import FeatureConfig
from transact.features.nn_features import JaggedSequences


@runtime_checkable
class SequenceSource(Protocol):
    def sequences(self, user_ids: np.ndarray, ts: np.ndarray
                  ) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
        """(S_LL, S_RT, S_imp) of requests (user_ids[i], ts[i]), newest first, cut before ts[i]."""
        ...

    def item_emb_q_of(self, item_ids: np.ndarray) -> np.ndarray:
        """int8 [N, 32] embeddings; ValueError naming unknown ids."""
        ...


class EmptySource:
    """Every user is cold and there is no item table: requests must carry item_embeddings."""

    def sequences(self, user_ids: np.ndarray, ts: np.ndarray):
        n = len(user_ids)
        return JaggedSequences.empty(n), JaggedSequences.empty(n), JaggedSequences.empty(n)

    def item_emb_q_of(self, item_ids: np.ndarray) -> np.ndarray:
        raise ValueError("this service has no item table (no TRANSACT_WORLD / TRANSACT_FEAST_REPO): "
                         "send item_embeddings with the item ids")


class FeastSource:
    """The Feast online store as a :class:`SequenceSource`.

    Wraps :class:`transact.features.feast.online.OnlineSequences` (one Feast
    ``get_online_features`` call per batch for the sequences, one for the items). The
    online store holds each user's *current* state (the last lifelong materialisation and
    every pushed realtime action / impression), so ``ts`` does not cut the sequences
    here: serving is "now". ``request_ts`` still sets the token ages (``age_s``).
    """

    def __init__(self, online) -> None:
        self._online = online

    @classmethod
    def from_repo(cls, repo: str, cfg: FeatureConfig) -> FeastSource:
        from transact.features.feast.online import OnlineSequences

        return cls(OnlineSequences(repo, cfg))

    def sequences(self, user_ids: np.ndarray, ts: np.ndarray):
        ll, rt, imp = self._online.sequences([int(u) for u in user_ids])
        for name, s in (("ll", ll), ("rt", rt), ("imp", imp)):
            if s.num_users != len(user_ids):
                raise RuntimeError(f"Feast source returned {s.num_users} {name} sequences for "
                                   f"{len(user_ids)} requests")
        return ll, rt, imp

    def item_emb_q_of(self, item_ids: np.ndarray) -> np.ndarray:
        out = self._online.item_emb_q([int(i) for i in item_ids], unknown="raise")
        return np.asarray(out).astype(np.int8, copy=False)


def open_source(world: str | None, feast_repo: str | None, cfg: FeatureConfig) -> SequenceSource:
    """The source named by the settings: a world folder, a Feast repo, or none (cold only)."""
    if world and feast_repo:
        raise ValueError("set TRANSACT_WORLD or TRANSACT_FEAST_REPO, not both")
    if world:
        from transact.features.sequences import EventStore

        return EventStore.from_dir(world, cfg)
    if feast_repo:
        return FeastSource.from_repo(feast_repo, cfg)
    return EmptySource()
