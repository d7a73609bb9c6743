"""Feast: the feature store side of the contract (:mod:`transact.features`): offline sources, apply, materialise, push, online and
point-in-time reads of the three user sequences (docs/design.md §2.5, §3.4, §8). The Feast
definitions themselves live in ``feature_repo/definitions.py``; import each name from the
module that owns it:

- ``store``: view / feature / source names and schemas, repo set-up, ``feast apply``, the offline manifest.
- ``codec``: the token-blob codec (one sequence <-> one Feast ``Bytes`` value).
- ``offline``: the offline writer (a world's events -> the parquet offline sources).
- ``materialize``: materialisation of the offline sources into the online store.
- ``engine``: what plain ``feast materialize[-incremental]`` needs (start watermark, start check).
- ``push``: streaming updates (pushes) of the realtime and impression features.
- ``online``: online reads for serving (:class:`~transact.features.feast.online.OnlineSequences`).
- ``historical``: point-in-time reads for training (:class:`~transact.features.feast.historical.HistoricalSequences`).

The benchmark (``transact bench features``) is :mod:`transact.bench.features`.
"""
