"""The house: each top-level folder is one room (one concern), imports point down, no
module grows past 900 lines.

Rooms, lowest first; a module may import its own room and the rooms below it, never one
above (lazy imports inside functions count too: they are dependencies all the same).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (room folder, import name), lowest first
ROOMS: tuple[tuple[str, str], ...] = (
    ("data", "data"),
    ("kernels", "kernels"),
    ("features", "features"),
    ("model", "model"),
    ("validation", "validation"),
    ("serving", "serving"),
    ("components", "components"),
    ("pipelines", "pipelines"),
    ("monitoring", "monitoring"),
    ("bench", "bench"),
    ("transact", "cli"),  # the CLI: transact/cli.py and transact/commands/
)
LEVEL = {name: i for i, (_, name) in enumerate(ROOMS)}
MAX_LINES = 900


def room_of_import(module: str) -> str | None:
    """``transact.model.train`` -> ``model``; ``transact.cli`` / ``transact.commands.x`` -> ``cli``."""
    parts = module.split(".")
    if parts[0] != "transact" or len(parts) < 2:
        return None
    return "cli" if parts[1] in ("cli", "commands") else parts[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)]
            # `from transact import model` names a room too (`__version__` names none)
            if node.module == "transact":
                out += [(node.lineno, f"transact.{a.name}") for a in node.names if not a.name.startswith("_")]
    return out


def modules() -> list[tuple[str, Path]]:
    return [(name, p) for folder, name in ROOMS for p in sorted((ROOT / folder).rglob("*.py"))]


def test_every_room_is_a_package_on_disk():
    for folder, _ in ROOMS:
        assert (ROOT / folder / "__init__.py").exists(), folder


def test_imports_point_down():
    bad = []
    for room, path in modules():
        for line, module in imports_of(path):
            target = room_of_import(module)
            if target is None or target == room:
                continue
            if target not in LEVEL:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}: not a room")
            elif LEVEL[target] > LEVEL[room]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {module} ({target}, a room above)")
    assert not bad, "\n".join(bad)


def test_the_feast_repo_imports_only_the_feature_room():
    for path in sorted((ROOT / "feature_repo").glob("*.py")):
        for line, module in imports_of(path):
            target = room_of_import(module)
            assert target in (None, "data", "features"), f"{path.name}:{line} imports {module}"


@pytest.mark.parametrize("folder", [f for f, _ in ROOMS] + ["tests"])
def test_no_module_over_the_size_limit(folder):
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big


def test_room_of_import_names_the_cli_room():
    assert room_of_import("transact.commands.serving") == "cli"
    assert room_of_import("transact.model.train") == "model"
    assert room_of_import("torch.nn") is None


def test_one_version_read_everywhere(monkeypatch):
    """pyproject.toml holds the version; the CLI and the KFP base image tag read it."""
    import importlib
    import tomllib

    from typer.testing import CliRunner

    from transact.cli import app

    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"transact {want}", r.output
    monkeypatch.delenv("TRANSACT_BASE_IMAGE", raising=False)
    import transact.components.kfp_components as kc

    assert importlib.reload(kc).BASE_IMAGE.endswith(f":{want}")
