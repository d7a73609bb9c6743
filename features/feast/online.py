"""Online reads for serving: users' three sequences and candidates' embeddings from the
online store (:class:`OnlineSequences`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np

from transact.data import schema as S
from transact.data.io import SchemaError
from transact.features.config import FeatureConfig
from transact.features.feast.codec import decode_tokens, derive_imp, empty_tokens
from transact.features.feast.store import (
    IMP_VIEW,
    ITEM_FEATURE,
    ITEM_KEY,
    ITEM_SERVICE,
    LL_VIEW,
    RT_VIEW,
    SERVICE,
    USER_KEY,
    VIEW_FEATURES,
    as_store,
)
from transact.features.nn_features import JaggedSequences

#: user or item ids: a list, or an int array (what the readers of parquet columns hold)
Ids: TypeAlias = Sequence[int] | np.ndarray


class OnlineSequences:
    """Reads users' three sequences and candidates' embeddings from the online store.

    Built once per process (resolves the feature service); :meth:`sequences` is what the
    ranking service calls per request. ``cfg`` caps the sequences (its caps may be
    smaller than those the store was built with).
    """

    def __init__(self, store_or_repo, cfg: FeatureConfig | None = None):
        self.store = as_store(store_or_repo)
        self.cfg = cfg or FeatureConfig()
        self.service = self.store.get_feature_service(SERVICE)
        self.item_service = self.store.get_feature_service(ITEM_SERVICE)

    def raw(self, user_ids: Ids, views: Sequence[str] | None = None) -> dict[str, list]:
        """Feature name -> one value per user (None where the user has no row); all of the
        ``ranking_v2`` service, or only the given user views."""
        rows = [{USER_KEY: int(u)} for u in user_ids]
        features = self.service if views is None else \
            [f"{v}:{name}" for v in views for name in VIEW_FEATURES[v]]
        return self.store.get_online_features(features=features, entity_rows=rows).to_dict()

    def sequences(self, user_ids: Ids) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
        """(S_LL, S_RT, S_imp) of each user, newest first; unknown users get empty sequences."""
        cfg = self.cfg
        d = self.raw(user_ids)
        ll = decode_tokens(d[VIEW_FEATURES[LL_VIEW][0]], cap=cfg.ll_cap)
        rt = decode_tokens(d[VIEW_FEATURES[RT_VIEW][0]], cap=cfg.rt_cap)
        win = decode_tokens(d[VIEW_FEATURES[IMP_VIEW][0]])
        imp = derive_imp(win, cfg.imp_cap) if win.engaged is not None else empty_tokens(len(user_ids))
        return ll.to_jagged(), rt.to_jagged(), imp.to_jagged()

    def item_emb_q(self, item_ids: Ids, unknown: str = "raise") -> np.ndarray:
        """int8 [N, D] embeddings of candidates. ``unknown``: "raise" (SchemaError) or "zero"."""
        rows = [{ITEM_KEY: int(i)} for i in item_ids]
        vals = self.store.get_online_features(features=self.item_service, entity_rows=rows).to_dict()[ITEM_FEATURE]
        missing = [int(i) for i, v in zip(item_ids, vals) if v is None]
        if missing and unknown == "raise":
            raise SchemaError(f"{len(missing)} item ids are not in the online store, e.g. {missing[:5]}")
        out = np.zeros((len(vals), S.EMB_DIM), dtype=np.int8)
        for i, v in enumerate(vals):
            if v is not None:
                out[i] = np.frombuffer(v, dtype=np.int8)
        return out


def online_sequences(store, user_ids: Ids, cfg: FeatureConfig | None = None
                     ) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
    """(S_LL, S_RT, S_imp) of ``user_ids`` from the online store (cold users: empty)."""
    return OnlineSequences(store, cfg).sequences(user_ids)


def online_item_emb_q(store, item_ids: Ids, unknown: str = "raise") -> np.ndarray:
    """int8 [N, D] candidate embeddings from the online store."""
    return OnlineSequences(store).item_emb_q(item_ids, unknown)
