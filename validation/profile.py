"""The reference profile: what an accepted batch leaves for the next one to be compared
with (per-type action shares, label rates, row counts, surface mix), and reading it back."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from transact.data import schema as S
from transact.validation.params import ROWS_TABLE

PROFILE_VERSION = 1


def _rate_section(df: pd.DataFrame, cols: Iterable[tuple[str, str]]) -> dict:
    rates = {}
    for col, key in cols:
        if col in df:
            v = pd.to_numeric(df[col], errors="coerce")
            if v.notna().any():
                rates[key] = float(v.mean())
    return {"n": int(len(df)), "rates": rates}


def world_profile(frames: dict[str, pd.DataFrame], batch: str = "", checked_at: str = "") -> dict:
    """The profile of an accepted batch: what the next batch's distribution checks compare
    with (per-type action shares, label rates, row counts, surface mix)."""
    prof: dict[str, Any] = {"version": PROFILE_VERSION, "batch": batch, "checked_at": checked_at,
                            "rows": {t: int(len(df)) for t, df in frames.items()}}
    if "actions" in frames:
        prof["actions"] = _rate_section(frames["actions"], [(f"has_{a}", a) for a in S.EXPLICIT_ACTIONS])
    for t in ("requests", ROWS_TABLE):
        if t in frames:
            prof[t] = _rate_section(frames[t], [(c, c) for c in S.LABEL_COLUMNS])
    for t, df in frames.items():
        if "surface" in df and len(df) and t in prof:
            share = df["surface"].value_counts(normalize=True)
            prof[t]["surface_share"] = {S.SURFACES[int(k)] if 0 <= k < len(S.SURFACES) else str(k): float(v)
                                        for k, v in share.items() if pd.notna(k)}
    return prof


def load_reference(reference: str | os.PathLike | dict | None) -> tuple[dict | None, str]:
    """(profile or None, a note saying where it came from)."""
    if reference is None or reference == "":
        return None, "none (distribution checks skipped)"
    if isinstance(reference, dict):
        return reference, "given as a dict"
    path = Path(reference)
    if not path.exists():
        return None, f"none: {path} does not exist yet (distribution checks skipped; written on pass)"
    try:
        ref = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"reference {path}: not valid JSON ({e})") from None
    if not isinstance(ref, dict) or ref.get("version") != PROFILE_VERSION:
        raise ValueError(f"reference {path}: not a validation profile (version {PROFILE_VERSION})")
    return ref, f"{path} (batch {ref.get('batch') or '?'}, checked {ref.get('checked_at') or '?'})"

