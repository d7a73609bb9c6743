"""The Redis address reaches the store as an argument: `transact features ... --redis` used to
write it into the process environment for Feast's yaml expansion to find."""
from __future__ import annotations

import os

from transact.features.feast.store import REDIS_ENV, init_repo, open_store


def test_the_redis_address_is_passed_not_written_to_the_environment(tmp_path, monkeypatch):
    from transact.commands.features import _store

    monkeypatch.delenv(REDIS_ENV, raising=False)
    repo = init_repo(tmp_path / "repo")  # sqlite default; feature_store.redis.yaml copied as the template has it
    store = _store(repo, "redis", "127.0.0.1:6399,db=2")  # opening a store connects to nothing yet
    assert store.config.online_store.connection_string == "127.0.0.1:6399,db=2"
    assert REDIS_ENV not in os.environ  # (Feast itself sets its Prometheus folder on import)
    monkeypatch.setenv(REDIS_ENV, "127.0.0.1:6400")  # the variable still works, read at the edge
    assert _store(repo, "redis", None).config.online_store.connection_string == "127.0.0.1:6400"
    assert open_store(repo, "feature_store.redis.yaml").config.online_store.connection_string == "127.0.0.1:6400"


def test_a_dollar_in_the_redis_password_stays_as_given(tmp_path, monkeypatch):
    from transact.commands.features import _store

    monkeypatch.setenv("WORD", "expanded")
    repo = init_repo(tmp_path / "repo")
    store = _store(repo, "redis", "127.0.0.1:6399,password=pa$WORD")
    assert store.config.online_store.connection_string == "127.0.0.1:6399,password=pa$WORD"
