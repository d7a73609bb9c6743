"""Plain `feast materialize` / `feast materialize-incremental` on a repo set up by
`transact features apply --world`: the online store they fill must equal the one
`transact features materialize` writes, or the command must refuse naming it.

Every Feast call here is the real CLI in a subprocess, as a user types it in the repo folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import FEAST_CAPS, feast_cli, feast_world
from transact.cli import app
from transact.features.config import FeatureConfig
from transact.features.feast.store import EPOCH, ITEM_KEY, ITEM_SERVICE, SERVICE, USER_KEY, init_repo, open_store, read_manifest

pytestmark = pytest.mark.slow  # ~10 Feast CLI processes (each imports Feast: seconds on 2 cores)

CFG = FeatureConfig(**FEAST_CAPS)

CAPS = ["--ll-cap", str(CFG.ll_cap), "--rt-cap", str(CFG.rt_cap), "--imp-cap", str(CFG.imp_cap)]
REFUSAL = "transact features materialize"


def _feast(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """`cd repo && feast <args>` with the project's Feast."""
    env = {**os.environ, "FEAST_USAGE": "False"}
    return subprocess.run([feast_cli(), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def _transact(*args: str) -> None:
    r = CliRunner().invoke(app, [*args, "--no-progress"])
    assert r.exit_code == 0, r.output


def _transact_apply(repo: Path, world: Path) -> Path:
    _transact("features", "apply", "--world", str(world), "--repo", str(repo), *CAPS)
    return repo


def _iso(ms: int) -> str:
    return (EPOCH + timedelta(milliseconds=int(ms))).isoformat()


def _online(repo: Path, users, items) -> dict:
    """Every online value and its event timestamp, as Feast serves them."""
    store = open_store(repo)
    u = store.get_online_features(features=store.get_feature_service(SERVICE),
                                  entity_rows=[{USER_KEY: int(x)} for x in users])
    i = store.get_online_features(features=store.get_feature_service(ITEM_SERVICE),
                                  entity_rows=[{ITEM_KEY: int(x)} for x in items])
    return {**u.to_dict(include_event_timestamps=True), **i.to_dict(include_event_timestamps=True)}


def _filled(values: dict) -> int:
    """Feature values present (keys and ``__ts`` timestamps left out)."""
    return sum(v is not None for k, col in values.items() if not k.endswith("__ts") and
               k not in (USER_KEY, ITEM_KEY) for v in col)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    t = feast_world(path)
    users = np.unique(np.concatenate([t["actions"].column("user_id").to_numpy(),
                                      t["impressions"].column("user_id").to_numpy(), [66, 123456]]))
    return path, users, t["items"].column("item_id").to_numpy()


@pytest.fixture(scope="module")
def expected(world, tmp_path_factory):
    """The online store after `transact features apply --world` + `transact features materialize`."""
    path, users, items = world
    repo = _transact_apply(tmp_path_factory.mktemp("transact") / "repo", path)
    _transact("features", "materialize", "--repo", str(repo))
    want = _online(repo, users, items)
    assert _filled(want) > len(users)
    return want, read_manifest(repo)["until_ms"]


def test_feast_materialize_incremental_equals_transact_materialize(world, expected, tmp_path):
    path, users, items = world
    want, until = expected
    repo = _transact_apply(tmp_path / "repo", path)
    for args in (["apply"], ["materialize-incremental", _iso(until)]):
        r = _feast(repo, *args)
        assert r.returncode == 0, r.stdout + r.stderr
    assert _online(repo, users, items) == want
    r = _feast(repo, "materialize-incremental", _iso(until + 1))  # nothing new: same store
    assert r.returncode == 0, r.stdout + r.stderr
    assert _online(repo, users, items) == want


def test_feast_materialize_from_the_epoch_equals_and_a_later_start_refuses(world, expected, tmp_path):
    path, users, items = world
    want, until = expected
    repo = _transact_apply(tmp_path / "repo", path)
    late = int(read_manifest(repo)["since_ms"]) + 3 * 86_400_000
    r = _feast(repo, "materialize", _iso(late), _iso(until))
    assert r.returncode != 0 and REFUSAL in r.stdout + r.stderr, r.stdout + r.stderr
    assert _filled(_online(repo, users, items)) == 0  # refused before writing anything
    r = _feast(repo, "materialize", "1970-01-01T00:00:00", _iso(until))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _online(repo, users, items) == want


def test_feast_materialize_incremental_refuses_on_a_registry_feast_applied_alone(world, expected, tmp_path):
    """Offline sources present but the registry made by plain `feast apply`: Feast would
    start a year before now and write nothing; it must refuse instead."""
    path, users, items = world
    _, until = expected
    src = _transact_apply(tmp_path / "src", path)
    repo = init_repo(tmp_path / "repo")
    shutil.copytree(src / "data" / "offline", repo / "data" / "offline")
    r = _feast(repo, "apply")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _feast(repo, "materialize-incremental", _iso(until))
    assert r.returncode != 0 and REFUSAL in r.stdout + r.stderr, r.stdout + r.stderr
