"""The model registry: every promoted model, the champion and its history, at one location (a
local folder or an object-store URI) that outlives the pods that wrote it.

    <root>/models/<model_id>/            config.json, model.safetensors, MANIFEST.json (written last)
    <root>/champion/<generation>.json    one record per change of champion (00000001.json, ...), never rewritten
    <root>/bentos/<tag>.bento/           the serving bundle of a champion (serving.packaging)

``model_id = <model name>-<first 16 hex digits of the model digest>``: the same weights are one model.

The champion is the record with the highest generation. Changing it -- a promotion or a
rollback -- is one **create-only write** of generation g+1 by a writer that read generation g:
an ``If-None-Match: *`` conditional PUT on S3 (``ifGenerationMatch=0`` on GCS, ``O_EXCL`` through
a hard link on a local disk). Of two pipeline runs that both gated against generation g, exactly
one writes g+1; the other gets :class:`ChampionMoved`, naming the new champion, and gates again
against it (:func:`transact.components.steps.promote`).

A conditional write, not a lease: a lease needs clocks and an expiry, and a promoter that dies
holding one blocks every run until it expires; a create-only write holds nothing. Records are
never overwritten, so every record keeps the model it replaced (``previous``): :meth:`Registry.rollback`
writes generation g+1 naming it (or a model given by id). A model is published -- files first,
manifest last -- before the record that names it, so no record names a model that is not all there.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from transact.data import storage

MODELS = "models"
CHAMPION = "champion"
BENTOS = "bentos"
_GENERATION = "{:08d}.json"


class ChampionMoved(RuntimeError):
    """The champion changed after this writer read it (another run promoted or rolled back)."""

    def __init__(self, expected: int, current: ChampionRecord | None):
        self.expected, self.current = expected, current
        now = f"generation {current.generation} ({current.model_id}, {current.action})" if current else "none"
        super().__init__(f"the champion moved: expected generation {expected}, now {now}; gate against it again")


@dataclass(frozen=True)
class ChampionRecord:
    """One change of champion: which model, why, against what it was judged, where it came from."""

    generation: int
    model_id: str
    action: str  #: "promote" or "rollback"
    previous: str | None  #: the model it replaced (the rollback target)
    metrics: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)  #: world, rows, run id, project version, ...
    at: str = ""
    writer: str = ""  #: a nonce of the write: a retried PUT that did land is recognised as ours

    @classmethod
    def from_dict(cls, d: dict) -> ChampionRecord:
        return cls(**{k: d[k] for k in ("generation", "model_id", "action", "previous")},
                   metrics=d.get("metrics", {}), lineage=d.get("lineage", {}), at=d.get("at", ""),
                   writer=d.get("writer", ""))


def model_id(model_dir: str | Path) -> str:
    from transact.model.checkpoint import model_digest, read_config  # torch: only when a model is handled

    name = read_config(model_dir)["model_config"].get("name") or "model"
    return f"{name}-{model_digest(model_dir)[:16]}"


class Registry:
    """The registry at ``root`` (module docstring); every method reads what is there now."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        if not self.root:
            raise ValueError("registry: a location is needed (a folder or an object-store URI)")

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    # --- models ----------------------------------------------------------------------------
    def model_location(self, model: str) -> str:
        return storage.join(self.root, MODELS, model)

    def publish_model(self, model_dir: str | Path, lineage: dict | None = None) -> str:
        """Publishes the model's files (not its training state); returns its id. Idempotent."""
        from transact.model.checkpoint import MODEL_FILES

        mid = model_id(model_dir)
        storage.publish_tree(model_dir, self.model_location(mid), meta={"model_id": mid, **(lineage or {})},
                             only=MODEL_FILES)
        return mid

    def fetch_model(self, model: str, dest: str | Path) -> Path:
        """The model's files in the local folder ``dest`` (every byte checked against its manifest)."""
        storage.fetch_tree(self.model_location(model), dest)
        return Path(dest)

    # --- the champion ----------------------------------------------------------------------
    def _records(self) -> list[str]:
        """The record names, oldest first (a local writer's temporary files are not records)."""
        return sorted(n for n in storage.listdir(storage.join(self.root, CHAMPION))
                      if n.endswith(".json") and n[:-5].isdigit())

    def _read(self, name: str) -> ChampionRecord:
        return ChampionRecord.from_dict(storage.read_json(storage.join(self.root, CHAMPION, name)))

    def history(self) -> list[ChampionRecord]:
        """Every record, oldest first."""
        return [self._read(n) for n in self._records()]

    def champion(self) -> ChampionRecord | None:
        names = self._records()
        return self._read(names[-1]) if names else None

    def promote(self, model_dir: str | Path, metrics: dict, lineage: dict | None = None,
                expected: int | None = None) -> ChampionRecord:
        """Publishes the model and makes it the champion, if the champion is still generation
        ``expected`` (the one the model was gated against; 0: none yet; None: whatever it is)."""
        mid = self.publish_model(model_dir, lineage)
        return self._change(mid, "promote", metrics, lineage or {}, expected)

    def rollback(self, to: str | None = None, expected: int | None = None) -> ChampionRecord:
        """Makes ``to`` (default: the model the current champion replaced) the champion again."""
        current = self.champion()
        if current is None:
            raise ValueError(f"{self.root}: no champion yet, nothing to roll back")
        target = to or current.previous
        if target is None:
            raise ValueError(f"{self.root}: the champion {current.model_id} replaced no model; "
                             "name one with --to (see `transact model history`)")
        if target == current.model_id:
            raise ValueError(f"{self.root}: {target} is already the champion")
        storage.read_manifest(self.model_location(target))  # Unpublished when no such model
        judged = next((r for r in reversed(self.history()) if r.model_id == target), None)
        return self._change(target, "rollback", judged.metrics if judged else {},
                            {"rolled_back_from": current.model_id}, current.generation if expected is None else expected)

    def _change(self, mid: str, action: str, metrics: dict, lineage: dict, expected: int | None) -> ChampionRecord:
        current = self.champion()
        if action == "promote" and current is not None and current.model_id == mid:
            return current  # promoted already (a retried step): the same answer, no second record
        generation = current.generation if current else 0
        if expected is not None and expected != generation:
            raise ChampionMoved(expected, current)
        storage.check_exclusive_writes(self.root)
        record = ChampionRecord(generation=generation + 1, model_id=mid, action=action,
                                previous=current.model_id if current else None, metrics=metrics, lineage=lineage,
                                at=datetime.now(UTC).isoformat(timespec="seconds"), writer=uuid.uuid4().hex)
        name = _GENERATION.format(record.generation)
        try:
            storage.write_bytes(storage.join(self.root, CHAMPION, name),
                                json.dumps(asdict(record), indent=2, default=str).encode(), exclusive=True)
        except FileExistsError:  # another writer took generation + 1 first -- or our own PUT did, retried
            if self._read(name).writer == record.writer:
                return record
            raise ChampionMoved(generation, self.champion()) from None
        return record
