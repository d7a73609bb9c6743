"""transact: TransAct V2 as MLOps software (the CLI lives in :mod:`transact.cli`).

``__version__`` is read from the installed distribution's metadata: the one version
lives in ``pyproject.toml`` (the KFP base image tag and ``transact --version`` read it).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("transact-v2")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
