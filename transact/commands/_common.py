"""Helpers shared by the command modules."""
from __future__ import annotations

import functools
import json

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


def fail_on_user_error(fn):
    """Turns expected user errors (bad input files, bad options) into a one-line message
    and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from transact.data.io import SchemaError

        try:
            return fn(*args, **kwargs)
        except (SchemaError, FileNotFoundError, ValueError) as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return wrapper
