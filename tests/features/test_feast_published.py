"""The Feast repo on object storage (issue 25: the pipeline's Feast registry and SQLite store lived
on the features step's pod and vanished with it). The step builds the repo in a folder of its own
and publishes it whole; the service fetches the current version. Against a real S3-protocol
server (moto) and, for the cluster setting, a real Redis."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import COLD_USER, feast_world
from transact.bench.features import local_redis
from transact.components import steps
from transact.data import storage
from transact.features.feast.online import OnlineSequences
from transact.features.feast.published import CURRENT, fetch_repo, local_repo, publish_repo
from transact.features.feast.store import open_store


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    tables = feast_world(path)
    users = np.unique(np.concatenate([tables["actions"].column("user_id").to_numpy(),
                                      tables["impressions"].column("user_id").to_numpy(), [COLD_USER]]))
    return path, users


@pytest.fixture(scope="module")
def local(world, tmp_path_factory):
    """The embedded default: the step's repo on a local disk, SQLite online."""
    repo = tmp_path_factory.mktemp("feast") / "repo"
    steps.materialize_features(str(world[0]), str(repo), progress=False)
    return repo


def test_a_published_repo_serves_the_same_rows_and_a_later_publish_moves_current(local, world, s3, tmp_path,
                                                                                  monkeypatch):
    loc = f"{s3.bucket()}/store/feature_repo"
    first = publish_repo(local, loc)
    got = fetch_repo(loc, tmp_path / "cache")
    assert got.name == first["version"] and not (got / "__pycache__").exists()
    assert OnlineSequences(got).raw(list(world[1])) == OnlineSequences(local).raw(list(world[1]))
    second = publish_repo(local, loc)
    assert storage.read_json(f"{loc}/{CURRENT}")["version"] == second["version"] != first["version"]
    assert fetch_repo(loc, tmp_path / "cache").name == second["version"]
    assert (tmp_path / "cache" / first["version"]).is_dir()  # a reader of the old version keeps it
    # a run that started earlier and publishes last never moves CURRENT back
    import transact.features.feast.published as published

    class Earlier:
        @staticmethod
        def now(tz):
            from datetime import datetime
            return datetime(2020, 1, 1, tzinfo=tz)

    monkeypatch.setattr(published, "datetime", Earlier)
    late = publish_repo(local, loc)
    assert late["version"] < second["version"] == late["current"]
    assert storage.read_json(f"{loc}/{CURRENT}")["version"] == second["version"]


def test_the_features_step_on_object_storage_with_redis_matches_the_local_default(local, world, s3, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    loc = f"{s3.bucket()}/store/feature_repo"
    with local_redis() as redis:
        summary = steps.materialize_features(str(world[0]), loc, progress=False, redis=redis)
        assert summary["apply"]["online_store"] == "redis" and summary["published"]["location"] == loc
        got = local_repo(loc, tmp_path / "serving")  # what `transact serve --feast-repo s3://...` opens
        assert "${TRANSACT_REDIS}" in (got / "feature_store.yaml").read_text()  # no address or password published
        assert not (got / "data" / "online.db").exists()
        store = open_store(got, redis=redis)
        assert OnlineSequences(store).raw(list(world[1])) == OnlineSequences(local).raw(list(world[1]))


def test_no_published_repo_is_one_line_naming_the_place(s3, tmp_path):
    loc = f"{s3.bucket()}/nothing/feature_repo"
    with pytest.raises(FileNotFoundError, match=r"nothing/feature_repo: no published Feast repo \(CURRENT.json missing\)"):
        fetch_repo(loc, tmp_path)
