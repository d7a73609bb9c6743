"""A URI is never taken for a local path: `transact simulate --out s3://bucket/w` used to write
a local folder `./s3:/bucket/w` and report success, with nothing in the bucket."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from transact.cli import app
from transact.data.storage import ObjectStoreURI, local_path, uri_scheme


@pytest.mark.parametrize(("given", "want"), [
    ("runs/w", Path("runs/w")),
    ("/abs/w", Path("/abs/w")),
    ("file:///abs/w", Path("/abs/w")),
    ("file://localhost/abs/my%20w", Path("/abs/my w")),
    (Path("file:///abs/w"), Path("/abs/w")),  # what typer makes of it: file:/abs/w
    ("C:/data/w", Path("C:/data/w")),  # a drive letter is not a scheme
])
def test_local_paths_and_file_uris(given, want):
    assert local_path(given) == want


@pytest.mark.parametrize("given", ["s3://bucket/w", "gs://b/w", "abfs://c@acct/w", "S3://b/w", Path("s3://bucket/w"),
                                   "s3:/bucket/w"])
def test_object_store_uris_are_refused_in_one_line_naming_the_setting(given):
    with pytest.raises(ObjectStoreURI, match=r"^--out: [a-zA-Z0-9]+://\S+ is an object-store URI; .*nothing was written"):
        local_path(given, "--out")
    assert uri_scheme(given) is not None


def test_a_file_uri_of_another_host_is_refused():
    with pytest.raises(ValueError, match="names another host"):
        local_path("file://fileserver/share/w")


def path_options() -> list[tuple[str, str]]:
    """(command path, parameter name) of every Path-typed parameter of every CLI command."""
    out = []

    def walk(cmd, prefix: tuple[str, ...]) -> None:
        if hasattr(cmd, "commands"):  # a group
            for name, sub in cmd.commands.items():
                walk(sub, (*prefix, name))
            return
        for p in cmd.params:
            if "Path" in str(p.bare_type()):
                out.append((" ".join(prefix), p.name))

    walk(get_command(app), ())
    return out


def args_for(command: str, target: str) -> list[str]:
    """Arguments that reach the command's body: ``target`` an s3 URI, other required
    parameters a harmless local value."""
    cmd = get_command(app)
    for word in command.split():
        cmd = cmd.commands[word]  # type: ignore[attr-defined]
    args: list[str] = []
    for p in cmd.params:
        value = None
        if p.name == target:
            value = "s3://transact-bucket/x"
        elif p.required:
            value = "1" if any(t in str(p.bare_type()) for t in ("int", "float")) else "local-value"
        if value is None:
            continue
        if type(p).__name__ == "TyperArgument":
            args.append(value)
        else:
            args += [p.opts[0], value]
    return [*command.split(), *args]


@pytest.mark.parametrize(("command", "param"), path_options())
def test_every_path_option_refuses_an_object_store_uri_and_writes_nothing(command, param, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, args_for(command, param))
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "s3://transact-bucket/x is an object-store URI" in r.output, r.output
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_the_cli_has_path_options_to_check():
    commands = {c for c, _ in path_options()}
    assert {"simulate", "validate", "train", "serve", "evaluate", "features apply", "pipeline compile"} <= commands


@pytest.mark.parametrize(("command", "option"), [("log-nn", "--world"), ("log-nn", "--out"),
                                                 ("attach-labels", "--served"), ("attach-labels", "--out")])
def test_the_local_engine_refuses_a_uri_the_ray_engine_takes(command, option, tmp_path, monkeypatch):
    """log-nn and attach-labels take URIs for the Ray engine (its tasks read and write objects);
    the local engine refuses one in one line, before anything is written."""
    monkeypatch.chdir(tmp_path)
    args = {"--world": "w", "--out": "o", **({"--served": "s"} if command == "attach-labels" else {})}
    args[option] = "s3://transact-bucket/x"
    r = CliRunner().invoke(app, [command, *[x for kv in args.items() for x in kv]])
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert f"{option}: s3://transact-bucket/x is an object-store URI" in r.output, r.output
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.parametrize(("given", "want"), [
    ("s3://team-bucket/transact", "s3://team-bucket/transact"),  # kept as given: never a local folder "s3:"
    ("gs://b/x", "gs://b/x"),
    ("file:///srv/store", "/srv/store"),
    ("store", "{cwd}/store"),  # the steps run in other processes: made absolute
])
@pytest.mark.parametrize("param", ["storage_root", "source", "feature_repo"])
def test_pipeline_locations_are_uris_or_absolute_paths(param, given, want, tmp_path, monkeypatch):
    from transact.pipelines.runner import LOCATION_PARAMS, resolve_locations

    assert param in LOCATION_PARAMS
    monkeypatch.chdir(tmp_path)
    assert resolve_locations({param: given, "epochs": 1}) == {param: want.format(cwd=tmp_path), "epochs": 1}
    assert list(tmp_path.iterdir()) == []


def test_the_service_settings_refuse_a_uri_folder():
    from transact.serving.settings import ServeSettings

    assert ServeSettings.from_env({"TRANSACT_WORLD": "file:///srv/world"}).world == "/srv/world"
    for env in ({"TRANSACT_WORLD": "s3://b/w"}, {"TRANSACT_SOURCE": "feast:gs://b/repo"}, {"TRANSACT_LOG_DIR": "s3://b/l"}):
        with pytest.raises(ObjectStoreURI, match="is an object-store URI"):
            ServeSettings.from_env(env)


def test_settings_built_in_code_read_a_file_uri_as_the_worker_does():
    from transact.serving.settings import ServeSettings

    assert ServeSettings(world="file:///srv/world").world == "/srv/world"


def test_a_bad_candidate_bound_does_not_break_the_schema_import():
    """The request schema reads TRANSACT_MAX_CANDIDATES at import: a bad value there must not
    crash the worker's import (BentoML restarts it in a loop); __init__ reports it unready."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRANSACT_MAX_CANDIDATES": "many"}
    out = subprocess.run([sys.executable, "-c", "from transact.serving import schema; print(schema.MAX_CANDIDATES)"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1024"
