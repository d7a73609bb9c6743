"""Service settings: one table, read from ``TRANSACT_*`` environment variables.

Each setting is declared once, as a field of :class:`ServeSettings`: its default, its
variable, its parser (bounds included) and how it is written back
(:func:`setting`). :meth:`ServeSettings.from_env` and :meth:`ServeSettings.to_env` are
both derived from those fields, and constructing a ``ServeSettings`` checks every value
with the same parsers, so ``transact serve`` and a worker refuse the same values with the
same one-line message naming the variable.

The environment is the channel into a BentoML worker process (a server started by
:mod:`transact.serving.launch` gets ``to_env()`` as its environment, a bento gets its
bentofile ``envs``, a container its ``-e``); the service reads it once, in
``TransActRanker.__init__``, and passes the object down. A bad value leaves that worker
alive and unready with the message (``/readyz`` 503, ``/rank`` 503 naming it).

| variable | default | meaning |
|---|---|---|
| TRANSACT_MODEL_TAG | transact-ranker:latest | model in the BentoML model store (a built bento sets the tag it carries) |
| TRANSACT_WORLD | (none) | world folder: sequences + item table from its parquet events |
| TRANSACT_FEAST_REPO | (none) | Feast repo: sequences + items from the online store |
| TRANSACT_SOURCE | (none) | the same in one variable: ``world:<folder>`` or ``feast:<repo>`` (what a bento is given) |
| TRANSACT_DEVICE | (none: cuda if available, else cpu) | torch device |
| TRANSACT_THREADS | (none: the torch default) | torch intra-op threads (0: the torch default) |
| TRANSACT_SCORE_WEIGHTS | (none: click=1,repin=1,hide=-1 for the heads the model has) | S = sum_h w_h f_h (heads absent get 0) |
| TRANSACT_MAX_CANDIDATES | 1024 | candidates per request (larger -> 400); at most 32767 |
| TRANSACT_MAX_BODY_BYTES | 4194304 | request body limit (larger -> 413) |
| TRANSACT_MAX_BATCH_CANDIDATES | 2048 | candidates per cross-request micro-batch (raised to MAX_CANDIDATES) |
| TRANSACT_MAX_WAIT_MS | 0 | extra wait to grow a batch (0: batch what is queued) |
| TRANSACT_MAX_QUEUE | 64 | queued requests before 503 (load shedding) |
| TRANSACT_REQUEST_TIMEOUT_S | 30 | queue + compute deadline per request (-> 503); at most 600 |
| TRANSACT_MAX_CLOCK_SKEW_S | 300 | client ``request_ts`` further from the server clock: 400; ``off`` trusts it |
| TRANSACT_API_KEY | (none) | when set, /rank needs header ``X-API-Key`` |
| TRANSACT_LOG_DIR | (none) | served NN-feature log folder (off when unset) |
| TRANSACT_LOG_QUEUE_ROWS | 32768 | bounded log queue; rows beyond are dropped and counted |
| TRANSACT_LOG_FLUSH_ROWS | 8192 | rows per parquet file |
| TRANSACT_LOG_FLUSH_S | 5 | max seconds a row waits before its file is written |
| TRANSACT_LOG_SHIP_TO | (none) | where sealed log files move to (``<storage_root>/served``, a URI); needs the log dir |
| TRANSACT_LOG_SHIP_S | 60 | seconds between shipping passes (and one at shutdown) |
| TRANSACT_ASSEMBLY | dedup | ``naive`` broadcasts sequences per candidate (benchmark only) |
| TRANSACT_CUDA_GRAPHS | 1 | CUDA graphs for the model forward on GPU |
| TRANSACT_CPU_FORWARD | compile | CPU model forward: ``onnxruntime``, ``compile`` (torch.compile) or ``eager`` |

The bind address is not a setting of the service: it is BentoML's (``bentoml serve --host
--port``, or ``BENTOML_HOST`` / ``BENTOML_PORT``; ``transact serve --host --port``), and
the service's own default is loopback, 127.0.0.1:3000 (:data:`DEFAULT_HOST`).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL_NAME = "transact-ranker"
DEFAULT_MODEL_TAG = f"{DEFAULT_MODEL_NAME}:latest"
API_KEY_HEADER = "X-API-Key"
ASSEMBLIES = ("dedup", "naive")
#: CPU model forward backends (see :class:`transact.serving.device.ModelRunner`).
CPU_FORWARDS = ("onnxruntime", "compile", "eager")
#: The CPU forward of the service (the ``cpu_forward`` default of the Ranker and the ModelRunner too).
DEFAULT_CPU_FORWARD = "compile"
#: Where the service binds unless told otherwise (``bentoml serve --host/--port``).
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 3000
#: Bound on TRANSACT_REQUEST_TIMEOUT_S: BentoML's own per-request timeout (the service's
#: ``traffic`` setting, fixed when the class is defined) is this plus a margin, so the
#: service's deadline (a 503 naming it) always comes first.
MAX_REQUEST_TIMEOUT_S = 600.0
#: Positions are int16 in the served-row format.
MAX_CANDIDATES_LIMIT = 32_767


@dataclass(frozen=True)
class Setting:
    """One row of the table: the variable, its parser and how a value is written back.

    ``parse(text, name)`` returns the value or raises a one-line ValueError naming ``name``;
    ``show(value)`` is the text ``parse`` reads back (``None`` for "unset": the variable
    is left out).
    """

    env: str
    parse: Callable[[str, str], Any]
    show: Callable[[Any], str | None]


def setting(default: Any, env: str, parse: Callable[[str, str], Any],
            show: Callable[[Any], str | None] | None = None) -> Any:
    """A :class:`ServeSettings` field: its default and its row of the table."""
    return field(default=default, metadata={"setting": Setting(env, parse, show or _show_text)})


# --- parsers (text -> value) and writers (value -> text) -----------------------------------------

def _show_text(v: Any) -> str | None:
    return None if v is None else str(v)


def _show_number(v: float | int | None) -> str | None:
    if v is None:
        return None
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _text(raw: str, name: str) -> str:
    return raw


def _local_folder(raw: str, name: str) -> str:
    """A local folder: ``file://`` unwrapped, an object-store URI refused naming the variable
    (this service reads its world, Feast repo and log folder from local paths)."""
    from transact.data.storage import local_path

    return str(local_path(raw, name))


def _location(raw: str, name: str) -> str:
    """A folder or an object-store URI (the served log's shipping target): kept as given."""
    if not raw.strip():
        raise ValueError(f"{name}: a folder or an object-store URI is needed")
    return raw


def _integer(lo: int, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(raw: str, name: str) -> int:
        try:
            v = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name}={v} must be >= {lo}" + (f" and <= {hi:g}" if hi is not None else ""))
        return v
    return parse


def _number(lo: float, hi: float | None = None) -> Callable[[str, str], float]:
    def parse(raw: str, name: str) -> float:
        try:
            v = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if not (lo <= v < float("inf")) or (hi is not None and v > hi):
            raise ValueError(f"{name}={raw} must be a finite number >= {lo:g}"
                             + (f" and <= {hi:g}" if hi is not None else ""))
        return v
    return parse


def _choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(raw: str, name: str) -> str:
        if raw not in options:
            raise ValueError(f"{name}={raw!r}: choose one of {options}")
        return raw
    return parse


def _threads(raw: str, name: str) -> int | None:
    return _integer(0)(raw, name) or None  # 0: the torch default


def _flag(raw: str, name: str) -> bool:
    return raw.lower() not in ("0", "false", "no")


def _show_flag(v: bool) -> str:
    return "1" if v else "0"


def _weights(raw: str, name: str) -> dict[str, float] | None:
    from transact.model.metrics import parse_score_weights

    try:
        return parse_score_weights(raw)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _show_weights(v: dict[str, float] | None) -> str | None:
    return None if not v else ",".join(f"{k}={_show_number(w)}" for k, w in v.items())


def parse_clock_skew(raw: str, name: str = "TRANSACT_MAX_CLOCK_SKEW_S") -> float | None:
    """Seconds > 0, or ``off`` (None: client times are trusted). 0 is refused: it reads both
    as "no skew allowed" (every client time refused) and as "no check", so neither is guessed."""
    if raw.strip().lower() == "off":
        return None
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (0 < v < float("inf")):
        raise ValueError(f"{name}={raw!r} must be a number of seconds > 0, or off to trust client times")
    return v


def _show_skew(v: float | None) -> str:
    return "off" if v is None else str(_show_number(v))


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings; every field is one row of the module's table."""

    model_tag: str = setting(DEFAULT_MODEL_TAG, "TRANSACT_MODEL_TAG", _text)
    world: str | None = setting(None, "TRANSACT_WORLD", _local_folder)
    feast_repo: str | None = setting(None, "TRANSACT_FEAST_REPO", _local_folder)
    device: str | None = setting(None, "TRANSACT_DEVICE", _text)
    threads: int | None = setting(None, "TRANSACT_THREADS", _threads)
    score_weights: dict[str, float] | None = setting(None, "TRANSACT_SCORE_WEIGHTS", _weights, _show_weights)
    max_candidates: int = setting(1024, "TRANSACT_MAX_CANDIDATES", _integer(1, MAX_CANDIDATES_LIMIT))
    max_body_bytes: int = setting(4 << 20, "TRANSACT_MAX_BODY_BYTES", _integer(1024))
    max_batch_candidates: int = setting(2048, "TRANSACT_MAX_BATCH_CANDIDATES", _integer(1))
    max_wait_ms: float = setting(0.0, "TRANSACT_MAX_WAIT_MS", _number(0.0), _show_number)
    max_queue: int = setting(64, "TRANSACT_MAX_QUEUE", _integer(1))
    request_timeout_s: float = setting(30.0, "TRANSACT_REQUEST_TIMEOUT_S", _number(0.001, MAX_REQUEST_TIMEOUT_S),
                                       _show_number)
    #: Bound on |client request_ts - server clock| in seconds; None trusts the client.
    max_clock_skew_s: float | None = setting(300.0, "TRANSACT_MAX_CLOCK_SKEW_S", parse_clock_skew, _show_skew)
    api_key: str | None = dataclasses.field(default=None, repr=False,
                                            metadata={"setting": Setting("TRANSACT_API_KEY", _text, _show_text)})
    log_dir: str | None = setting(None, "TRANSACT_LOG_DIR", _local_folder)
    log_queue_rows: int = setting(32_768, "TRANSACT_LOG_QUEUE_ROWS", _integer(1))
    log_flush_rows: int = setting(8192, "TRANSACT_LOG_FLUSH_ROWS", _integer(1))
    log_flush_s: float = setting(5.0, "TRANSACT_LOG_FLUSH_S", _number(0.01), _show_number)
    #: where sealed served-log files go (the storage root's ``served/``); None: they stay in log_dir
    log_ship_to: str | None = setting(None, "TRANSACT_LOG_SHIP_TO", _location)
    log_ship_s: float = setting(60.0, "TRANSACT_LOG_SHIP_S", _number(0.01), _show_number)
    assembly: str = setting("dedup", "TRANSACT_ASSEMBLY", _choice(ASSEMBLIES))
    cuda_graphs: bool = setting(True, "TRANSACT_CUDA_GRAPHS", _flag, _show_flag)
    cpu_forward: str = setting(DEFAULT_CPU_FORWARD, "TRANSACT_CPU_FORWARD", _choice(CPU_FORWARDS))

    def __post_init__(self) -> None:
        # every value as the worker would read it: the same parser, the same one-line error
        for f, s in _table():
            value = getattr(self, f.name)
            text = s.show(value)
            if text is not None:
                parsed = s.parse(text, s.env)
                if isinstance(value, str) and parsed != value:  # file:///x -> /x, as the worker reads it
                    object.__setattr__(self, f.name, parsed)
        if self.log_ship_to and not self.log_dir:
            raise ValueError("TRANSACT_LOG_SHIP_TO: shipping the served log needs TRANSACT_LOG_DIR (--log-dir)")
        if self.max_batch_candidates < self.max_candidates:  # a request always fits a batch
            object.__setattr__(self, "max_batch_candidates", self.max_candidates)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        """The settings in ``environ`` (default: this process's environment); unset or empty
        variables keep their default. ``TRANSACT_SOURCE`` stands for TRANSACT_WORLD or
        TRANSACT_FEAST_REPO."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f, s in _table():
            raw = _get(env, s.env)
            if raw is not None:
                values[f.name] = s.parse(raw, s.env)
        source = _get(env, "TRANSACT_SOURCE")
        if source is not None:
            kind, _, where = source.partition(":")
            if kind not in ("world", "feast") or not where:
                raise ValueError(f"TRANSACT_SOURCE={source!r}: write world:<folder> or feast:<repo>")
            if values.get("world") or values.get("feast_repo"):
                raise ValueError("TRANSACT_SOURCE and TRANSACT_WORLD/TRANSACT_FEAST_REPO are both set: keep one")
            values["world" if kind == "world" else "feast_repo"] = _local_folder(where, "TRANSACT_SOURCE")
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings (for a server process):
        ``from_env(s.to_env()) == s``."""
        out = {}
        for f, s in _table():
            text = s.show(getattr(self, f.name))
            if text is not None:
                out[s.env] = text
        return out

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Field name -> its environment variable."""
        return {f.name: s.env for f, s in _table()}


def _get(env: Mapping[str, str], name: str) -> str | None:
    v = env.get(name)
    return None if v is None or v.strip() == "" else v.strip()


def _table() -> list[tuple[dataclasses.Field, Setting]]:
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(ServeSettings)]


def read_setting(name: str, environ: Mapping[str, str] | None = None, fallback: bool = False) -> Any:
    """One setting from the environment (its default when unset), parsed by its row of the
    table: for what must be known when a module is imported (the request schema states
    TRANSACT_MAX_CANDIDATES). ``fallback``: a bad value gives the default instead of raising
    -- an import must not fail (BentoML would restart the worker in a loop); the service's
    ``__init__`` reads the same value and reports it, unready, in one line."""
    f = next(f for f in dataclasses.fields(ServeSettings) if f.name == name)
    s: Setting = f.metadata["setting"]
    raw = _get(os.environ if environ is None else environ, s.env)
    if raw is None:
        return f.default
    try:
        return s.parse(raw, s.env)
    except ValueError:
        if fallback:
            return f.default
        raise
