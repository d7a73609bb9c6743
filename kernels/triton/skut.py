"""SKUT: single kernel unified transformer, forward only (paper §3.4.2, §4.4.3).

Runs every layer of the encoder's stock ``nn.TransformerEncoder`` (post-LN, ReLU FFN,
one head, batch_first) in one Triton launch. Per layer, for a row x [S, d]:

    Q, K, V = x Wq^T + bq, x Wk^T + bk, x Wv^T + bv
    a       = softmax(Q K^T / sqrt(d) + mask) V Wo^T + bo
    h       = LayerNorm1(x + a)
    y       = LayerNorm2(h + relu(h W1^T + b1) W2^T + b2)

with the mask of :func:`transact.kernels.pytorch.encoder.attention_mask`, computed on the fly
from positions and the per-token valid flags (no [S, S] tensor):

    allowed(i, j) = (j <= i and valid[j]) or j == i

Q, K and V are never materialised
---------------------------------
With one head, the projections fold into the weights (exact algebra, done once per
module on the host, in float64):

    Q K^T / sqrt(d) = (x_q A + c) x_k^T + (terms constant along j)
        A = Wq^T Wk / sqrt(d)  [d, d],   c = bq^T Wk / sqrt(d)  [d]
    Terms constant along j (x_q Wq^T bk, bq.bk) cancel in the softmax.

    P V Wo^T + bo = (P x_k) (Wo Wv)^T + (Wo bv + bo)     (rows of P sum to 1)

So attention runs flash-attention style directly on the layer input x: per query block
Q~ = x_q A + c (one [M, d] x [d, d] product), per key block S = Q~ x_k^T and
acc += P x_k, and the epilogue applies W_vo = (Wo Wv)^T and b_vo. K and V are never
computed at all: per key block the work is the two attention products only. log2(e)
is folded into A and c too, so the softmax uses exp2.

Grid and the layer loop
-----------------------
Layer l + 1 needs the whole row's layer-l output, so the fused launch runs one program
per batch row (grid (B, 1)) and loops over layers inside. The row is updated **in
place** in the output buffer: query blocks are processed from the last to the first, and
under the causal mask block m reads only key blocks <= m, which a descending order has
not overwritten yet. A barrier after each layer (and before each block's store) orders
the program's own global writes and reads. Key blocks run from the diagonal block down,
so every query row meets its always-allowed diagonal key first and the running max is
finite from the start (no NaN from an all-masked first block).

One program per row leaves a GPU idle at small batches (B programs vs. ~100+ SMs), so
``mode="per_layer"`` launches the same kernel once per layer with grid (B, query
blocks), ping-ponging between two buffers; ``mode="auto"`` picks fused when B reaches
the number of SMs. Both are tested; which is faster at each shape is for the benchmark
(``transact bench skut``) to tell on a GPU.

Weights are read straight from the module (in_proj_weight/bias, out_proj, linear1,
linear2, norm1, norm2 of every layer), folded, cast to the input dtype (matrices) or
kept in fp32 (vectors: added to fp32 accumulators), and cached per module; the cache is
invalidated when any parameter is replaced or updated in place.
"""
from __future__ import annotations

import math
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import TypedDict

import torch
import triton
import triton.language as tl
from torch import nn

from transact.kernels.pytorch.encoder import stock_layer_issue

DEFAULT_BLOCK = 64


@triton.jit
def _layer_norm(h, g_ptr, b_ptr, eps, D: tl.constexpr):
    """Row LayerNorm of h [M, D] fp32 with affine weight g [D] and bias b [D] (biased var)."""
    cols = tl.arange(0, D)
    mean = tl.sum(h, 1) / D  # [M]
    hc = h - mean[:, None]  # [M, D]
    var = tl.sum(hc * hc, 1) / D  # [M]
    g = tl.load(g_ptr + cols)  # [D] fp32
    b = tl.load(b_ptr + cols)  # [D] fp32
    return hc * tl.rsqrt(var + eps)[:, None] * g[None, :] + b[None, :]


@triton.jit
def _skut_kernel(
    x_ptr,  # [B, S, D] input of the first layer run here
    out_ptr,  # [B, S, D] output (and, fused, the in-place activations of later layers)
    valid_ptr,  # uint8 [B, S]
    a_ptr,  # [L, D, D] folded Wq^T Wk * log2(e)/sqrt(d), input dtype
    c_ptr,  # [L, D] fp32 folded bq^T Wk * log2(e)/sqrt(d)
    wvo_ptr,  # [L, D, D] (Wo Wv)^T, input dtype
    bvo_ptr,  # [L, D] fp32 Wo bv + bo
    w1_ptr,  # [L, D, F] linear1.weight^T, input dtype
    b1_ptr,  # [L, F] fp32
    w2_ptr,  # [L, F, D] linear2.weight^T, input dtype
    b2_ptr,  # [L, D] fp32
    g1_ptr, be1_ptr, g2_ptr, be2_ptr,  # [L, D] fp32 norm1 / norm2 weight and bias
    eps_ptr,  # [L, 2] fp32 norm1.eps, norm2.eps
    S, layer0,
    D: tl.constexpr, F: tl.constexpr, N_LAYERS: tl.constexpr, BLOCK: tl.constexpr,
    IN_PLACE: tl.constexpr,  # fused mode: layers after the first update out_ptr in place
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), else the default
):
    row = tl.program_id(0)
    n_prog = tl.num_programs(1)  # 1 when fused; the number of query blocks per layer otherwise
    n_qb = tl.cdiv(S, BLOCK)
    dt = out_ptr.dtype.element_ty
    base = row.to(tl.int64) * S * D  # start of this row in [B, S, D]
    r = tl.arange(0, BLOCK)  # [BLOCK]
    dcol = tl.arange(0, D)  # [D]
    fcol = tl.arange(0, F)  # [F]
    dd = dcol[:, None] * D + dcol[None, :]  # [D, D] offsets of a row-major [D, D]

    for li in tl.static_range(N_LAYERS):
        layer = layer0 + li
        if li == 0:
            src = x_ptr
        else:
            src = out_ptr
        eps1 = tl.load(eps_ptr + 2 * layer)
        eps2 = tl.load(eps_ptr + 2 * layer + 1)
        vd = layer * D  # offset of this layer's [D] vectors

        for t in range(tl.program_id(1), n_qb, n_prog):
            m = n_qb - 1 - t  # query blocks last to first (in-place safety, see module doc)
            qpos = m * BLOCK + r  # [BLOCK] query positions
            qmask = qpos < S
            xq = tl.load(src + base + qpos[:, None] * D + dcol[None, :],
                         mask=qmask[:, None], other=0.0)  # [BLOCK, D] dt
            a = tl.load(a_ptr + layer * D * D + dd)  # [D, D] dt
            cvec = tl.load(c_ptr + vd + dcol)  # [D] fp32
            qt = (tl.dot(xq, a, input_precision=DOT_PRECISION) + cvec[None, :]).to(dt)  # [BLOCK, D]

            m_i = tl.full([BLOCK], float("-inf"), tl.float32)  # running row max (log2 domain)
            l_i = tl.zeros([BLOCK], tl.float32)  # running softmax denominator
            acc = tl.zeros([BLOCK, D], tl.float32)  # running sum_j p_ij x_j
            for tk in range(0, m + 1):
                n = m - tk  # key blocks from the diagonal block down
                kpos = n * BLOCK + r  # [BLOCK] key positions
                kin = kpos < S
                xk = tl.load(src + base + kpos[:, None] * D + dcol[None, :],
                             mask=kin[:, None], other=0.0)  # [BLOCK, D] dt
                vk = tl.load(valid_ptr + row.to(tl.int64) * S + kpos, mask=kin, other=0) != 0  # [BLOCK]
                s = tl.dot(qt, tl.trans(xk), input_precision=DOT_PRECISION)  # [BLOCK, BLOCK] fp32
                allowed = (((kpos[None, :] <= qpos[:, None]) & vk[None, :])
                           | (kpos[None, :] == qpos[:, None]))  # [BLOCK, BLOCK]
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK], finite: diagonal seen first
                alpha = tl.exp2(m_i - m_new)  # [BLOCK] rescale of the old sums
                p = tl.exp2(s - m_new[:, None])  # [BLOCK, BLOCK]
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), xk, input_precision=DOT_PRECISION)
                m_i = m_new

            # Epilogue: output projection, residual + LN1, FFN, residual + LN2.
            o = (acc / l_i[:, None]).to(dt)  # [BLOCK, D] softmax-weighted inputs
            wvo = tl.load(wvo_ptr + layer * D * D + dd)  # [D, D] dt
            bvo = tl.load(bvo_ptr + vd + dcol)  # [D] fp32
            h = xq.to(tl.float32) + tl.dot(o, wvo, input_precision=DOT_PRECISION) + bvo[None, :]  # [BLOCK, D]
            h = _layer_norm(h, g1_ptr + vd, be1_ptr + vd, eps1, D)  # [BLOCK, D] fp32
            w1 = tl.load(w1_ptr + layer * D * F + dcol[:, None] * F + fcol[None, :])  # [D, F] dt
            b1 = tl.load(b1_ptr + layer * F + fcol)  # [F] fp32
            f = tl.maximum(tl.dot(h.to(dt), w1, input_precision=DOT_PRECISION) + b1[None, :], 0.0)  # [BLOCK, F]
            w2 = tl.load(w2_ptr + layer * F * D + fcol[:, None] * D + dcol[None, :])  # [F, D] dt
            b2 = tl.load(b2_ptr + vd + dcol)  # [D] fp32
            y = h + tl.dot(f.to(dt), w2, input_precision=DOT_PRECISION) + b2[None, :]  # [BLOCK, D]
            y = _layer_norm(y, g2_ptr + vd, be2_ptr + vd, eps2, D)  # [BLOCK, D]
            if IN_PLACE:
                tl.debug_barrier()  # every thread is done reading this block before it is overwritten
            tl.store(out_ptr + base + qpos[:, None] * D + dcol[None, :], y.to(dt), mask=qmask[:, None])
        if IN_PLACE:
            tl.debug_barrier()  # layer l fully written before layer l + 1 reads it


# --- weights -------------------------------------------------------------------------------

@dataclass
class PackedWeights:
    """Folded, stacked weights of all layers (see the module doc for the algebra)."""

    a: torch.Tensor  # [L, D, D] dtype
    c: torch.Tensor  # [L, D] fp32
    wvo: torch.Tensor  # [L, D, D] dtype
    bvo: torch.Tensor  # [L, D] fp32
    w1: torch.Tensor  # [L, D, F] dtype
    b1: torch.Tensor  # [L, F] fp32
    w2: torch.Tensor  # [L, F, D] dtype
    b2: torch.Tensor  # [L, D] fp32
    g1: torch.Tensor  # [L, D] fp32
    be1: torch.Tensor  # [L, D] fp32
    g2: torch.Tensor  # [L, D] fp32
    be2: torch.Tensor  # [L, D] fp32
    eps: torch.Tensor  # [L, 2] fp32

    @property
    def num_layers(self) -> int:
        return self.a.shape[0]

    @property
    def d_model(self) -> int:
        return self.a.shape[1]

    @property
    def ffn_dim(self) -> int:
        return self.w1.shape[2]

    def args(self) -> tuple:
        return (self.a, self.c, self.wvo, self.bvo, self.w1, self.b1, self.w2, self.b2,
                self.g1, self.be1, self.g2, self.be2, self.eps)


#: module -> {(dtype, device): (signature, PackedWeights)}; entries die with the module.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def unsupported_reason(encoder: nn.TransformerEncoder) -> str | None:
    """Why SKUT cannot run this encoder, or None if it can."""
    if encoder.training:
        return "encoder is in training mode (SKUT is forward-only, dropout off)"
    for i, layer in enumerate(encoder.layers):
        attn = layer.self_attn
        d = attn.embed_dim
        if attn.num_heads != 1:
            return f"layer {i}: {attn.num_heads} heads (SKUT folds single-head attention)"
        if (issue := stock_layer_issue(layer)) is not None:
            return f"layer {i}: {issue}"
        ffn = layer.linear1.out_features
        for name, v in (("d_model", d), ("dim_feedforward", ffn)):
            if v < 16 or v > 256 or v & (v - 1):
                return f"layer {i}: {name}={v} is not a power of two in [16, 256]"
        if (d, ffn) != (encoder.layers[0].self_attn.embed_dim, encoder.layers[0].linear1.out_features):
            return f"layer {i}: sizes differ from layer 0"
    return None


def _signature(encoder: nn.TransformerEncoder) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in encoder.parameters()) + tuple(
        (layer.norm1.eps, layer.norm2.eps) for layer in encoder.layers)


class _TensorOptions(TypedDict):
    """Keyword arguments for tensor factories and ``.to``: typed, so ``**`` unpacking checks."""
    dtype: torch.dtype
    device: str


def pack_weights(encoder: nn.TransformerEncoder, dtype: torch.dtype, device) -> PackedWeights:
    """Folds and stacks the weights of every layer (float64 on the host, then cast)."""
    f64: _TensorOptions = {"dtype": torch.float64, "device": "cpu"}
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in PackedWeights.__dataclass_fields__}
    for layer in encoder.layers:
        attn = layer.self_attn
        d = attn.embed_dim
        w = attn.in_proj_weight.detach().to(**f64)  # [3D, D]
        b = attn.in_proj_bias.detach().to(**f64) if attn.in_proj_bias is not None else torch.zeros(3 * d, **f64)
        wq, wk, wv = w[:d], w[d:2 * d], w[2 * d:]  # [D, D] each
        bq, bv = b[:d], b[2 * d:]  # [D]
        wo = attn.out_proj.weight.detach().to(**f64)  # [D, D]
        bo = attn.out_proj.bias.detach().to(**f64) if attn.out_proj.bias is not None else torch.zeros(d, **f64)
        scale = math.log2(math.e) / math.sqrt(d)  # softmax scale, in the exp2 domain
        cols["a"].append(wq.T @ wk * scale)  # [D, D]
        cols["c"].append(wk.T @ bq * scale)  # [D]
        cols["wvo"].append((wo @ wv).T)  # [D, D]
        cols["bvo"].append(wo @ bv + bo)  # [D]
        lin1, lin2 = layer.linear1, layer.linear2
        cols["w1"].append(lin1.weight.detach().to(**f64).T)  # [D, F]
        cols["b1"].append(lin1.bias.detach().to(**f64) if lin1.bias is not None
                          else torch.zeros(lin1.out_features, **f64))  # [F]
        cols["w2"].append(lin2.weight.detach().to(**f64).T)  # [F, D]
        cols["b2"].append(lin2.bias.detach().to(**f64) if lin2.bias is not None else torch.zeros(d, **f64))
        for key, norm in (("1", layer.norm1), ("2", layer.norm2)):
            cols["g" + key].append(norm.weight.detach().to(**f64) if norm.weight is not None
                                   else torch.ones(d, **f64))  # [D]
            cols["be" + key].append(norm.bias.detach().to(**f64) if norm.bias is not None
                                    else torch.zeros(d, **f64))  # [D]
        cols["eps"].append(torch.tensor([layer.norm1.eps, layer.norm2.eps], **f64))  # [2]
    matrices = {"a", "wvo", "w1", "w2"}
    return PackedWeights(**{
        k: torch.stack(v).to(device=device, dtype=dtype if k in matrices else torch.float32).contiguous()
        for k, v in cols.items()
    })


def cached_weights(encoder: nn.TransformerEncoder, dtype: torch.dtype, device) -> PackedWeights:
    """:func:`pack_weights`, cached per (module, dtype, device) until a parameter changes."""
    per_module = _CACHE.setdefault(encoder, {})
    key = (dtype, torch.device(device))
    sig = _signature(encoder)
    hit = per_module.get(key)
    if hit is None or hit[0] != sig:
        hit = (sig, pack_weights(encoder, dtype, device))
        per_module[key] = hit
    return hit[1]


# --- launch --------------------------------------------------------------------------------

def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def skut_forward(encoder: nn.TransformerEncoder, x: torch.Tensor, valid: torch.Tensor, *,
                 mode: str = "auto", block: int = DEFAULT_BLOCK, num_warps: int | None = None) -> torch.Tensor:
    """Encoder forward with the causal + padding + diagonal mask, in one Triton launch.

    Args:
        encoder: the stock module of :func:`transact.model.encoder.make_encoder` (eval mode).
        x: [B, S, D] fp16 / bf16 / fp32 (fp32 dots run without tf32).
        valid: bool [B, S], True on real tokens.
        mode: "fused" (one launch, one program per row, all layers), "per_layer" (one
            launch per layer, one program per (row, query block)), or "auto".
        block: query/key block size (a power of two >= 16).
        num_warps: warps per program (default: 8 for 64-blocks or fp32, where 4 warps spill
            registers in the sm_90 build, else 4).

    Returns:
        [B, S, D] in x's dtype. An encoder SKUT cannot run (see :func:`unsupported_reason`)
        falls back to :func:`transact.kernels.pytorch.encoder.encoder_reference` with a warning.
    """
    reason = unsupported_reason(encoder)
    if reason is not None:
        from transact.kernels.pytorch.encoder import encoder_reference

        warnings.warn(f"SKUT falls back to the PyTorch encoder: {reason}", stacklevel=2)
        return encoder_reference(encoder, x, valid)
    if x.dim() != 3 or valid.shape != x.shape[:2]:
        raise ValueError(f"x must be [B, S, D] and valid [B, S], got {tuple(x.shape)} / {tuple(valid.shape)}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    B, S, D = x.shape
    w = cached_weights(encoder, x.dtype, x.device)
    if D != w.d_model:
        raise ValueError(f"x has d={D}, the encoder d_model={w.d_model}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # [B, S, D]
    if B == 0 or S == 0:
        return out
    x = x.contiguous()
    valid_u8 = valid.contiguous().view(torch.uint8) if valid.dtype == torch.bool else (valid != 0).to(torch.uint8)
    n_qb = triton.cdiv(S, block)
    if mode == "auto":
        mode = "fused" if B >= _sm_count(x.device) or n_qb == 1 else "per_layer"
    common = dict(D=D, F=w.ffn_dim, BLOCK=block,
                  DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  num_warps=num_warps or (8 if block >= 64 or x.dtype == torch.float32 else 4))
    if mode == "fused":
        _skut_kernel[(B, 1)](x, out, valid_u8, *w.args(), S, 0,
                             N_LAYERS=w.num_layers, IN_PLACE=True, **common)
    elif mode == "per_layer":
        bufs = (torch.empty_like(out), out) if w.num_layers % 2 == 0 else (out, torch.empty_like(out))
        src = x
        for layer in range(w.num_layers):
            dst = bufs[layer % 2]  # the last layer lands in `out`
            _skut_kernel[(B, n_qb)](src, dst, valid_u8, *w.args(), S, layer,
                                    N_LAYERS=1, IN_PLACE=False, **common)
            src = dst
    else:
        raise ValueError(f"mode must be auto | fused | per_layer, got {mode!r}")
    if encoder.norm is not None:  # TransformerEncoder's optional final norm
        out = encoder.norm(out)
    return out


def aot_compile(cc: int = 90, dtype: str = "fp16", mode: str = "fused", d: int = 64, ffn: int = 32,
                n_layers: int = 2, block: int = DEFAULT_BLOCK, num_warps: int = 4):
    """Compiles the kernel for an NVIDIA GPU of compute capability ``cc`` without one.

    Needs TRITON_INTERPRET unset (the interpreter replaces ``triton.jit`` functions).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot_compile needs TRITON_INTERPRET unset")
    fused = mode == "fused"
    constexprs = dict(D=d, F=ffn, N_LAYERS=n_layers if fused else 1, BLOCK=block, IN_PLACE=fused,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    ptrs = ["x_ptr", "out_ptr", "valid_ptr", "a_ptr", "c_ptr", "wvo_ptr", "bvo_ptr", "w1_ptr",
            "b1_ptr", "w2_ptr", "b2_ptr", "g1_ptr", "be1_ptr", "g2_ptr", "be2_ptr", "eps_ptr"]
    low = {"x_ptr", "out_ptr", "a_ptr", "wvo_ptr", "w1_ptr", "w2_ptr"}
    sig = {p: (f"*{dtype}" if p in low else "*u8" if p == "valid_ptr" else "*fp32") for p in ptrs}
    sig.update(S="i32", layer0="i32", **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=_skut_kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
