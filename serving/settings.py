"""Service settings, read from ``TRANSACT_*`` environment variables.

The BentoML server imports the service module in its own worker process, so the
environment is the one channel that reaches it from ``transact serve``, a test, a
bento's ``envs`` or a container. Every value has a safe default; a bad value fails at
start-up with a message naming the variable (never at request time).

| variable | default | meaning |
|---|---|---|
| TRANSACT_MODEL_TAG | transact-ranker:latest | model in the BentoML model store |
| TRANSACT_WORLD | (none) | world folder: sequences + item table from its parquet events |
| TRANSACT_FEAST_REPO | (none) | Feast repo: sequences + items from the online store |
| TRANSACT_SOURCE | (none) | the same in one variable: ``world:<folder>`` or ``feast:<repo>`` (the bento requires it) |
| TRANSACT_DEVICE | cuda if available else cpu | torch device |
| TRANSACT_THREADS | (torch default) | torch intra-op threads |
| TRANSACT_SCORE_WEIGHTS | click=1,repin=1,hide=-1 | S = sum_h w_h f_h (heads absent get 0) |
| TRANSACT_MAX_CANDIDATES | 1024 | candidates per request (larger -> 400) |
| TRANSACT_MAX_BODY_BYTES | 4194304 | request body limit (larger -> 413) |
| TRANSACT_MAX_BATCH_CANDIDATES | 2048 | candidates per cross-request micro-batch |
| TRANSACT_MAX_WAIT_MS | 0 | extra wait to grow a batch (0: batch what is queued) |
| TRANSACT_MAX_QUEUE | 64 | queued requests before 503 (load shedding) |
| TRANSACT_REQUEST_TIMEOUT_S | 30 | queue + compute deadline per request (-> 503) |
| TRANSACT_MAX_CLOCK_SKEW_S | 300 | client ``request_ts`` further from the server clock: 400; ``off`` trusts it |
| TRANSACT_API_KEY | (none) | when set, /rank needs header ``X-API-Key`` |
| TRANSACT_LOG_DIR | (none) | served NN-feature log folder (off when unset) |
| TRANSACT_LOG_QUEUE_ROWS | 32768 | bounded log queue; rows beyond are dropped and counted |
| TRANSACT_LOG_FLUSH_ROWS | 8192 | rows per parquet file |
| TRANSACT_LOG_FLUSH_S | 5 | max seconds a row waits before its file is written |
| TRANSACT_ASSEMBLY | dedup | ``naive`` broadcasts sequences per candidate (benchmark only) |
| TRANSACT_CUDA_GRAPHS | 1 | CUDA graphs for the model forward on GPU |
| TRANSACT_CPU_FORWARD | compile | CPU model forward: ``onnxruntime``, ``compile`` (torch.compile) or ``eager`` |
| TRANSACT_HOST / TRANSACT_PORT | 127.0.0.1 / 3000 | default bind address of the service |
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

DEFAULT_MODEL_NAME = "transact-ranker"
DEFAULT_MODEL_TAG = f"{DEFAULT_MODEL_NAME}:latest"
API_KEY_HEADER = "X-API-Key"
ASSEMBLIES = ("dedup", "naive")
#: CPU model forward backends (see :class:`transact.serving.device.ModelRunner`).
CPU_FORWARDS = ("onnxruntime", "compile", "eager")


def _env(name: str, default=None):
    v = os.environ.get(name)
    return default if v is None or v.strip() == "" else v.strip()


def _int(name: str, default: int, lo: int = 0) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if v < lo:
        raise ValueError(f"{name}={v} must be >= {lo}")
    return v


def _float(name: str, default: float, lo: float = 0.0) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not (v >= lo) or v != v or v == float("inf"):
        raise ValueError(f"{name}={v} must be a finite number >= {lo}")
    return v


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


def _source() -> tuple[str | None, str | None]:
    """(world, feast repo) from TRANSACT_WORLD / TRANSACT_FEAST_REPO or TRANSACT_SOURCE."""
    world, repo, source = _env("TRANSACT_WORLD"), _env("TRANSACT_FEAST_REPO"), _env("TRANSACT_SOURCE")
    if source is None:
        return world, repo
    kind, _, where = source.partition(":")
    if kind not in ("world", "feast") or not where:
        raise ValueError(f"TRANSACT_SOURCE={source!r}: write world:<folder> or feast:<repo>")
    if world or repo:
        raise ValueError("TRANSACT_SOURCE and TRANSACT_WORLD/TRANSACT_FEAST_REPO are both set: keep one")
    return (where, None) if kind == "world" else (None, where)


@dataclass(frozen=True)
class ServeSettings:
    model_tag: str = DEFAULT_MODEL_TAG
    world: str | None = None
    feast_repo: str | None = None
    device: str | None = None
    threads: int | None = None
    score_weights: dict[str, float] | None = None
    max_candidates: int = 1024
    max_body_bytes: int = 4 << 20
    max_batch_candidates: int = 2048
    max_wait_ms: float = 0.0
    max_queue: int = 64
    request_timeout_s: float = 30.0
    #: Bound on |client request_ts - server clock| in seconds; None trusts the client.
    max_clock_skew_s: float | None = 300.0
    api_key: str | None = field(default=None, repr=False)
    log_dir: str | None = None
    log_queue_rows: int = 32_768
    log_flush_rows: int = 8192
    log_flush_s: float = 5.0
    assembly: str = "dedup"
    cuda_graphs: bool = True
    cpu_forward: str = "compile"
    host: str = "127.0.0.1"
    port: int = 3000

    @classmethod
    def from_env(cls) -> "ServeSettings":
        from transact.model.metrics import parse_score_weights

        assembly = _env("TRANSACT_ASSEMBLY", "dedup")
        if assembly not in ASSEMBLIES:
            raise ValueError(f"TRANSACT_ASSEMBLY={assembly!r}: choose one of {ASSEMBLIES}")
        cpu_forward = _env("TRANSACT_CPU_FORWARD", cls.cpu_forward)
        if cpu_forward not in CPU_FORWARDS:
            raise ValueError(f"TRANSACT_CPU_FORWARD={cpu_forward!r}: choose one of {CPU_FORWARDS}")
        threads = _int("TRANSACT_THREADS", 0, lo=0)
        world, feast_repo = _source()
        s = cls(
            model_tag=_env("TRANSACT_MODEL_TAG", DEFAULT_MODEL_TAG),
            world=world,
            feast_repo=feast_repo,
            device=_env("TRANSACT_DEVICE"),
            threads=threads or None,
            score_weights=parse_score_weights(_env("TRANSACT_SCORE_WEIGHTS")),
            max_candidates=_int("TRANSACT_MAX_CANDIDATES", cls.max_candidates, lo=1),
            max_body_bytes=_int("TRANSACT_MAX_BODY_BYTES", cls.max_body_bytes, lo=1024),
            max_batch_candidates=_int("TRANSACT_MAX_BATCH_CANDIDATES", cls.max_batch_candidates, lo=1),
            max_wait_ms=_float("TRANSACT_MAX_WAIT_MS", cls.max_wait_ms),
            max_queue=_int("TRANSACT_MAX_QUEUE", cls.max_queue, lo=1),
            request_timeout_s=_float("TRANSACT_REQUEST_TIMEOUT_S", cls.request_timeout_s, lo=0.001),
            max_clock_skew_s=(cls.max_clock_skew_s if _env("TRANSACT_MAX_CLOCK_SKEW_S") is None
                              else parse_clock_skew(_env("TRANSACT_MAX_CLOCK_SKEW_S"))),
            api_key=_env("TRANSACT_API_KEY"),
            log_dir=_env("TRANSACT_LOG_DIR"),
            log_queue_rows=_int("TRANSACT_LOG_QUEUE_ROWS", cls.log_queue_rows, lo=1),
            log_flush_rows=_int("TRANSACT_LOG_FLUSH_ROWS", cls.log_flush_rows, lo=1),
            log_flush_s=_float("TRANSACT_LOG_FLUSH_S", cls.log_flush_s, lo=0.01),
            assembly=assembly,
            cuda_graphs=_env("TRANSACT_CUDA_GRAPHS", "1") not in ("0", "false", "no"),
            cpu_forward=cpu_forward,
            host=_env("TRANSACT_HOST", cls.host),
            port=_int("TRANSACT_PORT", cls.port, lo=1),
        )
        if s.max_candidates > 32_767:
            raise ValueError("TRANSACT_MAX_CANDIDATES must be <= 32767 (positions are int16 in the row format)")
        if s.max_batch_candidates < s.max_candidates:
            s = dataclasses.replace(s, max_batch_candidates=s.max_candidates)
        return s

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings (for a server process)."""
        out = {
            "TRANSACT_MODEL_TAG": self.model_tag,
            "TRANSACT_MAX_CANDIDATES": str(self.max_candidates),
            "TRANSACT_MAX_BODY_BYTES": str(self.max_body_bytes),
            "TRANSACT_MAX_BATCH_CANDIDATES": str(self.max_batch_candidates),
            "TRANSACT_MAX_WAIT_MS": str(self.max_wait_ms),
            "TRANSACT_MAX_QUEUE": str(self.max_queue),
            "TRANSACT_REQUEST_TIMEOUT_S": str(self.request_timeout_s),
            "TRANSACT_MAX_CLOCK_SKEW_S": "off" if self.max_clock_skew_s is None else str(self.max_clock_skew_s),
            "TRANSACT_LOG_QUEUE_ROWS": str(self.log_queue_rows),
            "TRANSACT_LOG_FLUSH_ROWS": str(self.log_flush_rows),
            "TRANSACT_LOG_FLUSH_S": str(self.log_flush_s),
            "TRANSACT_ASSEMBLY": self.assembly,
            "TRANSACT_CUDA_GRAPHS": "1" if self.cuda_graphs else "0",
            "TRANSACT_CPU_FORWARD": self.cpu_forward,
            "TRANSACT_HOST": self.host,
            "TRANSACT_PORT": str(self.port),
        }
        opt = {
            "TRANSACT_WORLD": self.world, "TRANSACT_FEAST_REPO": self.feast_repo,
            "TRANSACT_DEVICE": self.device, "TRANSACT_API_KEY": self.api_key,
            "TRANSACT_LOG_DIR": self.log_dir,
            "TRANSACT_THREADS": str(self.threads) if self.threads else None,
            "TRANSACT_SCORE_WEIGHTS": (",".join(f"{k}={v}" for k, v in self.score_weights.items())
                                       if self.score_weights else None),
        }
        out.update({k: v for k, v in opt.items() if v is not None})
        return out
