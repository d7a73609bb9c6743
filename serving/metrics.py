"""The service's Prometheus metrics (``/metrics``, besides BentoML's own).

Created once per process, when this module is first imported: they live apart from the
service module so that BentoML re-importing that one (``importlib.reload`` in its reload
modes) never registers a collector twice -- without reaching into prometheus_client's
registry. A worker imports this after BentoML has set ``PROMETHEUS_MULTIPROC_DIR``
(multiprocess mode: every worker's values on one ``/metrics``).
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("transact_requests", "/rank responses by status code", labelnames=["code"])
CANDIDATES = Counter("transact_candidates", "candidates ranked")
LOGGED = Counter("transact_logged_rows",
                 "served rows made durable in the NN-feature log (write-ahead segment; before the response)")
RECOVERED = Counter("transact_log_recovered_rows",
                    "served rows of a stopped process recovered from its write-ahead segments at start-up")
DROPPED = Counter("transact_log_dropped_rows", "served rows NOT logged (queue full or write error)")
BATCH = Histogram("transact_batch_candidates", "candidates per model batch",
                  buckets=(1, 16, 64, 128, 256, 512, 1024, 2048, 4096))
STAGE = Histogram("transact_stage_seconds", "seconds per batch and stage", labelnames=["stage"],
                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
