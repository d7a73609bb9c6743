"""Shipping the served log to the storage root: sealed files leave the serving pod's disk.

The served log (:mod:`transact.serving.served_log`) is the next training set and the monitor's
input; on a cluster the serving pod's disk goes with the pod. Its writer seals each
``served-*.parquet`` file with a rename, so a sealed file never changes: those ship (files being
written, ``*.tmp-*``, and the write-ahead segments stay). For each sealed file, oldest first:

1. **report**: one line in ``<log_dir>/shipped.jsonl`` (file, rows, bytes, sha256, where), and the log;
2. **copy**: one PUT to ``<location>/<source>/<file>`` (an object appears whole or not at all);
3. **verify**: the object's bytes read back have the local file's size and sha256;
4. **delete** the local file.

A kill at any point leaves the file local (the next pass ships it again: same name, same bytes)
or shipped and verified; never neither. ``source`` names the server (default: the host name,
a pod's name on Kubernetes), so replicas never write the same object.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from transact.data import storage

log = logging.getLogger("transact.serving")

LEDGER = "shipped.jsonl"


def sealed_files(log_dir: str | Path) -> list[Path]:
    """The served-log files the writer has sealed, oldest first (names carry the UTC stamp)."""
    return sorted(p for p in Path(log_dir).glob("served-*.parquet") if p.is_file())


def ship_served(log_dir: str | Path, location: str, source: str | None = None) -> dict:
    """Ships every sealed file of ``log_dir`` to ``<location>/<source>/`` (module docstring).
    Returns {"files", "rows", "bytes", "to"}."""
    log_dir = Path(log_dir)
    source = source or socket.gethostname()
    to = storage.join(location, source)
    counts = {"files": 0, "rows": 0, "bytes": 0}
    for path in sealed_files(log_dir):
        rows = pq.ParquetFile(path).metadata.num_rows
        digest = storage.sha256_file(path)
        size = path.stat().st_size
        target = storage.join(to, path.name)
        record = {"file": path.name, "rows": rows, "bytes": size, "sha256": digest, "to": target,
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(log_dir / LEDGER, "a") as ledger:
            ledger.write(json.dumps(record) + "\n")
        log.info("shipping %s (%d rows, %d bytes) to %s", path.name, rows, size, target)
        storage.put_file(path, target)
        got = storage.sha256_of(target)
        if got != (size, digest):
            raise RuntimeError(f"{target}: {got[0]} bytes, sha256 {got[1][:12]}… after the copy of {path} "
                               f"({size} bytes, {digest[:12]}…); the local file is kept")
        path.unlink()
        counts["files"] += 1
        counts["rows"] += rows
        counts["bytes"] += size
    return {**counts, "to": to}


class Shipper:
    """Ships the served log every ``every_s`` seconds on a background thread; :meth:`close`
    runs a last pass (call it after the writer's ``close()``, so its last file ships too)."""

    def __init__(self, log_dir: str | Path, location: str, every_s: float = 60.0, source: str | None = None):
        self.log_dir, self.location, self.every_s, self.source = Path(log_dir), location, every_s, source
        self.shipped = {"files": 0, "rows": 0, "bytes": 0}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="served-log-shipper", daemon=True)
        self._thread.start()

    def ship_now(self) -> dict:
        with self._lock:
            done = ship_served(self.log_dir, self.location, self.source)
            for k in self.shipped:
                self.shipped[k] += done[k]
            return done

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.ship_now()
            except Exception:  # storage down: the files stay local, the next pass retries
                log.exception("shipping the served log to %s failed; the files stay in %s", self.location,
                              self.log_dir)

    def close(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.ship_now()
