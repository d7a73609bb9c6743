"""Event times: ``ts`` is int64 milliseconds since the Unix epoch, UTC. What a person
types (an ISO date, epoch ms) becomes that here, and ms become a readable date here."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def to_epoch_ms(value: Any, what: str = "time") -> int:
    """epoch ms from an int/float (already ms), a string of digits (ms), an ISO-8601 date
    or time (naive = UTC; ``Z`` accepted) or a datetime. ``what`` names the option in errors."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a time, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return to_epoch_ms(value.item(), what)
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        try:
            return to_epoch_ms(datetime.fromisoformat(s.replace("Z", "+00:00")), what)
        except ValueError:
            raise ValueError(f"{what}: cannot read {value!r} (an ISO-8601 date/time or epoch "
                             f"milliseconds)") from None
    raise ValueError(f"{what}: unsupported value {value!r}")


def iso_utc(ms: int) -> str:
    """``2026-12-02 22:17:07 UTC`` for epoch ms (times past the calendar say so)."""
    try:
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms (outside the calendar)"
