"""NN features (paper Eq. 2-3): the one definition of S_all, shared by training-row
logging and serving.

Inputs are *request-level de-duplicated* (paper §3.4.2): each user's sequences are
stored once as jagged tensors (values + offsets), and the N candidates are grouped
by user with offsets -- nothing is broadcast to candidates before the NN search.

    NN(S, c) = top-K tokens of S by  <normalise(dequant(E(S))), normalise(e_c)>

Ties are broken towards the lower index, i.e. the more recent token (sequences are
stored newest first). Identical tokens tie *exactly*: a token's score is a function of
the token and the candidate alone, never of where the token sits in the batch (see
:func:`unit_pieces` for float candidates, whose fp32 dots a BLAS sums in an order that
depends on the column). ``nn_search`` below is the PyTorch reference; the fused Triton
kernel in ``kernels/`` has the same signature, and callers go through
``transact.kernels.dispatch.nn_search``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

import pyarrow as pa
import torch

from transact.data.schema import EMB_DIM, LABEL_COLUMNS, REQUESTS
from transact.model.config import SEGMENTS, FeatureConfig

PAD_AGE: int = -1  # tok_age_s of a padding slot


def nn_search(seq_emb_q: torch.Tensor, seq_offsets: torch.Tensor, cand_emb: torch.Tensor,
              cand_offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K nearest tokens of each candidate's own user sequence (reference).

    Args:
        seq_emb_q: int8 [T, D], the U users' sequences concatenated (newest first each).
        seq_offsets: int64 [U + 1], user u owns rows ``seq_offsets[u]:seq_offsets[u+1]``.
        cand_emb: float [N, D], candidate embeddings (any float dtype). Scores are
            scale-free, so int8 codes as floats work, and keep ties exact.
        cand_offsets: int64 [U + 1], user u owns candidates ``cand_offsets[u]:cand_offsets[u+1]``.
        k: number of neighbours.

    Returns:
        idx: int64 [N, k], token index *within the user's sequence*, best first;
            -1 where the sequence has fewer than k tokens.
        score: float32 [N, k], cosine similarity; -inf where idx is -1.
    """
    device = seq_emb_q.device
    N = cand_emb.shape[0]
    idx = torch.full((N, k), -1, dtype=torch.int64, device=device)
    score = torch.full((N, k), float("-inf"), dtype=torch.float32, device=device)
    if k == 0 or N == 0:
        return idx, score
    # Scores are computed on the int8 codes: the dequantisation scale cancels in the
    # cosine, dot products of int8 codes are exact in fp32 (|sum| <= 32 * 127^2 < 2^24),
    # and the norms divide elementwise -- so a token's score does not depend on where it
    # sits in the batch, and identical tokens tie exactly (the tie rule then decides).
    seq = seq_emb_q.float()  # [T, D] integer-valued
    seq_norm = _divisor_norm(seq)  # [T]
    cand = cand_emb.float()  # [N, D]
    cand_norm = _divisor_norm(cand)  # [N]
    # Candidates given as int8 codes (the serving and logging paths): the dots in int32 on
    # the int8 GEMM (VNNI on x86), the same integers as the fp32 product; with the float
    # conversion 2.0 vs 4.6 ms at 256 x 16,384 on the 2-core bench machine.
    int_valued = _is_int8_valued(cand)
    int_dots = int_valued and _int8_dots_available(seq_emb_q)
    if int_dots:
        seq_t = seq_emb_q.T  # [D, T] int8 view
        cand = cand.to(torch.int8)  # [N, D]
    if not int_valued:
        # Any other float candidate: an fp32 dot with it is not exact, and a BLAS sums a
        # column in an order that depends on where the column sits (the tail of a 4- or
        # 8-wide block differs), so identical tokens could score an ulp apart and the tie
        # rule would not decide. Its unit vector split into int8 pieces makes every dot
        # an exact integer again; :func:`combine_pieces` then rounds in one fixed order.
        pieces = unit_pieces(cand, cand_norm).float()  # [P, N, D] integer-valued
    seq_len = (seq_offsets[1:] - seq_offsets[:-1]).tolist()  # [U]
    cand_lo, cand_hi = cand_offsets[:-1].tolist(), cand_offsets[1:].tolist()
    seq_lo = seq_offsets[:-1].tolist()
    # One small matmul per user over views of the jagged values: no padding, no copy of
    # a user's sequence per candidate (the de-duplicated layout), and on CPU cheaper
    # than padding users of very different lengths to a common one.
    for u, n in enumerate(seq_len):
        c0, c1 = cand_lo[u], cand_hi[u]
        if n == 0 or c1 == c0:
            continue
        s0 = seq_lo[u]
        # cosine = dot / |s| / |c|, in place (a zero vector's norm is +inf: its scores are +0.0)
        if not int_valued:  # |sum| <= 32 * 127 * 64 < 2^24: exact in fp32 in any order
            dots = pieces[:, c0:c1] @ seq[s0 : s0 + n].T  # [P, M_u, L_u]
            sc = combine_pieces(dots).div_(seq_norm[s0 : s0 + n][None, :])  # [M_u, L_u]
        else:
            if int_dots:
                dots = torch._int_mm(cand[c0:c1], seq_t[:, s0 : s0 + n]).float()  # [M_u, L_u], exact
            else:
                dots = cand[c0:c1] @ seq[s0 : s0 + n].T  # [M_u, L_u], integers: exact
            sc = dots.div_(seq_norm[s0 : s0 + n][None, :]).div_(cand_norm[c0:c1, None])  # [M_u, L_u]
        if not int_dots:
            sc.add_(0.0)  # float candidates: a -0.0 dot (all-zero token) becomes +0.0
        kk = min(k, n)
        top = topk_tie_break(sc, kk)  # [M_u, kk]
        idx[c0:c1, :kk] = top
        score[c0:c1, :kk] = torch.gather(sc, 1, top)
    return idx, score


def _divisor_norm(x: torch.Tensor) -> torch.Tensor:
    """|x| per row [R], with +inf for a zero row: dividing a dot product (an integer-valued
    float, finite) by it gives the cosine's factor, and 0.0 for a zero vector -- never NaN,
    so the scores need no NaN clean-up pass."""
    norm = x.square().sum(-1).sqrt()  # [R]
    return norm.masked_fill_(norm == 0, float("inf"))


#: int8 pieces of a candidate's unit vector, and the scale of the first (later ones: 2^7)
N_PIECES = 4
FIRST_PIECE_SCALE = 64.0


def unit_pieces(cand: torch.Tensor, cand_norm: torch.Tensor | None = None) -> torch.Tensor:
    """float [N, D] -> int8 [P, N, D] with  c / |c|  ~=  sum_p h_p * 2^-(6 + 7 p).

        a_0 = 64 c / |c|,   h_p = round(a_p),   a_{p+1} = 128 (a_p - h_p)

    |c_d| <= |c| gives |a_0| <= 64; ``a_p - h_p`` is exact (Sterbenz) and in [-1/2, 1/2],
    so every |h_p| <= 64 fits int8. Four pieces keep 27 bits of each coordinate: the
    cosine is off by at most sqrt(32) * 2^-28 < 3e-8, fp32 rounding's size. A dot of a
    piece with int8 codes is an integer below 32 * 127 * 64 < 2^24, exact in fp32 and
    int32 in any summation order -- the point: scores then depend on the token and the
    candidate only. A zero candidate gives zero pieces (scores +0.0). The Triton kernel
    takes these same pieces, so both implementations score from identical integers.
    """
    c = cand.float()  # [N, D]
    norm = _divisor_norm(c) if cand_norm is None else cand_norm  # [N], +inf for a zero row
    a = c / norm[:, None] * FIRST_PIECE_SCALE  # [N, D], |a| <= 64
    out = []
    for _ in range(N_PIECES):
        h = torch.round(a)  # [N, D]
        out.append(h.to(torch.int8))
        a = (a - h) * 128.0  # exact: the residual, rescaled
    return torch.stack(out)  # [P, N, D]


def combine_pieces(dots: torch.Tensor) -> torch.Tensor:
    """float [P, ...] exact piece dots -> float32 [...]: Horner from the smallest piece,
    one fixed order (the kernel's), so equal dots give bit-equal results."""
    acc = dots[N_PIECES - 1].float()
    for p in range(N_PIECES - 2, -1, -1):
        acc = acc * (1.0 / 128.0) + dots[p]  # the product is exact: a power of two
    return acc * (1.0 / FIRST_PIECE_SCALE)


def _int8_dots_available(seq_emb_q: torch.Tensor) -> bool:
    return seq_emb_q.dtype == torch.int8 and seq_emb_q.device.type == "cpu" and hasattr(torch, "_int_mm")


def _is_int8_valued(x: torch.Tensor) -> bool:
    """True when every value of float ``x`` is an integer in [-128, 127] (int8 codes)."""
    return x.numel() == 0 or bool(((x == x.round()) & (x >= -128) & (x <= 127)).all())


def topk_tie_break(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [M, k]: each row's k best columns ordered (score desc, index asc).

    A float ``topk`` of k + 1 finds each row's k-th and (k+1)-th best scores. Where they
    differ (no tie straddles the cut) the first k are the answer's set and only those k
    are ordered by the tie rule; rows with a straddling tie (a sequence holding the same
    item more than once) are settled by :func:`_settle_straddling_ties`. Same result as
    ``topk(_tie_break_key(scores))`` at a fraction of the cost: building the int64 key
    of every score dominated the NN search on CPU. ``scores``: no NaN, no -0.0.
    """
    L = scores.shape[1]
    if k == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.int64, device=scores.device)
    vals, top = _topk_by_groups(scores, min(k + 1, L))  # [M, k(+1)] desc, any order among ties
    order = torch.argsort(_tie_break_key(vals[:, :k], top[:, :k]), dim=1, descending=True)  # [M, k]
    out = torch.gather(top[:, :k], 1, order)  # [M, k] (score desc, index asc)
    if k < L:
        straddle = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()  # a tie at the cut
        if straddle.numel():
            out[straddle] = _settle_straddling_ties(scores[straddle], vals[straddle, :k], out[straddle], k)
    return out


def _settle_straddling_ties(scores: torch.Tensor, vals: torch.Tensor, ordered: torch.Tensor,
                            k: int) -> torch.Tensor:
    """int64 [R, k]: the exact (score desc, index asc) top k of rows whose k-th best score
    v ties with the (k+1)-th.

    ``vals`` [R, k]: each row's k best scores, descending; ``ordered`` [R, k]: their
    columns in the tie rule's order. Fewer than k scores exceed v, so all of them are
    there and come first, already in order; the remaining slots go to the lowest-index
    columns scoring exactly v, in index order -- one comparison and one running count
    over the row instead of an int64 key of every score (the README's table has the
    measurement).
    """
    v = vals[:, k - 1]  # [R] the k-th best score
    n_above = (vals > v[:, None]).sum(1)  # [R] < k: the first n_above of ``ordered`` stand
    out = ordered.clone()  # [R, k]
    tied = scores == v[:, None]  # [R, L]
    rank = tied.cumsum(1)  # [R, L] 1-based rank of a tied column among its row's, by index
    take = tied & (rank <= (k - n_above)[:, None])  # [R, L] the lowest-index tied columns
    rows, cols = torch.nonzero(take, as_tuple=True)  # row-major: columns ascending per row
    out[rows, n_above[rows] + rank[rows, cols] - 1] = cols
    return out


#: columns per group of :func:`_topk_by_groups`, and how many groups per selected value
#: a row needs before the group pass pays (the NN search's top-k over 256 x 16,384 scores,
#: k = 96, on the 2-core bench machine, same process: 7.5 -> 6.2 ms)
TOPK_GROUP_SIZE = 8
TOPK_GROUPS_PER_VALUE = 4


def _topk_by_groups(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` for long rows: the same k values, best first, and
    columns holding them (any order among equal values, as ``topk``).

    ``torch.topk`` keeps a heap over every score of a row. Here a row's columns are dealt
    into nb = L // B groups of B (group j: columns j, j + nb, j + 2 nb, ...; the max over
    groups is one vectorised pass over B contiguous slices); the k groups with the largest
    maxima hold the row's k largest values -- each of those k maxima is a score at least as
    large as anything in a group left out, so no left-out score can displace one of them --
    and ``topk`` runs over those k x B scores plus the L mod B last columns.
    """
    M, L = scores.shape
    B = TOPK_GROUP_SIZE
    nb = L // B
    if nb < TOPK_GROUPS_PER_VALUE * k:
        return torch.topk(scores, k, dim=1)
    gmax = scores[:, : nb * B].unflatten(1, (B, nb)).amax(dim=1)  # [M, nb]
    groups = torch.topk(gmax, k, dim=1).indices  # [M, k]
    cols = (groups[:, :, None] + nb * torch.arange(B, device=scores.device)).flatten(1)  # [M, k * B]
    if nb * B < L:  # the last L mod B columns are always candidates
        tail = torch.arange(nb * B, L, device=scores.device).expand(M, -1)  # [M, L - nb * B]
        cols = torch.cat([cols, tail], dim=1)
    vals, pos = torch.topk(torch.gather(scores, 1, cols), k, dim=1)  # [M, k]
    return vals, torch.gather(cols, 1, pos)


def _tie_break_key(scores: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [N, L] -> int64 [N, L] whose order is (score desc, index asc).

    The float's bits are mapped to an order-preserving int32 (negative floats have
    their magnitude bits flipped) in the high half; the low half holds
    ``2^32 - 1 - index`` (``index``: the column by default), so one ``topk`` gives the
    contract's tie rule exactly without a full sort.
    """
    bits = scores.contiguous().view(torch.int32).to(torch.int64)  # [N, L]
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # [N, L] monotonic in the float
    if index is None:
        index = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int64)  # [L]
    return (ordered << 32) | (0xFFFFFFFF - index)  # [N, L]


@dataclass
class JaggedSequences:
    """U users' token sequences, concatenated, newest first within each user.

    emb_q int8 [T, D], action uint8 [T], surface int8 [T], ts int64 [T] (ms),
    offsets int64 [U + 1].
    """

    emb_q: torch.Tensor
    action: torch.Tensor
    surface: torch.Tensor
    ts: torch.Tensor
    offsets: torch.Tensor

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

    def select(self, keep: torch.Tensor) -> "JaggedSequences":
        """Keeps the tokens where ``keep`` (bool [T]) is True; order is preserved (``self``,
        not a copy, when every token is kept)."""
        if bool(keep.all()):
            return self
        user = self.token_user()[keep]
        counts = torch.bincount(user, minlength=self.num_users)  # [U]
        offsets = torch.zeros(self.num_users + 1, dtype=torch.int64, device=self.offsets.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return JaggedSequences(self.emb_q[keep], self.action[keep], self.surface[keep],
                               self.ts[keep], offsets)

    def to(self, device) -> "JaggedSequences":
        return JaggedSequences(*(t.to(device) for t in (self.emb_q, self.action, self.surface,
                                                           self.ts, self.offsets)))

    @staticmethod
    def empty(num_users: int, device=None) -> "JaggedSequences":
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


def _segment_from_local(local: torch.Tensor, seq: JaggedSequences, cand_user: torch.Tensor,
                        size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orders selected tokens oldest -> newest, padding first.

    local: int64 [N, size] indices within the user's sequence (-1 = none).
    Returns global token indices [N, size] (-1 = padding) and valid counts [N].
    """
    # Newest first storage: larger local index = older. Padding sorts first.
    key = torch.where(local < 0, torch.full_like(local, torch.iinfo(torch.int64).max), local)
    local = torch.sort(key, dim=1, descending=True).values  # [N, size]
    pad = local == torch.iinfo(torch.int64).max
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
    from transact.kernels.dispatch import nn_search as nn_search_dispatch

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
    ll_old = ll.select(ll.ts < oldest_rt[ll.token_user()])
    rt_pos = rt.token_pos()  # [T_rt]
    rt_rest = rt.select(rt_pos >= cfg.r)

    segs: list[tuple[JaggedSequences, torch.Tensor, torch.Tensor]] = []  # (seq, glob idx, count)
    for seq, k in ((ll_old, cfg.k_ll), (rt_rest, cfg.k_rt)):
        local, _ = nn_search_dispatch(seq.emb_q, seq.offsets, cand_emb, cand_offsets, k)
        segs.append((seq, *_segment_from_local(local, seq, cand_user, k)))
    # S_RT[:r]: the r most recent realtime actions, same for every candidate of a user.
    n_recent = torch.clamp(rt_len, max=cfg.r)[cand_user]  # [N]
    slot = torch.arange(cfg.r, device=device)[None, :]  # [1, r]
    local = n_recent[:, None] - 1 - (slot - (cfg.r - n_recent[:, None]))  # [N, r] oldest first
    local = torch.where(slot >= cfg.r - n_recent[:, None], local, torch.full_like(local, -1))
    glob = torch.where(local >= 0, local + rt.offsets[cand_user][:, None], local)
    segs.append((rt, glob, n_recent))
    local, _ = nn_search_dispatch(imp.emb_q, imp.offsets, cand_emb, cand_offsets, cfg.k_imp)
    segs.append((imp, *_segment_from_local(local, imp, cand_user, cfg.k_imp)))

    emb_parts, act_parts, surf_parts, age_parts, counts = [], [], [], [], []
    req_ts = request_ts[cand_user]  # [N]
    for seq, glob, cnt in segs:
        pad = glob < 0  # [N, k]
        g = glob.clamp(min=0)
        if seq.ts.numel() == 0:  # nothing to gather from: all padding
            g = None
        size = glob.shape[1]
        emb = seq.emb_q[g] if g is not None else cand_emb_q.new_zeros(N, size, EMB_DIM)
        act = seq.action[g] if g is not None else torch.zeros(N, size, dtype=torch.uint8, device=device)
        surf = seq.surface[g] if g is not None else torch.zeros(N, size, dtype=torch.int8, device=device)
        ts = seq.ts[g] if g is not None else torch.zeros(N, size, dtype=torch.int64, device=device)
        emb = emb.masked_fill(pad[..., None], 0)  # [N, k, D]
        act = act.masked_fill(pad, 0)  # [N, k]
        surf = surf.masked_fill(pad, 0)  # [N, k]
        age = torch.div(req_ts[:, None] - ts, 1000, rounding_mode="floor")  # [N, k] seconds
        age = age.clamp(0, torch.iinfo(torch.int32).max).to(torch.int32).masked_fill(pad, PAD_AGE)
        emb_parts.append(emb), act_parts.append(act), surf_parts.append(surf), age_parts.append(age)
        counts.append(cnt)
    return SAll(
        emb_q=torch.cat(emb_parts, 1),  # [N, S, D]
        action=torch.cat(act_parts, 1),  # [N, S]
        surface=torch.cat(surf_parts, 1),  # [N, S]
        age_s=torch.cat(age_parts, 1),  # [N, S]
        seg_len=torch.stack(counts, 1).to(torch.int16),  # [N, 4]
    )


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
    data = values.reshape(values.shape[0], -1).cpu().numpy()
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), data.shape[0],
                                                [None, pa.py_buffer(data.tobytes())])


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
