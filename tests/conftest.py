"""Test session set-up: the environment every test runs in (shared helpers live in
``tests/helpers.py``; ``pythonpath`` in pyproject.toml puts it on the path)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run in Triton's CPU interpreter
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")
