"""The house: each room (one concern) is a package of ``transact``, imports point down, no
module grows past 900 lines, and the tests say when a dependency is missing.

The rooms and their order are stated once, in pyproject.toml's layers contract
([tool.importlinter]): ``lint-imports`` checks the import graph against it (imports inside
functions and under TYPE_CHECKING count too), and :func:`test_the_rooms_contract_holds` runs
it here, so ``make test`` alone catches an upward import. This module reads the contract and
checks what import-linter cannot: that the install map and the ``transact/<room>`` links name
the contract's rooms, the size limit, the Feast repo's imports, the test suite's own habits,
one version.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAX_LINES = 900


def _contract() -> dict:
    (rooms,) = [c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c.get("id") == "rooms"]
    return rooms


#: the contract's rooms, highest first as import-linter lists them (``cli : commands`` is one room)
LAYERS: list[list[str]] = [[m.strip() for m in re.split(r"[:|]", layer)] for layer in _contract()["layers"]]
#: installed package -> folder on disk (``transact.data`` -> ``data``)
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
#: every folder that holds the package's code (the size limit's scope)
CODE_FOLDERS = sorted({Path(folder).parts[0] for folder in PACKAGE_DIR.values()})


def _module_names() -> list[str]:
    return [m for layer in LAYERS for m in layer]


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


# --- the rooms ------------------------------------------------------------------------------

def test_every_room_is_a_package_on_disk():
    """Each room of the contract is installed from its own folder, and ``transact/<room>``
    links to that folder (what mypy, import-linter and IDEs read); the CLI room is
    ``transact/cli.py`` and ``transact/commands/``."""
    assert (ROOT / "transact" / "cli.py").is_file()
    for name in _module_names():
        if name == "cli":
            continue
        package = f"transact.{name}"
        assert package in PACKAGE_DIR, f"{package} is in the rooms contract but not in [tool.setuptools] package-dir"
        folder = ROOT / PACKAGE_DIR[package]
        assert (folder / "__init__.py").is_file(), f"{folder} is not a package"
        view = ROOT / "transact" / name
        assert view.resolve() == folder.resolve(), f"transact/{name} must be the room itself (a link to {folder.name}/)"


def test_the_install_map_names_the_contracts_rooms():
    """package-dir installs exactly the contract's rooms (and their subpackages), and every
    link in ``transact/`` is one of them: a room added to one list and not the other fails."""
    rooms = set(_module_names()) - {"cli"}
    installed = {p.split(".")[1] for p in PACKAGE_DIR if p.count(".") >= 1}
    assert installed == rooms, {"installed, not in the contract": installed - rooms,
                                "in the contract, not installed": rooms - installed}
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == sorted(PACKAGE_DIR)
    links = {p.name for p in (ROOT / "transact").iterdir() if p.is_symlink()}
    assert links == {r for r in rooms if not PACKAGE_DIR[f"transact.{r}"].startswith("transact/")}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    assert exe.exists(), f"{exe} missing: import-linter is in the test extra (pip install -e '.[test]')"
    return subprocess.run([str(exe), "pyproject.toml", "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_the_rooms_contract_holds():
    """``lint-imports`` (what ``make lint`` runs): no module imports a room above its own."""
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "0 broken" in r.stdout


def test_the_contract_catches_a_lazy_upward_import_and_an_unlisted_room(tmp_path):
    """The same contract on a stand-in package: an upward import inside a function breaks it,
    and so does a subpackage of ``transact`` the contract does not list."""
    pkg = tmp_path / "transact"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in _module_names():
        if name == "cli":
            (pkg / "cli.py").write_text("from transact import commands\n")
        else:
            (pkg / name).mkdir()
            (pkg / name / "__init__.py").write_text("")
    for sub in ("pytorch", "triton"):  # named by the one-dispatch contract
        (pkg / "kernels" / sub).mkdir()
        (pkg / "kernels" / sub / "__init__.py").write_text("")
    (pkg / "data" / "bad.py").write_text("def f():\n    from transact.serving import x\n    return x\n")
    (pkg / "model" / "leak.py").write_text("from transact.kernels.pytorch import packing\n")  # past the dispatch
    (pkg / "attic").mkdir()
    (pkg / "attic" / "__init__.py").write_text("")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    r = _lint_imports(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "transact.data is not allowed to import transact.serving" in r.stdout, r.stdout
    assert "transact.data.bad -> transact.serving" in r.stdout, r.stdout
    assert "- transact.attic" in r.stdout, r.stdout
    assert "transact.model is not allowed to import transact.kernels.pytorch" in r.stdout, r.stdout


def test_the_feast_repo_imports_only_the_feature_room():
    for path in sorted((ROOT / "feature_repo").glob("*.py")):
        for line, module in imports_of(path):
            target = room_of_import(module)
            assert target in (None, "data", "features"), f"{path.name}:{line} imports {module}"


def test_room_of_import_names_the_cli_room():
    assert room_of_import("transact.commands.serving") == "cli"
    assert room_of_import("transact.model.train") == "model"
    assert room_of_import("torch.nn") is None


@pytest.mark.parametrize("folder", [*CODE_FOLDERS, "tests"])
def test_no_module_over_the_size_limit(folder):
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big


# --- the tests' own habits ------------------------------------------------------------------

def _declared_distributions() -> set[str]:
    """Every distribution pyproject.toml asks for (dependencies and every extra), normalised."""
    project = PYPROJECT["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def _declared_import_names() -> set[str]:
    """Top-level import names of the declared distributions (``transact`` included)."""
    declared = _declared_distributions()
    names = {top for top, dists in packages_distributions().items()
             if any(d.lower().replace("_", "-") in declared for d in dists)}
    return names | {"transact"}


def _test_modules() -> list[Path]:
    return sorted((ROOT / "tests").rglob("*.py"))


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == name) or (isinstance(f, ast.Name) and f.id == name):
                yield node


def _strings(node: ast.Call) -> list[str]:
    return [a.value for a in [*node.args, *(k.value for k in node.keywords)]
            if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def test_no_test_skips_on_a_declared_dependency():
    """A dependency pyproject.toml declares (or the project's own module) is there or the
    test fails: ``importorskip`` on one, or a ``pytest.skip`` naming one (``feast CLI not
    found``), would turn a broken install into a green run."""
    names = _declared_import_names()
    words = names | _declared_distributions()
    bad = []
    for path in _test_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree, "importorskip"):
            module = (_strings(call) or [""])[0]
            if module.split(".")[0] in names:
                bad.append(f"{path.relative_to(ROOT)}:{call.lineno} importorskip({module!r})")
        for call in _calls(tree, "skip"):
            for text in _strings(call):
                # a word, not part of a longer name (`redis-server` is a system package, not `redis`)
                hit = [w for w in words if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)]
                if hit:
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno} skip({text!r}) names {hit}")
    assert not bad, "\n".join(bad)


def test_declared_import_names_cover_the_hard_dependencies():
    names = _declared_import_names()
    assert {"feast", "ray", "torch", "transact", "great_expectations"} <= names


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py; a test module imported by another one
    runs its module-level set-up twice and hides what the importer depends on."""
    test_modules = {p.stem for p in _test_modules() if p.stem.startswith("test_")}
    bad = []
    for path in _test_modules():
        for line, module in imports_of(path):
            if module.split(".")[0] in test_modules or module.startswith("tests."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad) + "\n(move the shared code into tests/helpers.py)"


def test_a_hung_test_cannot_hang_the_run(pytestconfig):
    """pytest-timeout is installed and configured: a test stuck on a server that never
    answers fails after ``timeout`` seconds instead of holding CI."""
    assert int(pytestconfig.getini("timeout")) > 0
    assert pytestconfig.getini("timeout_method") == "thread"


# --- one version ----------------------------------------------------------------------------

def test_one_version_read_everywhere():
    """pyproject.toml holds the version; the CLI and the KFP base image tag read it."""

    from typer.testing import CliRunner

    from transact.cli import app

    want = PYPROJECT["project"]["version"]
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"transact {want}", r.output
    import transact.components.kfp_components as kc

    assert kc.BASE_IMAGE.endswith(f":{want}")
