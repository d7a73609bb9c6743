"""Typed ``field=value`` overrides of a config dataclass (``transact simulate --set``).

A user tests how the model behaves on a world unlike the demo without writing Python: each
value is parsed in the type of the field it replaces, and the config checks the result
itself, so a bad value is one line naming the field -- never a traceback.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


def with_overrides(cfg: C, pairs: Sequence[str]) -> C:
    """``cfg`` (a frozen dataclass, e.g. :class:`~transact.data.simulator.WorldConfig`) with
    ``field=value`` pairs applied (``transact simulate --set``), each value parsed as its
    field's type and the result checked by the config's own ``__post_init__``.

    Values: ``6`` or ``0.5`` for numbers, ``a,b,c`` for a per-action/per-surface tuple,
    ``a,b;c,d`` for a table (rows by ``;``), ``none`` to clear an optional field. Errors
    are one line naming the option, the field and what was expected.
    """
    import dataclasses
    import difflib

    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes: dict = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name:
            raise ValueError(f"--set {pair!r}: write field=value, e.g. --set interests_mean=6")
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {near[0]}?)" if near else f"; fields: {', '.join(fields)}"
            raise ValueError(f"--set {name}: not a {type(cfg).__name__} field{hint}")
        changes[name] = _parse_field(name, raw, getattr(cfg, name))
    try:
        return dataclasses.replace(cfg, **changes)
    except ValueError as e:
        raise ValueError(f"--set: {e}") from None


def _parse_field(name: str, raw: str, current):
    """One ``--set`` value in the type of the field's current value."""
    def num(x: str, like):
        if isinstance(like, bool):
            if x.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return x.lower() in ("true", "1")
        if isinstance(like, int):
            return int(x)
        v = float(x)
        if not math.isfinite(v):
            raise ValueError
        return v

    try:
        if raw.lower() == "none":
            if name != "user_ids":
                raise ValueError
            return None
        if current is None:  # user_ids
            return tuple(int(x) for x in raw.split(","))
        if isinstance(current, tuple):
            if current and isinstance(current[0], tuple):
                rows = tuple(tuple(num(x, current[0][0]) for x in r.split(",")) for r in raw.split(";"))
                if len(rows) != len(current) or any(len(r) != len(current[0]) for r in rows):
                    raise ValueError
                return rows
            vals = tuple(num(x, current[0] if current else 0.0) for x in raw.split(","))
            if current and len(vals) != len(current):
                raise ValueError
            return vals
        return num(raw, current)
    except ValueError:
        shape = (f"{len(current)} rows of {len(current[0])} numbers (a,b;c,d)" if isinstance(current, tuple)
                 and current and isinstance(current[0], tuple) else
                 f"{len(current)} comma-separated numbers" if isinstance(current, tuple) else
                 "comma-separated user ids or none" if current is None else type(current).__name__)
        raise ValueError(f"--set {name}={raw!r}: expected {shape} (now {current!r})") from None
