"""Getting a batch onto the device and running the model forward (paper §3.4.2).

:class:`StagingArena` -- the pinned memory arena. One page-locked host buffer, reused
across batches: every input tensor of a de-duplicated batch is packed into it at
64-byte-aligned offsets, the used prefix goes to the GPU in ONE asynchronous copy into
a device buffer that is reused too, and the device tensors are views into it. No
allocation, no pinning and one H2D transfer per batch. The buffers grow (and are never
shrunk) when a batch does not fit. An event recorded after the copy guards the host
buffer: the next batch waits for it before overwriting. On CPU nothing is copied
(``stage`` returns its inputs); the byte count is still reported, which is what
``h2d_bytes`` means in the benchmark there.

:class:`ModelRunner` -- the forward pass. On CUDA, the encoder + heads part (fixed
shapes [B, |S_all|]) is captured in CUDA graphs, one per batch-size bucket (powers of
two up to ``max_graph_batch``), sharing one memory pool; a batch is copied into the
bucket's static inputs (padding rows have no valid token), replayed, and the first B
outputs are read. The NN search has data-dependent shapes (sequence lengths), so it
runs eagerly. Anything that cannot be captured falls back to eager with a warning.
On CPU it is the chosen CPU backend (see :class:`ModelRunner`), run over the batch in
row chunks of about ``cpu_chunk_tokens`` tokens: rows are independent, and a chunk's
activations stay in the cores' caches between the encoder's ops (``transact bench
serving`` times every backend whole and chunked in one run: the variant table in docs/serving.md).

These CUDA paths only run on a GPU; the CPU test suite exercises the arena's packing
with a plain (unpinned) buffer.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from transact.serving.settings import CPU_FORWARDS, DEFAULT_CPU_FORWARD

log = logging.getLogger("transact.serving")

ALIGN = 64

#: CPU forward chunk, in tokens (rows x |S_all|): 8192 x d=64 fp32 activations are 2 MiB
CPU_CHUNK_TOKENS = 8192


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class StagingArena:
    """Reusable host staging buffer (pinned on CUDA) and its device mirror.

    Args:
        device: target device.
        capacity: initial size in bytes (grows on demand).
        force_copy: also pack through a plain host buffer on CPU (tests).
    """

    def __init__(self, device: torch.device | str, capacity: int = 64 << 20, force_copy: bool = False) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copying = self.cuda or force_copy
        self.capacity = 0
        # set by _allocate when copying (the only case that reads them)
        self.host: torch.Tensor = torch.empty(0, dtype=torch.uint8)
        self.dev: torch.Tensor = torch.empty(0, dtype=torch.uint8)
        self._event: torch.cuda.Event | None = None
        self.last_bytes = 0
        self.grows = 0
        if self.copying:
            self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        capacity = _round_up(max(capacity, ALIGN), 1 << 20)
        self.host = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.cuda)
        self.dev = torch.empty(capacity, dtype=torch.uint8, device=self.device) if self.cuda else \
            torch.empty(capacity, dtype=torch.uint8)
        self.capacity = capacity
        self.grows += 1

    @staticmethod
    def nbytes(tensors: dict[str, torch.Tensor]) -> int:
        """Bytes one transfer of these tensors takes (aligned layout)."""
        return sum(_round_up(t.numel() * t.element_size()) for t in tensors.values())

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Packs ``tensors`` (CPU) into the arena and returns them on the device."""
        need = self.nbytes(tensors)
        self.last_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if not self.copying:
            return tensors
        if self._event is not None:
            self._event.synchronize()  # the previous batch's copy has left the host buffer
        if need > self.capacity:
            self._allocate(int(need * 1.25))
        offsets, off = {}, 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            view = self.host[off:off + n].view(t.dtype).view(t.shape)
            view.copy_(t)
            offsets[name] = (off, n, t.dtype, t.shape)
            off += _round_up(n)
        if self.cuda:
            self.dev[:off].copy_(self.host[:off], non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self.dev[:off].copy_(self.host[:off])
        return {name: self.dev[o:o + n].view(dt).view(shape) for name, (o, n, dt, shape) in offsets.items()}


class ModelRunner:
    """logits [B, H] = model(batch).logits: on CPU through the chosen backend, on GPU eager or
    by CUDA-graph replay (the caller turns them into probabilities through the model's one
    map, :meth:`~transact.model.transact.TransActModel.probabilities`).

    CPU backends (``cpu_forward``), all equal to eager PyTorch to float rounding
    (tested at 1e-6) and timed against each other by ``transact bench serving``:

    - ``onnxruntime``: the whole model exported to ONNX with a dynamic batch dimension
      and run by ONNX Runtime (:mod:`transact.serving.onnx_runtime`);
    - ``compile``: ``torch.compile(dynamic=True)`` -- one compilation for every batch size;
    - ``eager``: plain PyTorch.

    The default is the service's (:data:`transact.serving.settings.DEFAULT_CPU_FORWARD`).

    Each backend runs over row chunks of ``cpu_chunk_tokens`` tokens (0: the whole batch
    at once). The backend is built at the first call (the service's warm-up: export or
    compilation, seconds). If it cannot be built or fails, the runner logs why and runs
    eager from then on -- an optimisation never fails a request.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str, cuda_graphs: bool = True,
                 max_graph_batch: int = 2048, cpu_forward: str = DEFAULT_CPU_FORWARD,
                 cpu_chunk_tokens: int = CPU_CHUNK_TOKENS) -> None:
        if cpu_forward not in CPU_FORWARDS:
            raise ValueError(f"cpu_forward must be one of {CPU_FORWARDS}, got {cpu_forward!r}")
        if cpu_chunk_tokens < 0:
            raise ValueError(f"cpu_chunk_tokens must be >= 0, got {cpu_chunk_tokens}")
        self.cpu_chunk_tokens = cpu_chunk_tokens
        self.model = model.eval()
        self.device = torch.device(device)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.max_graph_batch = max_graph_batch
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, static batch, static out)
        self._failed: set[int] = set()
        self._pool: Any = None  # torch.cuda graph pool handle, made at the first capture
        #: the backend that runs (``eager`` on GPU, and after a failure)
        self.backend = cpu_forward if self.device.type == "cpu" else "eager"
        self._fast: Callable[..., torch.Tensor] | None = None  # the built CPU backend: batch -> logits

    def _build(self, batch):
        if self.backend == "compile":
            compiled = torch.compile(self.model, dynamic=True)
            return lambda b: compiled(b).logits
        from transact.serving.onnx_runtime import OnnxForward

        return OnnxForward(self.model, batch)

    def chunk_rows(self, batch) -> int:
        """Rows per forward call: all of them on GPU or with chunking off."""
        B = len(batch)
        if self.device.type != "cpu" or self.cpu_chunk_tokens == 0:
            return max(B, 1)
        return max(1, self.cpu_chunk_tokens // max(batch.emb_q.shape[1], 1))

    def direct(self, batch) -> torch.Tensor:
        """The forward without CUDA graphs: the CPU backend (or eager), in row chunks."""
        B, rows = len(batch), self.chunk_rows(batch)
        if B <= rows:
            return self._forward(batch)
        # rows are independent; small remainders are merged into the previous chunk (a
        # compiled model specialises batch size 1)
        cuts = list(range(0, B, rows))
        if B - cuts[-1] < rows // 2 and len(cuts) > 1:
            cuts.pop()
        cuts.append(B)
        return torch.cat([self._forward(batch.index(slice(a, b))) for a, b in zip(cuts, cuts[1:])])

    def _forward(self, batch) -> torch.Tensor:
        with torch.inference_mode():
            if self.backend != "eager":
                try:
                    if self._fast is None:
                        self._fast = self._build(batch)
                    return self._fast(batch)
                except Exception as e:  # noqa: BLE001 - never fail a request for an optimisation
                    log.warning("CPU forward backend %s failed (%s: %s); running eager from now on",
                                self.backend, type(e).__name__, str(e)[:300])
                    self.backend, self._fast = "eager", None
            return self.model(batch).logits

    def __call__(self, batch) -> torch.Tensor:
        B = len(batch)
        if not self.use_graphs or B == 0 or B > self.max_graph_batch:
            return self.direct(batch)
        bucket = 1 << max(0, math.ceil(math.log2(B)))
        if bucket in self._failed:
            return self.direct(batch)
        if bucket not in self._graphs:
            try:
                self._capture(bucket, batch)
            except Exception as e:  # noqa: BLE001 - never fail a request for an optimisation
                log.warning("CUDA graph capture failed for batch %d (%s); running eager", bucket, e)
                self._failed.add(bucket)
                return self.direct(batch)
        graph, static, out = self._graphs[bucket]
        self._fill(static, batch, B)
        graph.replay()
        return out[:B].clone()

    @staticmethod
    def _fields(batch) -> dict[str, torch.Tensor]:
        return {n: getattr(batch, n) for n in ("emb_q", "action", "tok_surface", "age_s", "seg_len",
                                                "cand_emb_q", "surface")}

    def _fill(self, static, batch, B: int) -> None:
        for name, src in self._fields(batch).items():
            dst = getattr(static, name)
            dst[:B].copy_(src, non_blocking=True)
            if B < dst.shape[0]:
                dst[B:].zero_()  # seg_len 0: padding rows without a valid token

    def _capture(self, bucket: int, batch) -> None:
        from transact.model.transact import Batch

        fields = {n: torch.zeros((bucket,) + tuple(t.shape[1:]), dtype=t.dtype, device=self.device)
                  for n, t in self._fields(batch).items()}
        static = Batch(**fields)
        self._fill(static, batch, len(batch))
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up: kernels compiled / autotuned outside the capture
                self.model(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            out = self.model(static).logits
        self._graphs[bucket] = (graph, static, out)
        log.info("captured a CUDA graph for batch bucket %d", bucket)
