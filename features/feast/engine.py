"""Plain ``feast materialize`` / ``feast materialize-incremental`` on this repo: the start
watermark and the guard that make them fill the online store as
``transact features materialize`` does, or refuse.

Why: the views have ``ttl=0`` ("no age limit": a user's state at t is their last row
before t, however old -- rows are only written when a sequence changes). Feast 0.67's
``materialize_incremental`` starts a never-materialised ttl=0 view at *now - 52 weeks*
(``feature_store.py``, "the start date will be set to 1 year before the current time"),
reads only the rows of ``[start, end]`` and records ``end`` as done: older worlds leave
every online table empty, and later runs never go back. A start after the first offline
row has the same effect for ``feast materialize <start> <end>`` on an empty store.

- :func:`mark_start` (run by ``transact features apply``) records an empty
  materialisation interval at the epoch, before every offline row (items are at the epoch,
  users at ``since`` or later); Feast's incremental run then starts there.
- :class:`TransactLocalEngine` (``batch_engine`` of ``feature_store.yaml``) is Feast's
  local engine, refusing a ttl=0 view whose start is after what the online store already
  holds (the view's last materialised end, else the epoch): the rows before the start would
  be missing.
"""
from __future__ import annotations

from typing import Literal

from feast.infra.compute_engines.local.compute import LocalComputeEngine, LocalComputeEngineConfig
from feast.utils import make_tzaware

from transact.features.feast.store import EPOCH, as_store

ENGINE = "transact.features.feast.engine.TransactLocalEngine"


def mark_start(store_or_repo) -> list[str]:
    """Records ``[epoch, epoch]`` as materialised for each online view never materialised, so
    ``feast materialize-incremental`` reads from the epoch; returns the views marked."""
    store = as_store(store_or_repo)
    marked = []
    for fv in store.list_feature_views():
        if fv.online and not fv.materialization_intervals:
            store.registry.apply_materialization(fv, store.project, EPOCH, EPOCH, commit=True)
            marked.append(fv.name)
    return marked


def check_start(feature_view, start) -> None:
    """Refuses ``[start, ...]`` for a ttl=0 view when the online store does not hold the
    state at ``start`` (rows before it would never reach the online store)."""
    if feature_view.ttl:
        return  # Feast's own rule: rows older than the ttl are expired anyway
    held, start = feature_view.most_recent_end_time or EPOCH, make_tzaware(start)
    if start > held:
        raise ValueError(
            f"{feature_view.name}: materialising from {start.isoformat()} would leave out its rows "
            f"before then (ttl=0, online store holds up to {held.isoformat()}): run `transact features "
            f"materialize` (or `feast materialize 1970-01-01T00:00:00 <end>`)")


class TransactLocalEngineConfig(LocalComputeEngineConfig):
    """Config of :class:`TransactLocalEngine` (Feast looks it up by the engine's name + "Config")."""

    type: Literal[ENGINE] = ENGINE  # type: ignore[valid-type]


class TransactLocalEngine(LocalComputeEngine):
    """Feast's local materialisation engine, with :func:`check_start` before each view."""

    def materialize(self, registry, tasks, **kwargs):
        for task in tasks if isinstance(tasks, list) else [tasks]:
            check_start(task.feature_view, task.start_time)
        return super().materialize(registry, tasks, **kwargs)
