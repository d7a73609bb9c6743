"""The TransAct V2 ranking model and its baselines (V2 paper §3.1-3.3, V1 §3.3).

One module, :class:`TransActModel`, configured by a :class:`ModelConfig`; every
baseline of the paper's Table 2 is a named config (:data:`BASELINES`), and every one
reads the same logged rows (:mod:`transact.features.nn_features`).

Forward pass for one example (S = |S_all| slots, d = 64, D = 32)::

    e_c   = dequant(cand_emb_q)                                     [D]
    F_i   = concat(dequant(E(S_all)_i), e_c)                        [d]   early fusion (Eq. 4)
            + sum_{b : action_i has bit b} E_act[b]                 [d]   multi-hot actions
            + E_surf[surface_i] + E_pos[i]                          [d]
    U     = Encoder(F, causal + padding mask)                       [S, d]  (model.encoder)
    z     = maxpool_{i valid}(W_o U_i + b_o)                        [d_o]  (0 if no valid token)
            (+ optional V1 "first K columns", see below)
    x0    = concat(z, e_c, E_ctx[request surface])                  [n0]
    x_l+1 = x0 * (W_l x_l + b_l) + x_l,  l < n_cross                DCN v2, full rank
    logit = W_h MLP(x_L) + b_h                                      [|H|]

Segment selection. A config names the S_all segments it reads (``segments``); the
other segments are masked out, i.e. ``valid = valid_mask(seg_len) & selected``. As an
optimisation that gives the same outputs, the encoder only receives the selected
slots (gathered in order; positional rows are indexed by the *original* slot, so a
sliced and a masked run are the same computation on the valid tokens).

V1 "first K columns". V1 stores its realtime sequence newest first, so its first K
output columns are the K most recent actions. Our layout is oldest -> newest, so we
take the K *rightmost valid* tokens among the action segments (ll_nn, rt_nn,
rt_recent; never impressions or the appended candidate), newest first, zero-filled
when fewer than K exist. Because the action segments are disjoint in time and laid
out in time order, these are exactly the K most recent actions the model sees.

Next Action Loss head. When ``nal != "none"``, ``u(t) = W_nal U_t`` for every slot t of
S_RT[:r] (a linear layer d -> 32, the PinSage dimension) is returned for
:func:`transact.model.losses.nal_loss`.

Probabilities. ``p_h = sigmoid(c_h - a_h softplus(-logit_h) + b_h softplus(logit_h))``
(:meth:`TransActModel.probabilities`): the heads' logits recalibrated by the beta calibration
fitted after training (:mod:`transact.model.calibration`; a = b = 1, c = 0, the plain sigmoid,
until fitted), the one way every reader -- evaluation, serving, the served log, monitoring --
turns logits into probabilities.

V1 random time-window mask (optional, training only): per row T ~ U[0, 24 h]; tokens
with ``age_s < T`` (actions inside (t_request - T, t_request)) are masked as invalid.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transact.data.quantization import dequantize
from transact.data.schema import ACTIONS, EMB_DIM, LABEL_COLUMNS, POSITIVE_MASK, SURFACES
from transact.features.config import SEGMENTS, FeatureConfig
from transact.features.nn_features import SAll, valid_mask
from transact.model.calibration import Calibration
from transact.model.encoder import make_encoder, padded_input

#: Segments holding user actions (not impressions): "first K" draws from these.
ACTION_SEGMENTS: tuple[str, ...] = ("ll_nn", "rt_nn", "rt_recent")
NAL_MODES: tuple[str, ...] = ("none", "impression", "inbatch")
FUSIONS: tuple[str, ...] = ("concat", "append")


# --- configuration --------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Everything that defines a model's architecture and its training loss.

    Attributes:
        name: registry name (informational; see :data:`BASELINES`).
        heads: prediction heads, each an action with a ``label_<head>`` column.
        segments: S_all segments fed to the encoder; ``()`` means no sequence (WDL).
        fusion: "concat" (early fusion, every token gets e_c, Eq. 4) or "append"
            (BST: the candidate is one extra, last token with a zero action embedding).
        action_emb / surface_emb / pos_emb: add E_act / E_surf / E_pos to the tokens.
        positive_only: keep only tokens with a positive action bit (V1's "BST
            (positive actions)" variant).
        d_model, n_heads, ffn_dim, n_layers, dropout: the encoder (V2 §4.4.2: 64, 1, 32, 2).
        seq_out_dim: width of the linear layer before max-pooling.
        first_k: V1 output compression, K most recent action tokens (0 = off, V2).
        ctx_dim: width of the request-surface (context) embedding.
        n_cross: DCN v2 full-rank cross layers.
        mlp_dims: hidden sizes of the MLP after the cross network.
        nal: Next Action Loss negatives: "none", "impression" (NN(S_imp) tokens of the
            same row) or "inbatch" (S_RT[:r] tokens of another row of the batch).
        nal_weight: w_NAL of Eq. 7 on our L_NAL, a *mean* over (row, t) pairs. Default 1:
            the paper's 0.01 multiplies Eq. 6's *sum* (~30 pairs a row), so copying 0.01
            onto a mean made the NAL 30x weaker than the paper's and it did nothing
            measurable (demo world, 3 seeds, docs/ablation.md: TransAct + NAL_imp +0.2%
            HIT@3/repin at 0.01, +2.1% at 0.1, +4.9% [+3.0, +6.8] at 1; V2 +4.4% -> +5.8%
            vs TransAct at 1; the same on a second world).
        nal_dim: dimension of u(t) and of the PinSage embeddings it is compared with.
        nal_negatives: at most this many negatives per row, the newest slots of their
            segment (0 = every valid one: k_imp impression tokens, or r in-batch tokens).
        nal_projection: u(t) = W_nal U_t, a learned linear map (the default); False: u(t)
            = the first ``nal_dim`` coordinates of U_t, the half of the token that carried
            its own PinSage embedding into the encoder (Eq. 4), no parameters.
        time_window_mask: V1 random time-window mask in training.
        time_window_max_s: upper bound of T (V1: 24 h).
        label_actions: the columns a of the label-weight matrix M[h, a]; a pseudo-action
            "none" (no label among them is set) is always appended.
        label_weights: M as {head: {action or "none": weight}}; None = V1 Table 7 plus
            "none" = 1 (see :func:`transact.model.losses.default_label_weights`).
        ce_reduction: "weighted_mean" (each head divided by its summed weight, the
            default) or "mean" (divided by the batch size); see :mod:`transact.model.losses`.
    """

    name: str = "v2"
    heads: tuple[str, ...] = ("click", "repin", "hide")
    segments: tuple[str, ...] = SEGMENTS
    fusion: str = "concat"
    action_emb: bool = True
    surface_emb: bool = True
    pos_emb: bool = True
    positive_only: bool = False
    d_model: int = 64
    n_heads: int = 1
    ffn_dim: int = 32
    n_layers: int = 2
    dropout: float = 0.0
    seq_out_dim: int = 64
    first_k: int = 0
    ctx_dim: int = 8
    n_cross: int = 2
    mlp_dims: tuple[int, ...] = (128, 64)
    nal: str = "impression"
    nal_weight: float = 1.0
    nal_dim: int = EMB_DIM
    nal_negatives: int = 0
    nal_projection: bool = True
    time_window_mask: bool = False
    time_window_max_s: int = 86_400
    label_actions: tuple[str, ...] = ("click", "repin", "hide")
    label_weights: dict[str, dict[str, float]] | None = None
    ce_reduction: str = "weighted_mean"

    def __post_init__(self) -> None:
        self.heads = tuple(self.heads)
        self.segments = tuple(self.segments)
        self.mlp_dims = tuple(self.mlp_dims)
        self.label_actions = tuple(self.label_actions)
        for h in self.heads:
            if f"label_{h}" not in LABEL_COLUMNS:
                raise ValueError(f"ModelConfig: head {h!r} has no label column (have {LABEL_COLUMNS})")
        for a in self.label_actions:
            if f"label_{a}" not in LABEL_COLUMNS:
                raise ValueError(f"ModelConfig: label action {a!r} has no label column")
        bad = [s for s in self.segments if s not in SEGMENTS]
        if bad:
            raise ValueError(f"ModelConfig: unknown segments {bad} (have {SEGMENTS})")
        if self.fusion not in FUSIONS:
            raise ValueError(f"ModelConfig: fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.nal not in NAL_MODES:
            raise ValueError(f"ModelConfig: nal must be one of {NAL_MODES}, got {self.nal!r}")
        if self.nal != "none" and "rt_recent" not in self.segments:
            raise ValueError("ModelConfig: the Next Action Loss needs the rt_recent segment as input")
        if self.nal_negatives < 0:
            raise ValueError(f"ModelConfig: nal_negatives must be >= 0 (0 = all), got {self.nal_negatives}")
        if self.nal != "none" and self.nal_dim != EMB_DIM:
            raise ValueError(f"ModelConfig: nal_dim must be {EMB_DIM}, the width of the PinSage embeddings u(t) "
                             f"is compared with, got {self.nal_dim}")
        if self.ce_reduction not in ("weighted_mean", "mean"):
            raise ValueError(f"ModelConfig: ce_reduction must be weighted_mean or mean, got {self.ce_reduction!r}")
        if self.d_model != 2 * EMB_DIM and self.fusion == "concat":
            raise ValueError(f"ModelConfig: concat fusion needs d_model = 2 x {EMB_DIM}")
        if self.d_model < EMB_DIM:
            raise ValueError(f"ModelConfig: d_model must be at least {EMB_DIM}")

    @property
    def has_sequence(self) -> bool:
        return len(self.segments) > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def _wdl() -> ModelConfig:
    return ModelConfig(name="wdl", segments=(), nal="none")


def _bst() -> ModelConfig:
    # V1 §4.2.2 / V2 Table 2 "BST (RT sequence)": Alibaba's BST over the realtime
    # tokens. BST has no action-type (or surface) feature, so hides look like any other
    # engagement -- the weakness V1 points out; tokens are the PinSage embedding
    # (zero-padded to d) plus a learned position, and the candidate is appended as the
    # last token (append fusion) with a zero ("dummy") action embedding.
    return ModelConfig(name="bst", segments=("rt_nn", "rt_recent"), fusion="append",
                       action_emb=False, surface_emb=False, pos_emb=True, nal="none")


def _transact() -> ModelConfig:
    return ModelConfig(name="transact", segments=("rt_nn", "rt_recent"), nal="none")


def _transact_nal_inbatch() -> ModelConfig:
    return ModelConfig(name="transact_nal_inbatch", segments=("rt_nn", "rt_recent"), nal="inbatch")


def _transact_nal_imp() -> ModelConfig:
    # NN(S_imp) supplies the NAL negatives (read from the row), but is not an input token.
    return ModelConfig(name="transact_nal_imp", segments=("rt_nn", "rt_recent"), nal="impression")


def _v2() -> ModelConfig:
    return ModelConfig(name="v2", segments=SEGMENTS, nal="impression")


#: Name -> config factory; the order is the paper's Table 2 order.
BASELINES: dict[str, Callable[[], ModelConfig]] = {
    "wdl": _wdl,
    "bst": _bst,
    "transact": _transact,
    "transact_nal_inbatch": _transact_nal_inbatch,
    "transact_nal_imp": _transact_nal_imp,
    "v2": _v2,
}


def model_config(name: str, **overrides) -> ModelConfig:
    """The registered config ``name`` with field overrides (e.g. ``heads=...``)."""
    if name not in BASELINES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BASELINES)}")
    cfg = BASELINES[name]()
    if not overrides:
        return cfg
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    return dataclasses.replace(cfg, **overrides)


# --- model input / output -----------------------------------------------------------------

@dataclass
class Batch:
    """A batch of logged rows as tensors (B rows, S = |S_all| slots, D = 32).

    Model inputs: emb_q int8 [B, S, D], action uint8 [B, S], tok_surface int8 [B, S],
    age_s int32 [B, S] (-1 = padding), seg_len int16 [B, 4], cand_emb_q int8 [B, D],
    surface int64 [B] (the request's surface, the context feature).
    Training/eval only: labels float32 [B, len(LABEL_COLUMNS)] in LABEL_COLUMNS order,
    user_id, request_id, item_id, ts int64 [B].
    """

    emb_q: torch.Tensor
    action: torch.Tensor
    tok_surface: torch.Tensor
    age_s: torch.Tensor
    seg_len: torch.Tensor
    cand_emb_q: torch.Tensor
    surface: torch.Tensor
    labels: torch.Tensor | None = None
    user_id: torch.Tensor | None = None
    request_id: torch.Tensor | None = None
    item_id: torch.Tensor | None = None
    ts: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.cand_emb_q.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A Batch of ``fn`` applied to every tensor field (absent optional fields stay None)."""
        # Field-generic, so the kwargs can only be typed Any: each value is its field's type.
        kwargs: dict[str, Any] = {f.name: (None if (v := getattr(self, f.name)) is None else fn(v))
                                  for f in dataclasses.fields(self)}
        return Batch(**kwargs)

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def index(self, idx: torch.Tensor | slice) -> Batch:
        """The rows ``idx`` (a slice, or an index / bool tensor: ``index_select``, which on CPU
        gathers the one-byte [N, S] columns ~1000x faster than ``v[idx]``; measured 27 -> 0.26 ms
        per batch of 256 from 8,000 rows in memory)."""
        if isinstance(idx, slice):
            sl = idx
            return self._map(lambda v: v[sl])
        idx = torch.as_tensor(idx, device=self.cand_emb_q.device)
        rows = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()  # [n]
        return self._map(lambda v: v.index_select(0, rows))

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        out: dict[str, Any] = {}  # field-generic, as in _map
        for f in dataclasses.fields(Batch):
            vals = [getattr(b, f.name) for b in batches]
            out[f.name] = None if any(v is None for v in vals) else torch.cat(vals, 0)
        return Batch(**out)

    @staticmethod
    def from_s_all(s_all: SAll, cand_emb_q: torch.Tensor, surface: torch.Tensor | int = 0) -> Batch:
        """Model input from serving-side S_all tensors (no labels)."""
        B = cand_emb_q.shape[0]
        if not isinstance(surface, torch.Tensor):
            surface = torch.full((B,), int(surface), dtype=torch.int64, device=cand_emb_q.device)
        return Batch(emb_q=s_all.emb_q, action=s_all.action, tok_surface=s_all.surface,
                     age_s=s_all.age_s, seg_len=s_all.seg_len, cand_emb_q=cand_emb_q,
                     surface=surface.long())

    def label(self, name: str) -> torch.Tensor:
        """float [B]: the 0/1 label of action ``name``."""
        assert self.labels is not None, "this batch has no labels (a serving batch, from_s_all)"
        return self.labels[:, LABEL_COLUMNS.index(f"label_{name}")]


@dataclass
class ModelOutput:
    """logits [B, H]; for the NAL: u(t) [B, r, nal_dim] over S_RT[:r] and whether each
    query slot was a valid input token [B, r] (None when the config has no NAL)."""

    logits: torch.Tensor
    nal_user: torch.Tensor | None = None
    nal_query_valid: torch.Tensor | None = None


# --- building blocks ----------------------------------------------------------------------

class CrossNetwork(nn.Module):
    """DCN v2 full-rank cross network: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l."""

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0  # [B, n0]
        for lin in self.layers:
            x = x0 * lin(x) + x  # [B, n0]
        return x


class TransActModel(nn.Module):
    """TransAct V2 (and, by config, its baselines); see the module docstring for the math."""

    # Buffers (register_buffer, only when cfg.has_sequence): declared so that they type as
    # tensors, not as the Tensor | Module of nn.Module.__getattr__.
    slots: torch.Tensor  # [L] long, the selected S_all slots in layout order
    slot_is_action: torch.Tensor  # [L] bool
    rt_local: torch.Tensor  # [r] or [0] long, positions of S_RT[:r] among the slots
    action_bits: torch.Tensor  # [256, A] float, the bits of each multi-hot action byte
    cal_abc: torch.Tensor  # [3, H] the heads' calibration (a, b, c); not in the weights: config.json holds it

    def __init__(self, cfg: ModelConfig, fcfg: FeatureConfig) -> None:
        super().__init__()
        self.cfg, self.fcfg = cfg, fcfg
        d = cfg.d_model
        self.ctx_emb = nn.Embedding(len(SURFACES), cfg.ctx_dim)
        n0 = EMB_DIM + cfg.ctx_dim
        if cfg.has_sequence:
            starts, sizes = fcfg.segment_starts, fcfg.segment_sizes
            sel = [SEGMENTS.index(s) for s in SEGMENTS if s in cfg.segments]  # layout order
            slots = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in sel])  # [L]
            self.register_buffer("slots", slots, persistent=False)
            is_action = torch.zeros(fcfg.seq_len, dtype=torch.bool)
            for s in ACTION_SEGMENTS:
                i = SEGMENTS.index(s)
                is_action[starts[i]:starts[i] + sizes[i]] = True
            self.register_buffer("slot_is_action", is_action[slots], persistent=False)  # [L]
            i_rt = SEGMENTS.index("rt_recent")
            rt_local = torch.nonzero((slots >= starts[i_rt]) & (slots < starts[i_rt] + sizes[i_rt])).flatten()
            self.register_buffer("rt_local", rt_local, persistent=False)  # [r] or [0]
            n_pos = fcfg.seq_len + (1 if cfg.fusion == "append" else 0)
            # Token embedding tables (all d-wide so that they add, Eq. 4).
            self.act_emb = nn.Parameter(torch.randn(len(ACTIONS), d) * 0.02) if cfg.action_emb else None
            # Multi-hot action byte -> its bits as floats, by lookup: the same 0/1 values as
            # shifting and masking, and exportable (ONNX has no shift of signed integers).
            codes = torch.arange(256)[:, None]  # [256, 1]
            bits = ((codes >> torch.arange(len(ACTIONS))) & 1).float()  # [256, A]
            self.register_buffer("action_bits", bits, persistent=False)
            self.surf_emb = nn.Embedding(len(SURFACES), d) if cfg.surface_emb else None
            self.pos_emb = nn.Parameter(torch.randn(n_pos, d) * 0.02) if cfg.pos_emb else None
            if self.surf_emb is not None:
                nn.init.normal_(self.surf_emb.weight, std=0.02)
            self.encoder = make_encoder(d, cfg.n_heads, cfg.ffn_dim, cfg.n_layers, cfg.dropout)
            self.seq_proj = nn.Linear(d, cfg.seq_out_dim)
            n0 += cfg.seq_out_dim * (1 + cfg.first_k)
        self.cross = CrossNetwork(n0, cfg.n_cross)
        mlp, prev = [], n0
        for h in cfg.mlp_dims:
            mlp += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.mlp = nn.Sequential(*mlp)
        self.head = nn.Linear(prev, len(cfg.heads))
        self.register_buffer("cal_abc", torch.tensor([[1.0], [1.0], [0.0]]).expand(3, len(cfg.heads)).clone(),
                             persistent=False)
        self.calibration = Calibration.identity(cfg.heads)
        # Built last, so that for one seed a config with and without the NAL starts from
        # the same weights everywhere else (a paired ablation of the NAL alone).
        self.has_nal = cfg.has_sequence and cfg.nal != "none"
        self.nal_proj = nn.Linear(d, cfg.nal_dim) if self.has_nal and cfg.nal_projection else None

    # The token features F of Eq. 4, restricted to the selected slots.
    def token_mask(self, batch: Batch, time_window: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """valid bool [B, L]: the selected slots that are input tokens (logged, positive-only
        and time-window rules applied; without the appended candidate)."""
        cfg, slots = self.cfg, self.slots
        valid = valid_mask(batch.seg_len, self.fcfg)[:, slots]  # [B, L]
        if cfg.positive_only:
            valid = valid & ((batch.action[:, slots].long() & POSITIVE_MASK) != 0)  # [B, L]
        if time_window:
            B = batch.cand_emb_q.shape[0]
            T = torch.rand(B, 1, device=valid.device, generator=generator) * cfg.time_window_max_s  # [B, 1]
            valid = valid & (batch.age_s[:, slots].float() >= T)  # [B, L]
        return valid

    def _features(self, emb_q: torch.Tensor, e_c: torch.Tensor, act: torch.Tensor, surf: torch.Tensor,
                  slot: torch.Tensor) -> torch.Tensor:
        """F of Eq. 4 for tokens of any leading shape [*]: emb_q int8 [*, D], e_c [*, D] (the
        candidate, concat fusion), action byte [*], surface [*], original slot [*] -> [*, d]."""
        cfg = self.cfg
        emb = dequantize(emb_q)  # [*, D]
        if cfg.fusion == "concat":
            x = torch.cat([emb, e_c], dim=-1)  # [*, 2D = d]
        else:
            x = torch.cat([emb, emb.new_zeros(emb.shape[:-1] + (cfg.d_model - EMB_DIM,))], dim=-1)  # [*, d]
        if self.act_emb is not None:
            x = x + self.action_bits[act.long()].to(x.dtype) @ self.act_emb  # [*, d], sum of per-bit embeddings
        if self.surf_emb is not None:
            x = x + self.surf_emb(surf.long())  # [*, d]
        if self.pos_emb is not None:
            # an embedding lookup, not pos_emb[slot]: the backward of an index into a parameter
            # is an accumulating index_put (5.4 ms per step over the valid tokens, 1.4 ms this way)
            x = x + F.embedding(slot, self.pos_emb)  # [*, d], rows of the original slots
        return x

    def token_features(self, batch: Batch, e_c: torch.Tensor, rows: torch.Tensor | None,
                       cols: torch.Tensor | None) -> torch.Tensor:
        """F of the tokens at (rows [M], positions among the selected slots cols [M]) -> [M, d];
        ``rows is None``: every selected slot of every row -> [B, L, d] (the encoder's two layouts,
        :class:`transact.model.encoder.SequenceEncoder`). e_c [B, D]: the candidates."""
        if rows is None or cols is None:
            slots = self.slots
            B, L = e_c.shape[0], slots.numel()
            return self._features(batch.emb_q[:, slots], e_c[:, None, :].expand(B, L, EMB_DIM),
                                  batch.action[:, slots], batch.tok_surface[:, slots], slots)  # [B, L, d]
        sl = self.slots[cols]  # [M] original slots
        return self._features(batch.emb_q[rows, sl], e_c[rows], batch.action[rows, sl],
                              batch.tok_surface[rows, sl], sl)  # [M, d]

    def appended_token(self, e_c: torch.Tensor) -> torch.Tensor | None:
        """BST's candidate token [B, d] (append fusion: zero action, the last positional row), else None."""
        if self.cfg.fusion != "append":
            return None
        c = torch.cat([e_c, e_c.new_zeros(e_c.shape[0], self.cfg.d_model - EMB_DIM)], dim=-1)  # [B, d]
        return c + self.pos_emb[-1] if self.pos_emb is not None else c  # [B, d]

    def tokens(self, batch: Batch, time_window: bool = False,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """F [B, S, d] and valid bool [B, S] as the padded layout feeds them to the encoder
        (S = selected slots, +1 with append): for tests and benchmarks of the encoder alone."""
        e_c = dequantize(batch.cand_emb_q)  # [B, D]
        valid = self.token_mask(batch, time_window, generator)  # [B, L]
        return padded_input(self.token_features(batch, e_c, None, None), valid, self.appended_token(e_c))

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> ModelOutput:
        cfg = self.cfg
        e_c = dequantize(batch.cand_emb_q)  # [B, D]
        feats = []
        nal_user = nal_query_valid = None
        if cfg.has_sequence:
            valid = self.token_mask(batch, self.training and cfg.time_window_mask, generator)  # [B, L]
            enc = self.encoder.encode(valid, lambda rows, cols: self.token_features(batch, e_c, rows, cols),
                                      append=self.appended_token(e_c))  # U: [N, d] or [B, S, d]
            z = self.seq_proj(enc.U)  # [N, d_o] or [B, S, d_o]
            feats.append(enc.max_pool(z))  # [B, d_o]
            if cfg.first_k > 0:
                feats.append(self._first_k(enc.padded(z), enc.valid))  # [B, K * d_o]
            if self.has_nal:
                u = enc.at_slots(self.rt_local)  # [B, r, d]
                nal_user = self.nal_proj(u) if self.nal_proj is not None else u[..., :cfg.nal_dim]  # [B, r, nal_dim]
                nal_query_valid = valid[:, self.rt_local]  # [B, r]
        feats += [e_c, self.ctx_emb(batch.surface.long())]  # [B, D], [B, ctx]
        x0 = torch.cat(feats, dim=-1)  # [B, n0]
        logits = self.head(self.mlp(self.cross(x0)))  # [B, H]
        return ModelOutput(logits=logits, nal_user=nal_user, nal_query_valid=nal_query_valid)

    def _first_k(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """V1 output compression: the K most recent valid action tokens, newest first."""
        B, L, _ = z.shape
        K = self.cfg.first_k
        n_act = self.slot_is_action.numel()
        pos = torch.arange(L, device=z.device).expand(B, L)  # [B, L]
        ok = valid.clone()  # [B, L]
        ok[:, :n_act] &= self.slot_is_action  # never impressions
        if L > n_act:
            ok[:, n_act:] = False  # never the appended candidate
        score = torch.where(ok, pos, torch.full_like(pos, -1))  # [B, L]
        kk = min(K, L)
        top, idx = score.topk(kk, dim=1)  # [B, kk], rightmost (newest) first
        cols = torch.gather(z, 1, idx[..., None].expand(B, kk, z.shape[-1]))  # [B, kk, d_o]
        cols = cols * (top >= 0)[..., None].to(z.dtype)  # [B, kk, d_o], zero where missing
        if kk < K:
            cols = torch.cat([cols, cols.new_zeros(B, K - kk, z.shape[-1])], dim=1)  # [B, K, d_o]
        return cols.reshape(B, -1)  # [B, K * d_o]

    def set_calibration(self, cal: Calibration) -> None:
        """Makes ``cal`` (for this model's heads, in order) the map from logits to probabilities."""
        if tuple(cal.heads) != tuple(self.cfg.heads):
            raise ValueError(f"calibration for heads {cal.heads}, the model has {self.cfg.heads}")
        self.calibration = cal
        self.cal_abc.copy_(torch.tensor([cal.a, cal.b, cal.c], dtype=self.cal_abc.dtype))

    def probabilities(self, logits: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """float [B, H]: the calibrated probabilities of head logits [B, H] (``raw``: the plain
        sigmoid, the label-weighted training objective's inflated odds)."""
        if raw or self.calibration.is_identity:
            return torch.sigmoid(logits)  # [B, H]
        a, b, c = self.cal_abc.to(logits.dtype)  # [H] each
        return torch.sigmoid(c - a * F.softplus(-logits) + b * F.softplus(logits))  # [B, H]

    @torch.no_grad()
    def predict_proba(self, batch: Batch, raw: bool = False) -> torch.Tensor:
        """float [B, H]: :meth:`probabilities` of the head logits (eval mode, no time-window mask)."""
        was = self.training
        self.eval()
        try:
            return self.probabilities(self.forward(batch).logits, raw)
        finally:
            self.train(was)


def build_model(cfg: ModelConfig | str, fcfg: FeatureConfig | None = None) -> TransActModel:
    """A model by config or registry name, on the default feature contract unless given."""
    if isinstance(cfg, str):
        cfg = model_config(cfg)
    return TransActModel(cfg, fcfg or FeatureConfig())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ACTION_SEGMENTS", "BASELINES", "Batch", "CrossNetwork", "ModelConfig", "ModelOutput",
    "TransActModel", "build_model", "count_parameters", "model_config",
]
