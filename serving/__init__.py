"""The ranking service (docs/design.md §8, paper §3.4).

- :mod:`~transact.serving.service`: the BentoML service, ``POST /rank`` (+ /livez, /readyz, /metrics)
- :mod:`~transact.serving.schema`: the strict request / response schema
- :mod:`~transact.serving.ranker`: one de-duplicated batch per micro-batch -> S_all -> model -> S
- :mod:`~transact.serving.batching`: adaptive cross-request micro-batching
- :mod:`~transact.serving.served_log`: served NN-feature log (+ ``attach_labels``)
- :mod:`~transact.serving.device`: pinned staging arena, CUDA-graph forward
- :mod:`~transact.serving.sources`: where sequences come from (EventStore, Feast online store)
- :mod:`~transact.serving.guard`: API key, body limit, content type, 4xx format, the served /docs.json
- :mod:`~transact.serving.metrics`: the service's Prometheus metrics
- :mod:`~transact.serving.packaging`: model store packaging, bento build, this process's BentoML stores
- :mod:`~transact.serving.launch`: start / stop a real server as a child process (CLI, tests, benchmark)
- :mod:`~transact.bench.serving`: ``transact bench serving``
- :mod:`~transact.serving.settings`: the ``TRANSACT_*`` settings, one table
"""
