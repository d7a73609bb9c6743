"""The Feast repo: view / feature / source names and schemas, repo set-up, ``feast apply``
and the offline manifest.

The Feast definitions live in ``feature_repo/definitions.py`` (entities user and item,
feature views ``user_lifelong`` (batch), ``user_realtime`` and ``user_impressions``
(push sources), ``item_embedding``, feature services ``ranking_v2`` and
``ranking_v2_items``); the names below must match them (a test checks them against the
registry).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

# --- names shared with feature_repo/definitions.py (a test checks them against the registry)

LL_VIEW, RT_VIEW, IMP_VIEW, ITEM_VIEW = "user_lifelong", "user_realtime", "user_impressions", "item_embedding"
RT_PUSH, IMP_PUSH = "user_realtime_push", "user_impressions_push"
SERVICE, ITEM_SERVICE, TRAIN_SERVICE = "ranking_v2", "ranking_v2_items", "training_v2"
USER_KEY, ITEM_KEY, TS_COL = "user_id", "item_id", "event_timestamp"
#: view -> (blob feature, length feature)
VIEW_FEATURES: dict[str, tuple[str, str]] = {
    LL_VIEW: ("ll_tokens", "ll_len"),
    RT_VIEW: ("rt_tokens", "rt_len"),
    IMP_VIEW: ("imp_window", "imp_len"),
}
ITEM_FEATURE = "emb_q"
#: sequence view -> (its training-only index view, the index's "row time" feature)
INDEX_VIEWS: dict[str, tuple[str, str]] = {
    LL_VIEW: ("user_lifelong_index", "ll_asof_ms"),
    RT_VIEW: ("user_realtime_index", "rt_asof_ms"),
    IMP_VIEW: ("user_impressions_index", "imp_asof_ms"),
}
#: offline source folder (relative to the repo) of each view
OFFLINE_DIRS: dict[str, str] = {ITEM_VIEW: "data/offline/items", LL_VIEW: "data/offline/user_lifelong",
                                RT_VIEW: "data/offline/user_realtime",
                                IMP_VIEW: "data/offline/user_impressions",
                                **{iv: f"data/offline/{iv}" for iv, _ in INDEX_VIEWS.values()}}
MANIFEST = "data/offline/manifest.json"
#: the project's Feast repo (``feature_repo/``): ``template`` is a link to it in a checkout and
#: a copy of its definitions and yaml files in an installed package (package data)
REPO_TEMPLATE = Path(__file__).resolve().parent / "template"
REDIS_ENV = "TRANSACT_REDIS"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ITEMS_TS_MS = 0  # items are static: one row each at the epoch


def init_repo(dest: str | Path, online: str = "sqlite", redis: str | None = None,
              template: str | Path | None = None) -> Path:
    """Creates a Feast repo at ``dest`` from the project's ``feature_repo`` definitions.

    ``online``: "sqlite" (embedded default) or "redis" (``redis``: "host:port[,opts]"; if
    None the yaml reads ``${TRANSACT_REDIS}`` at load time). Existing data under
    ``dest/data`` is kept.
    """
    template = Path(template or REPO_TEMPLATE)
    if not (template / "definitions.py").exists():
        raise FileNotFoundError(f"Feast definitions not found in {template} (run from a checkout of "
                                f"the project or pass template=)")
    dest = Path(dest)
    (dest / "data").mkdir(parents=True, exist_ok=True)
    for f in template.glob("*.py"):
        shutil.copy2(f, dest / f.name)
    shutil.copy2(template / "feature_store.yaml", dest / "feature_store.yaml")
    shutil.copy2(template / "feature_store.redis.yaml", dest / "feature_store.redis.yaml")
    if online == "redis":
        text = (template / "feature_store.redis.yaml").read_text()
        if redis:
            text = text.replace("${" + REDIS_ENV + "}", redis)
        (dest / "feature_store.yaml").write_text(text)
    elif online != "sqlite":
        raise ValueError(f"online store must be 'sqlite' or 'redis', got {online!r}")
    return dest


def open_store(repo: str | Path, yaml_file: str | Path | None = None, redis: str | None = None):
    """``feast.FeatureStore`` of a repo (``yaml_file`` e.g. ``feature_store.redis.yaml``).

    ``redis`` (``host:port[,db=N,password=...]``) fills the yaml's ``${TRANSACT_REDIS}`` for this
    store alone (the process environment is left as it is; without it Feast expands the
    variable from the environment, as plain ``feast -f`` does)."""
    from feast import FeatureStore

    repo = Path(repo).resolve()
    if not (repo / "feature_store.yaml").exists() and yaml_file is None:
        raise FileNotFoundError(f"{repo} is not a Feast repo (no feature_store.yaml)")
    if redis is None:
        if yaml_file:
            return FeatureStore(repo_path=str(repo), fs_yaml_file=repo / yaml_file)
        return FeatureStore(repo_path=str(repo))
    import yaml
    from feast.repo_config import RepoConfig

    # as feast's load_repo_config reads it (variables expanded), the address put in afterwards so
    # that a $ in a password stays as given
    placeholder = "${" + REDIS_ENV + "}"
    text = (repo / (yaml_file or "feature_store.yaml")).read_text().replace(placeholder, "\0redis\0")
    text = os.path.expandvars(text).replace("\0redis\0", redis)
    config = RepoConfig(**yaml.safe_load(text))
    config.repo_path = repo
    return FeatureStore(repo_path=str(repo), config=config)


def as_store(store_or_repo):
    """A ``FeatureStore`` as it is, or the store of a repo path."""
    return open_store(store_or_repo) if isinstance(store_or_repo, (str, Path)) else store_or_repo


def load_definitions(repo: str | Path) -> list:
    """The Feast objects defined in the repo's modules (what ``feast apply`` collects)."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    objs: list = []
    for path in sorted(Path(repo).glob("*.py")):
        name = f"_transact_feast_repo_{abs(hash(str(path.resolve())))}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None  # a .py file always has a source loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, (Entity, FeatureView, FeatureService, DataSource)) and \
                    not any(value is o for o in objs):
                objs.append(value)
    return objs


def apply(store_or_repo) -> dict:
    """``feast apply``: registers the definitions and creates the online tables; then marks the
    online views as materialised up to the epoch (see :mod:`transact.features.feast.engine`)."""
    from transact.features.feast.engine import mark_start

    store = as_store(store_or_repo)
    objs = load_definitions(store.repo_path)
    store.apply(objs)
    mark_start(store)  # so that a plain `feast materialize-incremental` starts before every row
    store.refresh_registry()
    return {"applied": sorted(f"{type(o).__name__}:{o.name}" for o in objs),
            "online_store": store.config.online_store.type}


def view_schema(view: str) -> pa.Schema:
    """Parquet schema of a view's offline source (and of its push DataFrames)."""
    if view == ITEM_VIEW:
        return pa.schema([(ITEM_KEY, pa.int64()), (TS_COL, pa.timestamp("us", tz="UTC")),
                          (ITEM_FEATURE, pa.binary())])
    for iv, feat in INDEX_VIEWS.values():
        if view == iv:
            return pa.schema([(USER_KEY, pa.int64()), (TS_COL, pa.timestamp("us", tz="UTC")),
                              (feat, pa.int64())])
    blob, length = VIEW_FEATURES[view]
    return pa.schema([(USER_KEY, pa.int64()), (TS_COL, pa.timestamp("us", tz="UTC")),
                      (blob, pa.binary()), (length, pa.int32())])


def read_manifest(repo: str | Path) -> dict:
    p = Path(repo) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: run `transact features apply --world ...` first")
    return json.loads(p.read_text())
