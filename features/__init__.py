"""The feature contract: one definition of what the model sees, shared by training and serving.

- ``config``: :class:`~transact.features.config.FeatureConfig` (sequence lengths, the |S_all| split).
- ``event_order``: the one total order of events (ties broken the same way everywhere).
- ``sequences``: point-in-time lifelong / realtime / impression sequences (``EventStore``).
- ``nn_features``: NN selection and the S_all layout (paper Eq. 2-3), through ``kernels.dispatch``.
- ``nn_logging``: the NN-feature logging pass (one row per request x candidate).
- ``feast/``: the same sequences in a Feast feature store (offline sources, online reads).

It sits below ``model``: the network consumes the contract, Feast stores it, validation checks it,
serving computes it; none of those needs the network.
"""
