"""The model forward through ONNX Runtime (CPU): export once, then ``logits = session(batch)``.

Optional: needs ``pip install onnxruntime onnx onnxscript`` (not a project dependency).
``transact bench serving`` times it against eager PyTorch and ``torch.compile`` on the same
batch and records the max |logit - eager logit|; :class:`OnnxForward` raises
:class:`ImportError` when the packages are missing.

The whole model (tokens, encoder with its causal + padding mask, pooling, cross network,
heads) is exported with ``torch.onnx.export(dynamo=True)`` and a dynamic batch
dimension, so one session serves every batch size.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

#: Model inputs in the order the exported graph takes them (see ``Batch``).
INPUTS: tuple[str, ...] = ("emb_q", "action", "tok_surface", "age_s", "seg_len", "cand_emb_q", "surface")


class _Logits(torch.nn.Module):
    """Batch fields -> the heads' logits: the function the ONNX graph holds."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, emb_q, action, tok_surface, age_s, seg_len, cand_emb_q, surface):
        from transact.model.transact import Batch

        batch = Batch(emb_q=emb_q, action=action, tok_surface=tok_surface, age_s=age_s, seg_len=seg_len,
                      cand_emb_q=cand_emb_q, surface=surface)
        return self.model(batch).logits  # [B, H]


class OnnxForward:
    """logits [B, H] of a :class:`~transact.model.transact.Batch` through ONNX Runtime on CPU."""

    def __init__(self, model: torch.nn.Module, example_batch, threads: int | None = None,
                 path: str | Path | None = None) -> None:
        import onnxruntime as ort  # ImportError when the optional packages are missing

        self._tmp: tempfile.TemporaryDirectory | None = None
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="transact-onnx-")
            self.path = Path(self._tmp.name) / "model.onnx"
        else:
            self.path = Path(path)
        args = tuple(getattr(example_batch, n).cpu() for n in INPUTS)
        batch_dim = torch.export.Dim("batch", min=2, max=1 << 20)
        with torch.no_grad():
            torch.onnx.export(_Logits(model.eval().cpu()), args, str(self.path), dynamo=True,
                              dynamic_shapes=tuple({0: batch_dim} for _ in INPUTS), verbose=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch) -> torch.Tensor:
        feed = {name: getattr(batch, field).cpu().numpy() for name, field in zip(self.input_names, INPUTS)}
        return torch.from_numpy(self.session.run(None, feed)[0])  # [B, H]
