"""The one writer of every benchmark: an aligned text table and a JSON file naming the
machine it ran on.

- :func:`format_table`: rows (dicts) -> plain aligned text, floats to 3 decimals;
- :func:`write_json`: a result dict plus ``machine`` (:func:`transact.bench.machine.machine_info`)
  and ``device``, written atomically;
- :func:`default_output` / :func:`device_slug`: ``bench/results/<name>-<device>.json``;
- :func:`pct_change`: the relative change columns of the paper's tables.
"""
from __future__ import annotations

import json
import re
from pathlib import Path


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Plain aligned text: one header line, one line per row; floats to 3 decimals."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def write_json(path: str | Path, result: dict) -> Path:
    """Writes ``result`` plus ``machine`` (:func:`transact.bench.machine.machine_info`) as JSON,
    atomically; ``device`` defaults to :func:`~transact.bench.machine.device_label`."""
    from transact.bench.machine import device_label, machine_info

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**result, "device": result.get("device") or device_label(), "machine": machine_info()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def device_slug() -> str:
    """Short file-name tag of the device: the GPU's name, or ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def default_output(name: str) -> Path:
    return Path("bench/results") / f"{name}-{device_slug()}.json"


def pct_change(new: float | None, base: float | None) -> float | None:
    """Relative change in percent (negative = decrease), as in the paper's Table 5."""
    if new is None or base is None or base == 0:
        return None
    return 100.0 * (new - base) / base
