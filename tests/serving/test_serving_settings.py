"""The service settings are one table (issue 24): each setting's variable, parser, bounds and
default are stated once, ``from_env`` and ``to_env`` are derived from it, the module's
documentation table agrees with it, and the defaults other modules use come from it.
Also the house rules of these tests: no test module imports another, and the paths the
README names exist."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from transact.serving import settings as settings_module
from transact.serving.settings import DEFAULT_CPU_FORWARD, MAX_REQUEST_TIMEOUT_S, ServeSettings, Setting, read_setting

REPO = Path(__file__).resolve().parents[2]


def _docstring_rows() -> dict[str, str]:
    """variable -> default cell of the module docstring's table."""
    rows = {}
    for line in (settings_module.__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("TRANSACT_"):
            rows[cells[0]] = cells[1]
    return rows


def test_every_field_is_one_row_of_the_table():
    fields = dataclasses.fields(ServeSettings)
    assert all(isinstance(f.metadata.get("setting"), Setting) for f in fields)
    names = [f.metadata["setting"].env for f in fields]
    assert len(set(names)) == len(names) and all(n.startswith("TRANSACT_") for n in names)
    assert ServeSettings.variables() == {f.name: f.metadata["setting"].env for f in fields}


def test_settings_round_trip_through_the_table():
    default = ServeSettings()
    assert ServeSettings.from_env({}) == default
    assert ServeSettings.from_env(default.to_env()) == default
    changed = ServeSettings(
        model_tag="m:1", world="/w", device="cpu", threads=3, score_weights={"click": 2.0, "hide": -0.5},
        max_candidates=100, max_body_bytes=2048, max_batch_candidates=300, max_wait_ms=1.5, max_queue=9,
        request_timeout_s=0.25, max_clock_skew_s=None, api_key="k", log_dir="/log", log_queue_rows=10,
        log_flush_rows=5, log_flush_s=0.5, log_ship_to="s3://b/served", log_ship_s=2.5, assembly="naive",
        cuda_graphs=False, cpu_forward="eager")
    # every field differs from its default: the round trip covers the whole table
    assert all(getattr(changed, f.name) != f.default for f in dataclasses.fields(ServeSettings)
               if f.name != "feast_repo")
    env = changed.to_env()
    assert set(env) == set(ServeSettings.variables().values()) - {"TRANSACT_FEAST_REPO"}
    assert ServeSettings.from_env(env) == changed
    feast = ServeSettings(feast_repo="/repo")
    assert ServeSettings.from_env(feast.to_env()) == feast


def test_the_docstring_table_lists_every_setting_with_its_default():
    rows = _docstring_rows()
    for f in dataclasses.fields(ServeSettings):
        s: Setting = f.metadata["setting"]
        assert s.env in rows, f"{s.env} is missing from the table in transact/serving/settings.py"
        shown = s.show(f.default)
        if shown is None:
            assert rows[s.env].startswith("(none"), (s.env, rows[s.env])
        else:
            assert rows[s.env] == shown, (s.env, rows[s.env], shown)
    # and nothing else: TRANSACT_SOURCE is the one variable that is not a field (world or feast)
    assert set(rows) - set(ServeSettings.variables().values()) == {"TRANSACT_SOURCE"}


def test_constructing_settings_checks_every_value_as_the_worker_would():
    for kw, var in ((dict(max_candidates=0), "TRANSACT_MAX_CANDIDATES"),
                    (dict(max_candidates=40_000), "TRANSACT_MAX_CANDIDATES"),
                    (dict(assembly="fancy"), "TRANSACT_ASSEMBLY"),
                    (dict(cpu_forward="tpu"), "TRANSACT_CPU_FORWARD"),
                    (dict(log_flush_s=0.0), "TRANSACT_LOG_FLUSH_S"),
                    (dict(log_ship_to="s3://b/served"), "TRANSACT_LOG_SHIP_TO: shipping the served log needs"),
                    (dict(log_ship_to=" ", log_dir="/l"), "TRANSACT_LOG_SHIP_TO: a folder or an object-store URI")):
        with pytest.raises(ValueError, match=var):
            ServeSettings(**kw)
    assert ServeSettings(max_candidates=4096).max_batch_candidates == 4096  # a request always fits a batch


def test_request_timeout_is_bounded_by_bentomls_own_timeout():
    from transact.serving.service import TRAFFIC_TIMEOUT_S, TransActRanker

    assert TransActRanker.config["traffic"]["timeout"] == TRAFFIC_TIMEOUT_S > MAX_REQUEST_TIMEOUT_S
    assert ServeSettings(request_timeout_s=MAX_REQUEST_TIMEOUT_S).request_timeout_s == MAX_REQUEST_TIMEOUT_S
    with pytest.raises(ValueError, match="TRANSACT_REQUEST_TIMEOUT_S") as e:
        ServeSettings(request_timeout_s=MAX_REQUEST_TIMEOUT_S + 1)
    assert str(e.value) == "TRANSACT_REQUEST_TIMEOUT_S=601 must be a finite number >= 0.001 and <= 600"
    with pytest.raises(ValueError, match="TRANSACT_REQUEST_TIMEOUT_S=601"):
        ServeSettings.from_env({"TRANSACT_REQUEST_TIMEOUT_S": "601"})


def test_cpu_forward_default_is_stated_once():
    from transact.serving.device import ModelRunner
    from transact.serving.ranker import Ranker

    assert ServeSettings().cpu_forward == DEFAULT_CPU_FORWARD == "compile"
    for fn in (Ranker.__init__, ModelRunner.__init__):
        assert inspect.signature(fn).parameters["cpu_forward"].default == DEFAULT_CPU_FORWARD
    for path in ("serving/ranker.py", "serving/device.py", "transact/commands/serving.py"):
        assert not re.search(r"cpu_forward: str = (typer\.Option\()?\"", (REPO / path).read_text()), path


def test_read_setting_parses_with_the_table():
    assert read_setting("max_candidates", {}) == 1024
    assert read_setting("max_candidates", {"TRANSACT_MAX_CANDIDATES": " 64 "}) == 64
    with pytest.raises(ValueError, match="TRANSACT_MAX_CANDIDATES"):
        read_setting("max_candidates", {"TRANSACT_MAX_CANDIDATES": "many"})


# --- house rules of the tests and their documentation -----------------------------------------

def test_no_test_module_imports_another_test_module():
    """Shared serving test code lives in tests/helpers.py (its ``# --- serving ---`` section)."""
    offenders = []
    for path in sorted((REPO / "tests" / "serving").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert not offenders, offenders


def test_the_readme_and_the_hooks_name_files_that_exist():
    texts = {"README.md": (REPO / "README.md").read_text(), "docs/serving.md": (REPO / "docs/serving.md").read_text(),
             "tests/serving/schemathesis_hooks.py": (REPO / "tests/serving/schemathesis_hooks.py").read_text()}
    for name, text in texts.items():
        for path in set(re.findall(r"tests/[\w/]+\.py", text)):
            assert (REPO / path).is_file(), f"{name} names {path}, which does not exist"
    assert "tests/serving/schemathesis_hooks.py" in texts["README.md"]
