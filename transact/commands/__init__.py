"""CLI command modules, one per area; each defines ``register(app, bench_app)``."""
