"""Paths a user gives: a local path, a ``file://`` URI, or an object-store URI -- never confused.

``pathlib.Path("s3://bucket/world")`` is the *local* path ``s3:/bucket/world``: code that takes
a URI as a path writes a folder named ``s3:`` in the working directory and reports success,
and the bucket stays empty. Every path that reaches the system from a person (the CLI's
options, pipeline parameters, the service's settings) goes through :func:`local_path` first:

    "runs/w", "/abs/w"              -> that local path
    "file:///abs/w"                  -> /abs/w
    "s3://b/w", "gs://b/w", ...      -> ObjectStoreURI (a ValueError naming the setting): this
                                        code path reads and writes local files only
    "s3:/b/w" (a URI after Path())   -> the same refusal: a local folder named "s3:" is never meant

A scheme is two or more letters (``C:/x`` stays a Windows drive path).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

#: ``scheme:/`` at the start: a URI, or one that ``Path()`` folded to a single slash
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/")


class ObjectStoreURI(ValueError):
    """An object-store URI where this code path needs a local one (one line, names the setting)."""


def uri_scheme(value: str | os.PathLike) -> str | None:
    """The URI scheme of ``value`` (lower case), or None for a plain path."""
    m = _URI.match(os.fspath(value))
    return m.group("scheme").lower() if m else None


def local_path(value: str | os.PathLike, setting: str = "path") -> Path:
    """``value`` as a local :class:`~pathlib.Path` (``file://`` URIs unwrapped); an object-store
    URI raises :class:`ObjectStoreURI` naming ``setting`` -- before anything is written."""
    text = os.fspath(value)
    scheme = uri_scheme(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        parsed = urlparse(text if "://" in text else text.replace(":/", ":///", 1))
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{setting}: {text} names another host; a file:// URI must be local")
        return Path(unquote(parsed.path))
    shown = text if "://" in text else text.replace(":/", "://", 1)
    raise ObjectStoreURI(f"{setting}: {shown} is an object-store URI; this reads and writes local paths only, "
                         "so nothing was written -- give a local path or a file:// URI")
