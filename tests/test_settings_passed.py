"""Settings are objects read once at the edge and passed down: no library module writes the
process environment (telemetry opt-outs and the CLI entry excepted) or re-imports a module
to make it read settings again."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: variables a library may default: each only turns a dependency's telemetry off
TELEMETRY = {"GX_ANALYTICS_ENABLED", "ITERATIVE_DO_NOT_TRACK", "BENTOML_DO_NOT_TRACK"}
#: the edge: the CLI's own entry module
EDGE = {"transact/cli.py"}
WRITES = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def library_files() -> list[Path]:
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    return sorted({p for d in dirs for p in (ROOT / d).glob("*.py")})


def is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
                out.append(f"{line}: writes os.environ[...]")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if is_environ(f.value) and f.attr in WRITES:
                first = node.args[0] if node.args else None
                name = first.value if isinstance(first, ast.Constant) else None
                if not (f.attr == "setdefault" and name in TELEMETRY):
                    out.append(f"{line}: os.environ.{f.attr}({name or '...'})")
            elif f.attr == "putenv" or (f.attr == "reload" and getattr(f.value, "id", "") == "importlib"):
                out.append(f"{line}: {f.attr}()")
    return sorted(out, key=lambda f: int(f.split(":")[0]))


def test_no_library_module_writes_the_environment_or_reloads_a_module():
    bad = [f"{p.relative_to(ROOT)}:{f}" for p in library_files() if str(p.relative_to(ROOT)) not in EDGE
           for f in findings(p)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_each_kind_of_write(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os, importlib\nos.environ['A'] = '1'\nos.environ.update(B='2')\n"
                   "del os.environ['C']\nos.environ.setdefault('ITERATIVE_DO_NOT_TRACK', '1')\n"
                   "os.environ.setdefault('D', '1')\nimportlib.reload(os)\nos.putenv('E', '1')\n")
    assert [f.split(":")[0] for f in findings(src)] == ["2", "3", "4", "6", "7", "8"]
