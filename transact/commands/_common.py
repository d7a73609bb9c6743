"""Helpers shared by the command modules."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import typer


def parse_params(items: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON when they are (numbers, booleans), else strings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


#: Path problems a person fixes by giving another path: missing, a file where a folder is
#: needed (and back), no permission. Other OSErrors (disk full, I/O) keep their traceback.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def user_message(e: Exception) -> str:
    """One line: an OSError as ``<path>: <reason>`` (its default repr leads with
    ``[Errno N]``), anything else as its message with the lines of a multi-line one joined."""
    if isinstance(e, (FileExistsError, NotADirectoryError)) and e.filename:
        in_the_way = _file_in_the_way(str(e.filename))
        if in_the_way:
            return f"{in_the_way} is a file, where a folder is needed"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def _file_in_the_way(path: str) -> str | None:
    """The file that stops ``mkdir -p path`` (``path`` itself or a parent), if any: the
    errno alone ("File exists", "Not a directory") does not say which one."""
    from pathlib import Path

    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return str(p) if not p.is_dir() else None
    return None


def local_paths(kwargs: dict) -> dict:
    """The command's path options as local paths (:func:`transact.data.storage.local_path`):
    ``file://`` unwrapped, an object-store URI refused naming the option before the command
    runs (typer has already made it a ``Path``, the local folder ``s3:/...``)."""
    from transact.data.storage import local_path

    out = dict(kwargs)
    for key, value in kwargs.items():
        option = "--" + key.replace("_", "-")
        if isinstance(value, Path):
            out[key] = local_path(value, option)
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            out[key] = [local_path(v, option) for v in value]
    return out


def fail_on_user_error(fn):
    """Turns expected user errors (bad input files, bad paths, bad options, a host that does
    not answer) into a one-line message and exit code 2 instead of a traceback. Path options
    go through :func:`local_paths` first: a URI never becomes a local folder."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from transact.data.io import SchemaError

        try:
            return fn(*args, **local_paths(kwargs))
        except (SchemaError, ValueError, *PATH_ERRORS) as e:
            typer.secho(f"error: {user_message(e)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
        except Exception as e:
            if not _storage_or_race(e):
                raise
            typer.secho(f"error: {user_message(e)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return wrapper


def _storage_or_race(e: Exception) -> bool:
    """An object store that cannot be reached or refuses the credentials (botocore's own errors,
    which s3fs lets through), or a champion another run moved meanwhile: the person's to fix or
    retry, said in one line. Imported here, on the error path only (no start-up cost)."""
    from transact.model.registry import ChampionMoved

    if isinstance(e, ChampionMoved):
        return True
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return False
    return isinstance(e, BotoCoreError)
