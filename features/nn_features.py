"""NN features (paper Eq. 2-3): the one definition of S_all, shared by training-row
logging and serving.

Inputs are *request-level de-duplicated* (paper §3.4.2): each user's sequences are
stored once as jagged tensors (values + offsets), and the N candidates are grouped
by user with offsets -- nothing is broadcast to candidates before the NN search.

    NN(S, c) = top-K tokens of S by  <normalise(dequant(E(S))), normalise(e_c)>

Ties are broken towards the lower index, i.e. the more recent token (sequences are
stored newest first). Identical tokens tie *exactly*. The search itself lives with the
kernels: the PyTorch reference :func:`transact.kernels.pytorch.nn_search.nn_search` and
the fused Triton kernel have the same signature, and this module calls them through
:func:`transact.kernels.dispatch.nn_search`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from transact.data.schema import EMB_DIM, LABEL_COLUMNS, REQUESTS
from transact.features.config import SEGMENTS, FeatureConfig
from transact.kernels import dispatch

PAD_AGE: int = -1  # tok_age_s of a padding slot


@dataclass
class JaggedSequences:
    """U users' token sequences, concatenated, newest first within each user.

    emb_q int8 [T, D], action uint8 [T], surface int8 [T], ts int64 [T] (ms),
    offsets int64 [U + 1]; optionally norm float32 [T], each token's
    :func:`transact.kernels.dispatch.token_norms` (a store that has them per item hands
    them on, and the NN search skips its pass over the tokens; None: it computes them).
    """

    emb_q: torch.Tensor
    action: torch.Tensor
    surface: torch.Tensor
    ts: torch.Tensor
    offsets: torch.Tensor
    norm: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]  # [U]

    @property
    def num_users(self) -> int:
        return self.offsets.numel() - 1

    def token_user(self) -> torch.Tensor:
        """int64 [T]: the user of each token."""
        U = self.num_users
        return torch.repeat_interleave(torch.arange(U, device=self.offsets.device), self.lengths)

    def token_pos(self) -> torch.Tensor:
        """int64 [T]: each token's index within its user's sequence (0 = newest)."""
        return torch.arange(self.ts.numel(), device=self.ts.device) - self.offsets[self.token_user()]

    def select(self, keep: torch.Tensor) -> JaggedSequences:
        """Keeps the tokens where ``keep`` (bool [T]) is True; order is preserved (``self``,
        not a copy, when every token is kept)."""
        if bool(keep.all()):
            return self
        # user u keeps the tokens kept before offsets[u + 1], less those before offsets[u]
        kept_before = torch.zeros(keep.numel() + 1, dtype=torch.int64, device=keep.device)  # [T + 1]
        torch.cumsum(keep, 0, out=kept_before[1:])
        offsets = kept_before[self.offsets]  # [U + 1]
        if keep.device.type == "cpu":  # one np.take per field: ~3x faster than a boolean index
            rows = np.flatnonzero(keep.numpy())  # [T']
            take = lambda t: torch.from_numpy(_take_rows(t, rows))  # noqa: E731
            return JaggedSequences(take(self.emb_q), take(self.action), take(self.surface), take(self.ts), offsets,
                                   None if self.norm is None else take(self.norm))
        return JaggedSequences(self.emb_q[keep], self.action[keep], self.surface[keep],
                               self.ts[keep], offsets, None if self.norm is None else self.norm[keep])

    def to(self, device) -> JaggedSequences:
        return JaggedSequences(self.emb_q.to(device), self.action.to(device), self.surface.to(device),
                               self.ts.to(device), self.offsets.to(device),
                               None if self.norm is None else self.norm.to(device))

    @staticmethod
    def empty(num_users: int, device=None) -> JaggedSequences:
        z = lambda dt, *s: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        return JaggedSequences(z(torch.int8, 0, EMB_DIM), z(torch.uint8, 0), z(torch.int8, 0),
                               z(torch.int64, 0), z(torch.int64, num_users + 1))


@dataclass
class SAll:
    """The S_all tokens of N (request, candidate) pairs, fixed length S.

    emb_q int8 [N, S, D], action uint8 [N, S], surface int8 [N, S],
    age_s int32 [N, S] (seconds before the request; -1 on padding),
    seg_len int16 [N, 4] (valid tokens per segment, :data:`SEGMENTS` order).
    """

    emb_q: torch.Tensor
    action: torch.Tensor
    surface: torch.Tensor
    age_s: torch.Tensor
    seg_len: torch.Tensor

    def valid(self, cfg: FeatureConfig) -> torch.Tensor:
        """bool [N, S]: True on real tokens (segments are padded at their start)."""
        return valid_mask(self.seg_len, cfg)


def valid_mask(seg_len: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """seg_len int [N, 4] -> bool [N, S]; each segment's valid tokens fill its last slots."""
    parts = []
    for s, size in enumerate(cfg.segment_sizes):
        slot = torch.arange(size, device=seg_len.device)  # [size]
        parts.append(slot[None, :] >= size - seg_len[:, s : s + 1].long())  # [N, size]
    return torch.cat(parts, dim=1)  # [N, S]


def _take_rows(t: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """The rows ``rows`` of a CPU tensor, as numpy (``np.take`` along axis 0 copies a row
    of 32 int8 ~6x faster than a tensor's advanced index)."""
    return np.take(t.numpy(), rows, axis=0)


def _segment_from_local(local: torch.Tensor, seq: JaggedSequences, cand_user: torch.Tensor,
                        size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orders selected tokens oldest -> newest, padding first.

    local: int64 [N, size] indices within the user's sequence (-1 = none).
    Returns global token indices [N, size] (-1 = padding) and valid counts [N].
    """
    # Newest first storage: larger local index = older. Padding sorts first.
    big = torch.iinfo(torch.int64).max
    key = torch.where(local < 0, torch.full_like(local, big), local)  # [N, size]
    if key.device.type == "cpu":  # numpy's sort of small int64 rows is ~10x torch's
        local = torch.from_numpy(-np.sort(-key.numpy(), axis=1))  # [N, size] descending (keys >= 0)
    else:
        local = torch.sort(key, dim=1, descending=True).values  # [N, size]
    pad = local == big
    glob = torch.where(pad, torch.full_like(local, -1), local + seq.offsets[cand_user][:, None])
    return glob, (~pad).sum(1)


def build_s_all(ll: JaggedSequences, rt: JaggedSequences, imp: JaggedSequences,
                cand_emb_q: torch.Tensor, cand_offsets: torch.Tensor, request_ts: torch.Tensor,
                cfg: FeatureConfig) -> SAll:
    """Builds S_all for every candidate of U de-duplicated requests.

    Args:
        ll, rt, imp: the U requests' lifelong, realtime and impression sequences.
        cand_emb_q: int8 [N, D], candidates of all requests, grouped by request.
        cand_offsets: int64 [U + 1].
        request_ts: int64 [U], request timestamps (ms).
    """
    device = cand_emb_q.device
    N = cand_emb_q.shape[0]
    U = cand_offsets.numel() - 1
    for name, seq in (("ll", ll), ("rt", rt), ("imp", imp)):
        if seq.num_users != U:
            raise ValueError(f"build_s_all: {name} has {seq.num_users} users, candidates {U}")
    cand_user = torch.repeat_interleave(torch.arange(U, device=device),
                                        cand_offsets[1:] - cand_offsets[:-1])  # [N]
    cand_emb = cand_emb_q.float()  # [N, D] the codes: the cosine is scale-free, ties stay exact

    # Segments are disjoint in time: lifelong tokens at or after the oldest realtime
    # token are already represented by the realtime segments.
    rt_len = rt.lengths  # [U]
    oldest_rt = torch.full((U,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    has_rt = rt_len > 0
    oldest_rt[has_rt] = rt.ts[rt.offsets[1:][has_rt] - 1]
    # newest first (the JaggedSequences contract): a user's tokens to cut lead its range, so
    # its newest token tells whether it has any (a store that cut them already spares the
    # pass over every lifelong token)
    has_ll = ll.lengths > 0  # [U]
    if bool((ll.ts[ll.offsets[:-1][has_ll]] >= oldest_rt[has_ll]).any()):
        ll_old = ll.select(ll.ts < torch.repeat_interleave(oldest_rt, ll.lengths))  # [T_ll] cut per user
    else:
        ll_old = ll
    rt_pos = rt.token_pos()  # [T_rt]
    rt_rest = rt.select(rt_pos >= cfg.r)

    segs: list[tuple[JaggedSequences, torch.Tensor, torch.Tensor]] = []  # (seq, glob idx, count)
    for seq, k in ((ll_old, cfg.k_ll), (rt_rest, cfg.k_rt)):
        local, _ = dispatch.nn_search(seq.emb_q, seq.offsets, cand_emb, cand_offsets, k, seq.norm)
        segs.append((seq, *_segment_from_local(local, seq, cand_user, k)))
    # S_RT[:r]: the r most recent realtime actions, same for every candidate of a user.
    n_recent = torch.clamp(rt_len, max=cfg.r)[cand_user]  # [N]
    slot = torch.arange(cfg.r, device=device)[None, :]  # [1, r]
    local = n_recent[:, None] - 1 - (slot - (cfg.r - n_recent[:, None]))  # [N, r] oldest first
    local = torch.where(slot >= cfg.r - n_recent[:, None], local, torch.full_like(local, -1))
    glob = torch.where(local >= 0, local + rt.offsets[cand_user][:, None], local)
    segs.append((rt, glob, n_recent))
    local, _ = dispatch.nn_search(imp.emb_q, imp.offsets, cand_emb, cand_offsets, cfg.k_imp, imp.norm)
    segs.append((imp, *_segment_from_local(local, imp, cand_user, cfg.k_imp)))

    req_ts = request_ts[cand_user]  # [N]
    counts = torch.stack([cnt for _, _, cnt in segs], 1).to(torch.int16)  # [N, 4]
    if device.type == "cpu":
        return _assemble_cpu(segs, req_ts, N, cfg, counts)
    emb_parts, act_parts, surf_parts, age_parts = [], [], [], []
    for seq, glob, _ in segs:
        pad = glob < 0  # [N, k]
        g: torch.Tensor | None = glob.clamp(min=0)
        if seq.ts.numel() == 0:  # nothing to gather from: all padding
            g = None
        size = glob.shape[1]
        emb = seq.emb_q[g] if g is not None else cand_emb_q.new_zeros(N, size, EMB_DIM)
        act = seq.action[g] if g is not None else torch.zeros(N, size, dtype=torch.uint8, device=device)
        surf = seq.surface[g] if g is not None else torch.zeros(N, size, dtype=torch.int8, device=device)
        ts = seq.ts[g] if g is not None else torch.zeros(N, size, dtype=torch.int64, device=device)
        emb_parts.append(emb.masked_fill(pad[..., None], 0))  # [N, k, D]
        act_parts.append(act.masked_fill(pad, 0))  # [N, k]
        surf_parts.append(surf.masked_fill(pad, 0))  # [N, k]
        age_parts.append(_age_s(req_ts, ts, pad))  # [N, k]
    return SAll(
        emb_q=torch.cat(emb_parts, 1),  # [N, S, D]
        action=torch.cat(act_parts, 1),  # [N, S]
        surface=torch.cat(surf_parts, 1),  # [N, S]
        age_s=torch.cat(age_parts, 1),  # [N, S]
        seg_len=counts,  # [N, 4]
    )


def _age_s(req_ts: torch.Tensor, ts: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """int32 [N, k]: whole seconds from each token to its request (floored, clamped to
    [0, 2^31 - 1]), :data:`PAD_AGE` on padding."""
    age = torch.div(req_ts[:, None] - ts, 1000, rounding_mode="floor")  # [N, k] seconds
    return age.clamp(0, torch.iinfo(torch.int32).max).to(torch.int32).masked_fill(pad, PAD_AGE)


def _assemble_cpu(segs: list[tuple[JaggedSequences, torch.Tensor, torch.Tensor]], req_ts: torch.Tensor,
                  N: int, cfg: FeatureConfig, counts: torch.Tensor) -> SAll:
    """:class:`SAll` of the segments' global token indices, in numpy, each field written
    once into its [N, S] output (the tensor path gathers each segment, masks it and
    concatenates: three passes over ~6 KB a row).

    The 1- and 8-byte fields come from one gather each over the segments' sources laid
    end to end (small: no embeddings), the embeddings from one gather per segment into a
    contiguous block copied into its slots (3x faster than gathering into strided slots).
    """
    S = cfg.seq_len
    glob = torch.cat([g for _, g, _ in segs], 1).numpy()  # [N, S] token of each slot, -1 on padding
    pad = glob < 0  # [N, S]
    emb = np.empty((N, S, EMB_DIM), dtype=np.int8)  # [N, S, D]
    n_tok = [int(q.ts.numel()) for q, _, _ in segs]
    start = np.cumsum([0, *n_tok[:-1]])  # where each segment's source starts, end to end
    lo = 0
    for (seq, g, _), first in zip(segs, start.tolist()):
        size = g.shape[1]
        rows = np.where(pad[:, lo : lo + size], 0, g.numpy())  # [N, k] (padding: row 0, zeroed below)
        if seq.ts.numel():
            emb[:, lo : lo + size] = np.take(seq.emb_q.numpy(), rows, axis=0)  # [N, k, D]
        glob[:, lo : lo + size] = rows + first  # [N, k] row in the end-to-end sources
        lo += size
    glob[pad] = 0  # a real row even where a segment's source is empty (padding: fixed below)
    total = sum(n_tok)

    def gather(field: str, dtype) -> np.ndarray:
        """[N, S] of one per-token field, the segments' values laid end to end."""
        src = np.concatenate([getattr(q, field).numpy() for q, _, _ in segs] or [np.zeros(0, dtype)])
        return np.take(src, glob) if total else np.zeros((N, S), dtype)

    act, surf = gather("action", np.uint8), gather("surface", np.int8)  # [N, S]
    sec = req_ts.numpy()[:, None] - gather("ts", np.int64)  # [N, S] ms before the request
    np.floor_divide(sec, 1000, out=sec)  # _age_s in numpy: floor division, clip, cast
    np.clip(sec, 0, np.iinfo(np.int32).max, out=sec)
    age = sec.astype(np.int32)  # [N, S] in range after the clip
    if pad.any():
        emb[pad], act[pad], surf[pad], age[pad] = 0, 0, 0, PAD_AGE
    return SAll(emb_q=torch.from_numpy(emb), action=torch.from_numpy(act), surface=torch.from_numpy(surf),
                age_s=torch.from_numpy(age), seg_len=counts)


# --- the logged training row -------------------------------------------------------------

def nn_rows_schema(cfg: FeatureConfig) -> pa.Schema:
    """One row per (request, candidate): ids, labels, the candidate and its S_all tokens.

    Bulk token columns are packed bytes (``fixed_size_binary``): ``tok_emb_q`` holds
    S x 32 int8 row-major, ``tok_action`` S uint8 bitmasks, ``tok_surface`` S int8,
    ``cand_emb_q`` 32 int8. Packed bytes write and read ~15x faster than parquet lists
    of int8 (no per-element repetition levels) and are smaller. ``tok_age_s`` and
    ``seg_len`` stay readable lists. An example costs O(|S_all|) bytes, not O(L_LL)
    (paper §3.4.1).
    """
    S = cfg.seq_len
    meta = pa.schema(
        [REQUESTS.field(n) for n in ("request_id", "user_id", "item_id", "ts", "surface", "position")]
        + [REQUESTS.field(c) for c in LABEL_COLUMNS]
    )
    return pa.schema(
        list(meta)
        + [
            pa.field("cand_emb_q", pa.binary(EMB_DIM), nullable=False),
            pa.field("tok_emb_q", pa.binary(S * EMB_DIM), nullable=False),
            pa.field("tok_action", pa.binary(S), nullable=False),
            pa.field("tok_surface", pa.binary(S), nullable=False),
            pa.field("tok_age_s", pa.list_(pa.int32(), S), nullable=False),
            pa.field("seg_len", pa.list_(pa.int16(), len(SEGMENTS)), nullable=False),
        ],
        metadata={"feature_config": json.dumps(cfg.to_dict())},
    )


def _fixed_list(values: torch.Tensor, pa_type: pa.DataType, width: int) -> pa.Array:
    flat = pa.array(values.reshape(-1).cpu().numpy(), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _packed(values: torch.Tensor, width: int) -> pa.Array:
    """[N, ...] 1-byte tensor -> fixed_size_binary(width) array of N rows."""
    data = np.ascontiguousarray(values.reshape(values.shape[0], -1).cpu().numpy())
    # the array's own memory (no bytes copy): the buffer holds a reference to it
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), data.shape[0],
                                                [None, pa.py_buffer(data)])


def s_all_to_arrow(s_all: SAll, cand_emb_q: torch.Tensor, meta: pa.Table, cfg: FeatureConfig) -> pa.Table:
    """Packs S_all tensors plus request metadata columns into :func:`nn_rows_schema` rows."""
    schema = nn_rows_schema(cfg)
    S = cfg.seq_len
    cols = {f.name: meta.column(f.name) for f in schema if f.name in meta.column_names}
    cols["cand_emb_q"] = _packed(cand_emb_q, EMB_DIM)
    cols["tok_emb_q"] = _packed(s_all.emb_q, S * EMB_DIM)
    cols["tok_action"] = _packed(s_all.action, S)
    cols["tok_surface"] = _packed(s_all.surface, S)
    cols["tok_age_s"] = _fixed_list(s_all.age_s, pa.int32(), S)
    cols["seg_len"] = _fixed_list(s_all.seg_len, pa.int16(), len(SEGMENTS))
    return pa.table([cols[f.name] for f in schema], schema=schema)


def arrow_to_s_all(table: pa.Table, cfg: FeatureConfig) -> tuple[SAll, torch.Tensor]:
    """Inverse of :func:`s_all_to_arrow`: (S_all tensors, cand_emb_q int8 [N, D])."""
    S = cfg.seq_len
    N = table.num_rows

    def packed(name: str, dtype, *shape) -> torch.Tensor:
        arr = table.column(name).combine_chunks()
        width = arr.type.byte_width
        buf = arr.buffers()[1]
        flat = np.frombuffer(buf, dtype=np.uint8, count=(arr.offset + N) * width)[arr.offset * width:]
        return torch.from_numpy(flat.view(dtype).reshape(N, *shape).copy())

    def listed(name: str, dtype, *shape) -> torch.Tensor:
        arr = table.column(name).combine_chunks()
        flat = arr.values.to_numpy(zero_copy_only=False)[arr.offset * int(np.prod(shape)):]
        return torch.from_numpy(flat[: N * int(np.prod(shape))].astype(dtype).reshape(N, *shape))

    s_all = SAll(
        emb_q=packed("tok_emb_q", np.int8, S, EMB_DIM),
        action=packed("tok_action", np.uint8, S),
        surface=packed("tok_surface", np.int8, S),
        age_s=listed("tok_age_s", np.int32, S),
        seg_len=listed("seg_len", np.int16, len(SEGMENTS)),
    )
    return s_all, packed("cand_emb_q", np.int8, EMB_DIM)
