"""Putting a trained model into the BentoML model store, and building the bento.

:func:`package_model` copies the model folder's two files -- ``config.json`` and
``model.safetensors`` (weights as safetensors, config as JSON: no pickle anywhere) --
into a BentoML model ``transact-ranker:<version>``. The version is the first 16 hex
digits of the SHA-256 of those two files, so packaging the same weights twice gives
the same tag and stores nothing new (the pipeline's package step relies on it). The
model is loaded once before it is stored (strict state-dict load), so a broken
checkpoint never reaches the store. Training state (``train_state/``) is not copied.

:func:`build_bento` runs ``bentoml build`` on ``serving/bentofile.yaml`` with the
repository as build context (offline: ``lock_packages: false``).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from transact.serving.settings import DEFAULT_MODEL_NAME

FILES = ("config.json", "model.safetensors")


def model_digest(model_dir: str | Path) -> str:
    h = hashlib.sha256()
    for name in FILES:
        p = Path(model_dir) / name
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (a model folder holds {', '.join(FILES)})")
        h.update(name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def package_model(model_dir: str | Path, name: str = DEFAULT_MODEL_NAME, labels: dict | None = None) -> dict:
    """Stores the model folder in the BentoML model store; idempotent (same files, same tag).

    Returns {"tag", "name", "version", "path", "created", "sha256", "heads", "model"}.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    from transact.model.checkpoint import load_model, read_config, weights_step

    model_dir = Path(model_dir)
    digest = model_digest(model_dir)
    cfg = read_config(model_dir)
    load_model(model_dir, "cpu")  # refuse a checkpoint that does not load
    version = digest[:16]
    tag = f"{name}:{version}"
    info = {"name": name, "version": version, "sha256": digest, "heads": list(cfg["heads"]),
            "model": cfg["model_config"].get("name", "")}
    try:
        stored = bentoml.models.get(tag)
        return {"tag": str(stored.tag), "path": stored.path, "created": False, **info}
    except NotFound:
        pass
    metadata = {"sha256": digest, "format": cfg["format"], "heads": list(cfg["heads"]),
                "model": info["model"], "step": weights_step(model_dir), "source": str(model_dir.resolve()),
                "feature_config": cfg["feature_config"]}
    with bentoml.models.create(tag, labels={"project": "transact-v2", **(labels or {})},
                               metadata=metadata) as m:
        for f in FILES:
            shutil.copy2(model_dir / f, Path(m.path) / f)
    stored = bentoml.models.get(tag)
    return {"tag": str(stored.tag), "path": stored.path, "created": True, **info}


def stored_model_dir(tag: str = f"{DEFAULT_MODEL_NAME}:latest") -> Path:
    """The folder (config.json + model.safetensors) of a stored model."""
    import bentoml

    return Path(bentoml.models.get(tag).path)


def bentofile_path() -> Path:
    return Path(__file__).with_name("bentofile.yaml")


def build_bento(model_tag: str | None = None, build_ctx: str | Path | None = None, version: str | None = None) -> str:
    """``bentoml build -f serving/bentofile.yaml <repo>``; returns the bento tag.

    ``model_tag`` (default: ``TRANSACT_MODEL_TAG`` or transact-ranker:latest) is the stored
    model bundled into the bento.
    """
    import os

    from bentoml.bentos import build_bentofile

    ctx = Path(build_ctx) if build_ctx else Path(__file__).resolve().parents[1]
    old = os.environ.get("TRANSACT_MODEL_TAG")
    if model_tag:
        os.environ["TRANSACT_MODEL_TAG"] = model_tag
    try:
        bento = build_bentofile(str(bentofile_path()), build_ctx=str(ctx), version=version, reload=True)
    finally:
        if model_tag:
            if old is None:
                os.environ.pop("TRANSACT_MODEL_TAG", None)
            else:
                os.environ["TRANSACT_MODEL_TAG"] = old
    return str(bento.tag)


class bentoml_home:
    """Context manager: use ``path`` as BENTOML_HOME in this process and its children.

    BentoML resolves its home once per process; this points the already-created stores
    at ``path`` too (tests and the benchmark keep their models out of ~/bentoml).
    """

    _NAMES = ("bentoml_home", "model_store_dir", "bento_store_dir", "tmp_bento_store_dir", "env_store_dir",
              "model_store", "bento_store", "tmp_bento_store")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        import os

        from bentoml._internal.bento import BentoStore
        from bentoml._internal.configuration.containers import BentoMLContainer
        from bentoml._internal.models import ModelStore

        home = self.path
        for sub in ("bentos", "models", "envs", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        self._env = os.environ.get("BENTOML_HOME")
        os.environ["BENTOML_HOME"] = str(home)
        c = BentoMLContainer
        self._saved = {n: getattr(c, n)._override for n in self._NAMES}
        c.bentoml_home.set(str(home))
        c.model_store_dir.set(str(home / "models"))
        c.bento_store_dir.set(str(home / "bentos"))
        c.tmp_bento_store_dir.set(str(home / "tmp"))
        c.env_store_dir.set(str(home / "envs"))
        c.model_store.set(ModelStore(str(home / "models")))
        c.bento_store.set(BentoStore(str(home / "bentos")))
        c.tmp_bento_store.set(BentoStore(str(home / "tmp")))
        return home

    def __exit__(self, *exc) -> None:
        import os

        from bentoml._internal.configuration.containers import BentoMLContainer

        for n, v in self._saved.items():
            getattr(BentoMLContainer, n)._override = v
        if self._env is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = self._env
