"""Drift monitoring with Evidently (docs/design.md §10): served logs vs the training reference.

- :mod:`~transact.monitoring.features`  NN-feature rows / served logs -> flat monitoring
  frame (scalar features, expanded embeddings, predictions);
- :mod:`~transact.monitoring.drift`     the Evidently report of a window and the drift rule
  (:class:`~transact.monitoring.drift.DriftRule`, documented there);
- :mod:`~transact.monitoring.verdict`   one verdict per window: the monitor's decision, its rule
  and its numbers first in the report and the dashboard, Evidently's own verdict labelled;
- :mod:`~transact.monitoring.trigger`   retrain or not (cooldown), the JSONL decision log,
  local pipeline run or cluster submission;
- :mod:`~transact.monitoring.monitor`   the monitoring job (``transact monitor``);
- :mod:`~transact.monitoring.dashboard` the Evidently UI workspace, project, panels, and
  ``evidently ui`` (``transact dashboard``);
- :mod:`~transact.monitoring.replay`    served logs without HTTP (the Ranker replaying a
  simulated world, with or without injected drift);
- :mod:`~transact.bench.drift`     ``transact bench drift``.

Modules import Evidently lazily: importing this package is cheap.
"""
