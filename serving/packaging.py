"""Putting a trained model into the BentoML model store, and building the bento.

:func:`package_model` copies the model folder's two files -- ``config.json`` and
``model.safetensors`` (weights as safetensors, config as JSON: no pickle anywhere) --
into a BentoML model ``transact-ranker:<version>``. The version is the first 16 hex
digits of the SHA-256 of those two files, so packaging the same weights twice gives
the same tag and stores nothing new (the pipeline's package step relies on it). The
model is loaded once before it is stored (strict state-dict load), so a broken
checkpoint never reaches the store. Training state (``train_state/``) is not copied.

:func:`build_bento` runs ``bentoml build`` on ``serving/bentofile.yaml`` over the ``transact``
package laid out as installed (offline: ``lock_packages: false``), carrying the model it is
given. :func:`local_stores` points this process's BentoML stores at a folder (tests, the
benchmark) without touching the environment.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from transact.data import storage
from transact.serving.settings import DEFAULT_MODEL_NAME


def package_model(model_dir: str | Path, name: str = DEFAULT_MODEL_NAME, labels: dict | None = None) -> dict:
    """Stores the model folder in the BentoML model store; idempotent (same files, same tag).

    Returns {"tag", "name", "version", "path", "created", "sha256", "heads", "model"}.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    from transact.model.checkpoint import MODEL_FILES, load_model, model_digest, read_config, weights_step

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
        for f in MODEL_FILES:
            shutil.copy2(model_dir / f, Path(m.path) / f)
    stored = bentoml.models.get(tag)
    return {"tag": str(stored.tag), "path": stored.path, "created": True, **info}


#: where in a model registry (:mod:`transact.model.registry`) the exported BentoML models live
EXPORTS = "bentoml"
_EXPORT_FILE = "model.bentomodel"


def export_location(registry: str, tag: str) -> str:
    name, version = tag.split(":", 1)
    return storage.join(registry, EXPORTS, f"{name}-{version}")


def export_model(tag: str, registry: str) -> str:
    """``bentoml.models.export_model`` of the stored model ``tag`` into the registry, as a
    published folder (the archive, then its manifest): a fresh machine imports it from there
    (:func:`import_champion`). Idempotent: a tag already exported is left as it is."""
    import tempfile

    import bentoml

    where = export_location(registry, tag)
    if storage.read_manifest(where, missing_ok=True) is None:
        with tempfile.TemporaryDirectory(prefix="transact-export-") as tmp:
            bentoml.models.export_model(tag, str(Path(tmp) / _EXPORT_FILE))
            storage.publish_tree(tmp, where, meta={"tag": tag})
    return where


def import_champion(registry: str, name: str = DEFAULT_MODEL_NAME) -> str:
    """The registry's champion in this machine's BentoML model store; returns its tag.

    Imports the exported BentoML model when the package step exported one, else packages the
    champion's model files fetched from the registry (the same tag either way: both are named
    by the model digest)."""
    import tempfile

    import bentoml
    from bentoml.exceptions import NotFound

    from transact.model.registry import Registry

    reg = Registry(registry)
    champion = reg.champion()
    if champion is None:
        raise ValueError(f"{registry}: no champion yet (run the training pipeline with this storage root)")
    tag = f"{name}:{champion.model_id.rsplit('-', 1)[-1]}"
    try:
        bentoml.models.get(tag)
        return tag
    except NotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="transact-import-") as tmp:
        where = export_location(registry, tag)
        if storage.read_manifest(where, missing_ok=True) is not None:
            storage.fetch_tree(where, Path(tmp) / "export")
            return str(bentoml.models.import_model(str(Path(tmp) / "export" / _EXPORT_FILE)).tag)
        model_dir = reg.fetch_model(champion.model_id, Path(tmp) / "model")
        return package_model(model_dir, name=name)["tag"]


def stored_model_dir(tag: str = f"{DEFAULT_MODEL_NAME}:latest") -> Path:
    """The folder (config.json + model.safetensors) of a stored model."""
    import bentoml

    return Path(bentoml.models.get(tag).path)


def bentofile_path() -> Path:
    return Path(__file__).with_name("bentofile.yaml")


def build_bento(model_tag: str | None = None, build_ctx: str | Path | None = None, version: str | None = None) -> str:
    """``bentoml build`` of ``serving/bentofile.yaml``, carrying ``model_tag``; returns the bento tag.

    ``model_tag`` (default: the bentofile's ``models``, transact-ranker:latest) is the stored
    model bundled into the bento: the bentofile is built through a copy whose ``models``
    names it (BentoML's own way to say which models a bento carries; the service looks its
    model up by tag when it starts). The bento's source is the ``transact`` package laid out as
    installed (:func:`package_tree`), from a source checkout and an installed image alike: a
    container made from the bento (``bentoml containerize``) imports the project from it alone.
    ``build_ctx``: a folder already holding such a ``transact/`` tree.
    """
    import tempfile

    import yaml
    from bentoml.bentos import build_bentofile

    config = yaml.safe_load(bentofile_path().read_text())
    if model_tag:
        config["models"] = [str(model_tag)]
    with tempfile.TemporaryDirectory(prefix="transact-bentofile-") as tmp:
        ctx = Path(build_ctx) if build_ctx else package_tree(Path(tmp) / "ctx")
        path = Path(tmp) / "bentofile.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        bento = build_bentofile(str(path), build_ctx=str(ctx), version=version)
    return str(bento.tag)


#: what of each package's folder a bento carries (code, and package data such as the bentofile)
PACKAGE_FILES = ("*.py", "*.yaml")


def package_tree(dest: Path) -> Path:
    """``dest/transact/...``: the ``transact`` package as it is installed, wherever it is imported
    from now. An installed wheel is that layout already; a source checkout maps one folder to each
    subpackage (``data/`` is ``transact.data``: pyproject's ``package-dir``), which is followed
    here. Returns ``dest``."""
    import tomllib

    import transact

    here = Path(transact.__file__).resolve().parent  # the folder of transact/__init__.py
    root = here.parent
    dest.mkdir(parents=True, exist_ok=True)
    if not (root / "pyproject.toml").is_file():  # installed: site-packages/transact as it is
        shutil.copytree(here, dest / "transact", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return dest
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setup["packages"]:
        folder = root / setup.get("package-dir", {}).get(package, package.replace(".", "/"))
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        # the package's code, and its package data as the wheel carries it (the Feast template)
        for pattern in (*PACKAGE_FILES, *setup.get("package-data", {}).get(package, [])):
            for f in folder.glob(pattern):
                if f.is_file():
                    (target / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target / f.relative_to(folder))
    return dest


def default_bentoml_home() -> Path:
    """The BentoML home a process started now would use: ``$BENTOML_HOME`` or ``~/bentoml``
    (BentoML's own rule, environment variables in the value expanded)."""
    return Path(os.path.expanduser(os.path.expandvars(os.environ.get("BENTOML_HOME", "~/bentoml"))))


@contextlib.contextmanager
def local_stores(path: str | Path) -> Iterator[Path]:
    """Context manager: this process's BentoML model and bento stores in ``path``.

    BentoML resolves its home once per process; tests and the benchmark keep their models
    out of ~/bentoml by pointing the already-created stores at ``path``. The environment is
    not touched: a child process gets its BentoML home explicitly
    (:func:`transact.serving.launch.server_env`), or from its caller's environment.
    """
    home = Path(path)
    for sub in ("bentos", "models", "envs", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    with _point_bentoml_stores_at(home):
        yield home


@contextlib.contextmanager
def _point_bentoml_stores_at(home: Path) -> Iterator[None]:
    """BentoML's private dependency container, in one place.

    BentoML has no public API to move this process's model and bento stores once its home
    is resolved (``BENTOML_HOME`` is read once, at the first use); its stores are
    ``simple_di`` providers of ``bentoml._internal.configuration.containers.BentoMLContainer``.
    Each is set for the duration and its previous override restored after, also on an
    error (simple_di keeps it in ``_override``; its own ``Provider.patch`` does not restore
    when the body raises). Pinned against the installed BentoML by
    ``tests/serving/test_serving_start.py::test_local_stores_point_this_process_at_a_home``.
    """
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer as c
    from bentoml._internal.models import ModelStore

    values = {c.bentoml_home: str(home), c.model_store_dir: str(home / "models"),
              c.bento_store_dir: str(home / "bentos"), c.tmp_bento_store_dir: str(home / "tmp"),
              c.env_store_dir: str(home / "envs"), c.model_store: ModelStore(str(home / "models")),
              c.bento_store: BentoStore(str(home / "bentos")), c.tmp_bento_store: BentoStore(str(home / "tmp"))}
    saved = {provider: provider._override for provider in values}
    try:
        for provider, value in values.items():
            provider.set(value)
        yield
    finally:
        for provider, value in saved.items():
            provider._override = value
