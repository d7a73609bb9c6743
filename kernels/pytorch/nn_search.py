"""PyTorch reference of the NN search (paper Eq. 3): batched, exact, tie rule included.

The NN search of every candidate over its own user's sequence, on request-level
de-duplicated inputs (paper §3.4.2): each user's sequence is stored once as a jagged
tensor (values + offsets), and the N candidates are grouped by user with offsets --
nothing is broadcast to candidates.

    NN(S, c) = top-K tokens of S by  <normalise(dequant(E(S))), normalise(e_c)>

Ties are broken towards the lower index, i.e. the more recent token (sequences are
stored newest first). Identical tokens tie *exactly*: a token's score is a function of
the token and the candidate alone, never of where the token sits in the batch (see
:func:`unit_pieces` for float candidates, whose fp32 dots a BLAS sums in an order that
depends on the column). :func:`nn_search` is the reference; the fused Triton kernel
(:mod:`transact.kernels.triton.nn_search`) has the same signature, and callers go
through :func:`transact.kernels.dispatch.nn_search`. S_all itself is built in
:mod:`transact.features.nn_features`.

How the batch is searched (issue 27: one small matmul and one top-k per user spent the
time in tens of thousands of tensor calls, not in arithmetic):

1. Users are sorted by sequence length and cut into **chunks** of similar lengths
   (the shortest at least half the longest, so padding at most doubles a chunk) holding
   at most :data:`CHUNK_SCORES` (candidate, token) pairs, so memory is bounded whatever
   the batch and a chunk's passes stay in cache.
2. A chunk's dots, **token-major** ``[B, L_pad, M_pad]``: long sequences by one int8 GEMM
   per user of its tokens (a view of the jagged values, no copy) with its candidates,
   written into the chunk's buffer (2.5x faster than candidate-major at M = 8: the long
   side is the GEMM's rows); short ones (<= :data:`SHORT_TOKENS`) by one batched fp32
   product of the padded tokens, integers, so exact. Padding tokens score ``-inf``.
3. Scores with the per-user loop's arithmetic, elementwise: ``(dot as float) / |s| / |c|``
   for int8-valued candidates, :func:`combine_pieces` then ``/ |s|`` for others -- so every
   score is bit for bit what it was.
4. The exact top-k per row, in **one sortable int64 key** per score: the order-preserving
   int32 of the float above ``2^32 - 1 - index``, so the key's order is (score desc,
   index asc) and identical tokens tie exactly. Most of a long row is discarded without a
   key: its tokens are cut into contiguous groups of G and the top k *groups* by the key
   of their best score hold the top k tokens (:func:`_select_rows`). On CPU this runs in
   numpy (a linear partition, then a sort of k); elsewhere one ``topk`` of every key.

Per lifelong score (k = 96, ~2,000 tokens, 8 candidates a user) that is ~13 ns of one
core of the 2-core bench machine, against ~85 ns for the loop: a tenth of it the int8
GEMM, the rest memory passes and the selection. The token norms are a function of the
token alone: a caller that holds them per item (the event store) passes them as
``seq_norm`` and the search skips its own pass over the tokens (a sixth of its time).

A compiled selection was tried and not kept (numba, one pass per row: a heap of the k
best keys, 10 ns a score on random scores -- its branches mispredict on every other
insertion; a threshold from a sample of the row, then the exact keys of the tokens above
it, 5 ns): no faster than these numpy passes on the bench's rows, whose SIMD partition
does the selection's heavy part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: (candidate, token) pairs per chunk: a chunk's dot and score buffers (4 bytes each) stay
#: within the L2 cache of the bench machine's cores (2 MiB): the lifelong segments of 12
#: batches took 0.83 s of CPU at 2^17 and 2^18, 0.90 s at 2^19, 1.06 s at 2^20.
CHUNK_SCORES = 1 << 18
#: the shortest sequence of a chunk is at least this share of its longest (padding <= 2x)
PAD_RATIO = 0.5
#: group size G of a row of L tokens and top k: the power of two nearest sqrt(L / (GROUP_C k))
#: -- the group pass costs ~L / G keys, the candidates k G keys (:func:`_group_size`)
GROUP_C = 1.0
MAX_GROUP = 16
#: token rows per block when computing norms (a block's floats stay in cache): 18 ns a
#: token at 1,024 and 4,096 rows, 23-27 at 16,384 (2-core bench machine, CPU time)
NORM_ROWS = 4096
#: sequences up to this many tokens (padded) are scored in one batched product of their
#: gathered tokens; longer ones by one int8 GEMM per user (~6 us a call)
SHORT_TOKENS = 128
_INT32_MIN = -(2**31)
#: tests set this to run the tensor path (what non-CPU devices run) on CPU tensors
_TENSOR_PATH_ON_CPU = False


def nn_search(seq_emb_q: torch.Tensor, seq_offsets: torch.Tensor, cand_emb: torch.Tensor,
              cand_offsets: torch.Tensor, k: int, seq_norm: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K nearest tokens of each candidate's own user sequence (reference).

    Args:
        seq_emb_q: int8 [T, D], the U users' sequences concatenated (newest first each).
        seq_offsets: int64 [U + 1], user u owns rows ``seq_offsets[u]:seq_offsets[u+1]``.
        cand_emb: float [N, D], candidate embeddings (any float dtype). Scores are
            scale-free, so int8 codes as floats work, and keep ties exact.
        cand_offsets: int64 [U + 1], user u owns candidates ``cand_offsets[u]:cand_offsets[u+1]``.
        k: number of neighbours.
        seq_norm: optional float32 [T], :func:`token_norms` of ``seq_emb_q`` when the caller
            already has them: a token's norm is a function of its codes alone, so a store can
            compute it once per item instead of once per request that holds the token (the
            same bits: a given value must be exactly what :func:`token_norms` returns).

    Returns:
        idx: int64 [N, k], token index *within the user's sequence*, best first;
            -1 where the sequence has fewer than k tokens.
        score: float32 [N, k], cosine similarity; -inf where idx is -1.
    """
    device = seq_emb_q.device
    N, T = cand_emb.shape[0], seq_emb_q.shape[0]
    on_cpu = device.type == "cpu" and not _TENSOR_PATH_ON_CPU
    idx = torch.full((N, k), -1, dtype=torch.int64, device=device)
    score = torch.full((N, k), float("-inf"), dtype=torch.float32, device=device)
    # On CPU the selection runs in numpy (a partition is linear, and numpy's ops on small
    # rows cost far less per call than tensor ops), and the results are filled through views.
    idx_np, score_np = (idx.numpy(), score.numpy()) if on_cpu else (np.empty(0), np.empty(0))
    if k == 0 or N == 0 or T == 0:
        return idx, score
    D = seq_emb_q.shape[1]
    # Scores are computed on the int8 codes: the dequantisation scale cancels in the
    # cosine, dot products of int8 codes are exact integers (|sum| <= 32 * 128^2 < 2^24, so
    # exact in fp32 too), and the norms divide elementwise -- so a token's score does not
    # depend on where it sits in the batch, and identical tokens tie exactly.
    cand = cand_emb.float()  # [N, D]
    cand_norm = _divisor_norm(cand)  # [N], +inf for a zero candidate
    int_valued = _is_int8_valued(cand)
    # Dots on the int8 GEMM (VNNI/AMX on x86) where it exists: the same integers as fp32.
    int_dots = _int8_dots_available(seq_emb_q)
    if int_valued:
        lhs = cand.to(torch.int8)[:, None, :]  # [N, 1, D] int8 codes, one "piece"
    else:
        # Any other float candidate: an fp32 dot with it is not exact, and a BLAS sums a
        # column in an order that depends on where the column sits, so identical tokens
        # could score an ulp apart and the tie rule would not decide. Its unit vector split
        # into int8 pieces makes every dot an exact integer again; :func:`combine_pieces`
        # then rounds in one fixed order.
        lhs = unit_pieces(cand, cand_norm).permute(1, 0, 2)  # [N, P, D]
    P = lhs.shape[1]
    lhs_ext = torch.cat([lhs, lhs.new_zeros(1, P, D)])  # [N + 1, P, D]: row N pads candidates
    lhs_ext_f = lhs_ext.float()  # [N + 1, P, D] integer-valued: fp32 dots of them stay exact
    # |c| as the selection divides by it; a zero candidate's +inf becomes 1.0: its real
    # scores are 0 / 1 = +0.0 as 0 / inf, while its row's padding must stay -inf / 1, not
    # -inf / inf = NaN (a NaN key would outrank every score)
    cn_ext = torch.cat([cand_norm.masked_fill(cand_norm == float("inf"), 1.0), cand_norm.new_ones(1)])  # [N + 1]
    # |s| per token, +inf for a zero token; then +0.0 for the padding of long chunks,
    # whose dot is prefilled with -2^31: -2^31 / +0.0 = -inf with no masking pass
    if seq_norm is not None and tuple(seq_norm.shape) != (T,):
        raise ValueError(f"nn_search: seq_norm has shape {tuple(seq_norm.shape)}, the tokens need ({T},)")
    norms = token_norms(seq_emb_q) if seq_norm is None else seq_norm.to(device=device, dtype=torch.float32)  # [T]
    sn = torch.cat([norms, cand_norm.new_zeros(1)])  # [T + 1]
    seq_lo = seq_offsets[:-1].cpu().numpy()  # [U]
    seq_len = (seq_offsets[1:] - seq_offsets[:-1]).cpu().numpy()  # [U]
    cand_lo = cand_offsets[:-1].cpu().numpy()  # [U]
    cand_n = (cand_offsets[1:] - cand_offsets[:-1]).cpu().numpy()  # [U]
    chunks = _plan(seq_len, cand_lo, cand_n, k, P, D)
    if not chunks:
        return idx, score
    # One buffer pair for every chunk: no allocation (and no fresh pages) per chunk.
    cap = max(c.users.size * c.L_pad * c.M_pad for c in chunks)
    dots_buf = torch.empty(cap * P, dtype=torch.int32 if int_dots else torch.float32, device=device)
    s1_buf = torch.empty(cap, dtype=torch.float32, device=device)
    seq = seq_emb_q if int_dots else seq_emb_q.float()  # [T, D]
    # every user's tokens as a view, made in one call (users own consecutive row ranges)
    user_tokens = torch.split(seq[int(seq_offsets[0]) : int(seq_offsets[-1])], seq_len.tolist())
    for c in chunks:
        B, L_pad, M_pad = c.users.size, c.L_pad, c.M_pad
        L = seq_len[c.users]  # [B]
        slot = np.arange(M_pad)
        # candidate row of each (user, slot), N (the zero row) on padding
        cidx = np.where(slot < c.m[:, None], c.c0[:, None] + slot, N)  # [B, M_pad]
        tok = np.arange(L_pad)
        pad = tok >= L[:, None]  # [B, L_pad] padding tokens
        tidx = np.minimum(seq_lo[c.users][:, None] + tok, T - 1)  # [B, L_pad] token row (padding: any)
        cidx_t = torch.from_numpy(cidx).to(device)  # [B, M_pad]
        if c.short:  # one batched product of the padded tokens: no per-user call
            toks = (torch.from_numpy(np.take(seq_emb_q.numpy(), tidx, axis=0)) if on_cpu
                    else seq_emb_q[torch.from_numpy(tidx).to(device)]).float()  # [B, L_pad, D] integers
            lhs_f = lhs_ext_f[cidx_t].reshape(B, M_pad * P, D)  # [B, M_pad P, D]
            dots = torch.bmm(toks, lhs_f.transpose(1, 2))  # [B, L_pad, M_pad P] exact integers
        else:  # one GEMM per user, of a view of its tokens, into the chunk's buffer
            lhs_pad = (lhs_ext if int_dots else lhs_ext_f)[cidx_t].reshape(B, M_pad * P, D)  # [B, M_pad P, D]
            dots = dots_buf[: B * L_pad * M_pad * P].view(B, L_pad, M_pad * P)  # [B, L_pad, M_pad P]
            mm = torch._int_mm if int_dots else torch.mm
            for u, cands, out, n in zip(c.users.tolist(), lhs_pad.transpose(1, 2).unbind(0), dots.unbind(0),
                                        L.tolist()):
                mm(user_tokens[u], cands, out=out[:n])  # [n, M_pad P] int32 (or fp32 integers): exact
                if n < L_pad:
                    out[n:] = _INT32_MIN  # this user's padding rows only: / +0.0 below gives -inf
            tidx = np.where(pad, T, tidx)  # [B, L_pad] padding: the +0.0 norm
        s1 = s1_buf[: B * L_pad * M_pad].view(B, L_pad, M_pad)  # [B, L_pad, M_pad]
        sn_pad = torch.from_numpy(sn.numpy()[tidx]) if on_cpu else sn[torch.from_numpy(tidx).to(device)]  # [B, L_pad]
        cn: torch.Tensor | None
        if P == 1:
            if on_cpu:  # float(dot) / |s| in one pass (float32 throughout: the same two roundings)
                with np.errstate(divide="ignore"):  # padding: -2^31 / +0.0 = -inf, as meant
                    np.divide(dots.numpy(), sn_pad.numpy()[:, :, None], out=s1.numpy(), dtype=np.float32,
                              casting="unsafe")
            else:
                s1.copy_(dots).div_(sn_pad[:, :, None])  # float(dot) exact (|dot| < 2^24), / |s|
            cn = cn_ext[cidx_t]  # [B, M_pad]: the / |c| comes in the selection
        else:
            s1.copy_(combine_pieces(dots.view(B, L_pad, M_pad, P).permute(3, 0, 1, 2)))  # [B, L_pad, M_pad]
            s1.div_(sn_pad[:, :, None])  # / |s|
            cn = None  # the pieces are of the unit vector: no / |c|
        if dots.dtype != torch.int32:
            s1.add_(0.0)  # float dots: a -0.0 dot (all-zero token) becomes +0.0
        if c.short and pad.any():  # gathered padding tokens: their scores to -inf
            s1.masked_fill_(torch.from_numpy(pad).to(device)[:, :, None], float("-inf"))
        kk = min(k, L_pad)
        valid = (slot < c.m[:, None]).reshape(-1)  # [B M_pad] rows of real candidates
        rows = cidx.reshape(-1)[valid]  # [R] their candidate rows
        if on_cpu:
            cols, vals = _select_rows(s1.numpy(), None if cn is None else cn.numpy(), kk, c.G)  # [B M_pad, kk]
            cols[vals == -np.inf] = -1  # a padding token: the sequence is shorter than k
            idx_np[rows, :kk] = cols[valid]
            score_np[rows, :kk] = vals[valid]
        else:
            cols_t, vals_t = _select_rows_torch(s1, cn, kk)  # [B M_pad, kk]
            cols_t = cols_t.masked_fill(vals_t == float("-inf"), -1)
            valid_t = torch.from_numpy(valid).to(device)
            rows_t = torch.from_numpy(rows).to(device)
            idx[rows_t, :kk] = cols_t[valid_t]
            score[rows_t, :kk] = vals_t[valid_t]
    return idx, score


@dataclass
class _Chunk:
    """Users searched together: their ids, candidate ranges, padded sizes, group size."""

    users: np.ndarray  # int64 [B]
    c0: np.ndarray  # int64 [B] first candidate row
    m: np.ndarray  # int64 [B] candidates
    L_pad: int  # tokens per user, padded (a multiple of G)
    M_pad: int  # candidates per user, padded
    G: int  # tokens per group in the selection
    short: bool  # dots of the padded tokens in one batched product (else one GEMM per user)


def _plan(seq_len: np.ndarray, cand_lo: np.ndarray, cand_n: np.ndarray, k: int, P: int, D: int) -> list[_Chunk]:
    """Users with tokens and candidates, longest first, cut into chunks of similar lengths
    (the shortest >= :data:`PAD_RATIO` of the longest) of at most :data:`CHUNK_SCORES`
    floats of scores (and, for short sequences, of gathered tokens) -- at least one user;
    a user whose candidates alone pass the budget is split into several entries of the
    same sequence."""
    active = np.flatnonzero((seq_len > 0) & (cand_n > 0))
    order = active[np.argsort(-seq_len[active], kind="stable")]  # longest first
    # split candidate ranges too long for one chunk: entry e is user users[e]'s candidates
    # c0[e] : c0[e] + m[e] (in numpy: a loop over users cost ~2% of a logging pass)
    step = np.maximum(1, CHUNK_SCORES // (seq_len[order] * P))  # [A] candidates per entry
    pieces = -(-cand_n[order] // step)  # [A]
    users = np.repeat(order, pieces)  # [E]
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)  # [E] first entry of its user
    lo = (np.arange(users.size) - first) * np.repeat(step, pieces)  # [E] offset in the user's range
    c0 = cand_lo[users] + lo
    m = np.minimum(np.repeat(step, pieces), cand_n[users] - lo)
    lens = seq_len[users]  # [E], non-increasing
    chunks: list[_Chunk] = []
    i, n = 0, users.size
    while i < n:
        L_max = int(lens[i])
        G = _group_size(L_max, min(k, L_max))
        L_pad = -(-L_max // G) * G
        short = L_pad <= SHORT_TOKENS
        # the chunk ends at the first entry too short for it, or past the budget with the
        # widest candidate range so far (at least one entry); no entry past `fit` can be in
        # it, so the scan stays linear in the entries however many chunks there are
        fit = CHUNK_SCORES // (L_pad * (P + (D if short else 0))) + 1
        end = i + int(np.searchsorted(-lens[i : i + fit], -PAD_RATIO * L_max, side="right"))
        width = np.maximum.accumulate(m[i:end]) * P + (D if short else 0)  # [end - i]
        over = np.flatnonzero(np.arange(1, end - i + 1) * L_pad * width > CHUNK_SCORES)
        j = i + max(1, int(over[0]) if over.size else end - i)
        chunks.append(_Chunk(users[i:j], c0[i:j], m[i:j], L_pad, int(m[i:j].max()), G, short))
        i = j
    return chunks


def _group_size(L: int, k: int) -> int:
    """Tokens per group for a top k of L: the power of two nearest sqrt(L / (GROUP_C k)),
    1 where the groups would not cut the row (at least 2 k groups are needed)."""
    if k == 0 or L < 4 * k:
        return 1
    g = 2 ** round(math.log2(max(1.0, math.sqrt(L / (GROUP_C * k)))))
    return max(1, min(MAX_GROUP, g))


def token_norms(seq_emb_q: torch.Tensor) -> torch.Tensor:
    """float32 [T]: |s| of each int8 token, +inf for a zero token -- bit-equal to
    ``_divisor_norm(seq_emb_q.float())`` (the sum of squares is an exact integer, and the
    square root is PyTorch's, as before), in blocks of :data:`NORM_ROWS` rows: no float
    copy of the whole sequence, and a block stays in cache between its passes."""
    T, D = seq_emb_q.shape
    out = torch.empty(T, dtype=torch.float32, device=seq_emb_q.device)  # [T]
    if seq_emb_q.device.type == "cpu":
        q, o = seq_emb_q.numpy(), out.numpy()
        ones = np.ones(D, dtype=np.float32)
        for lo in range(0, T, NORM_ROWS):
            f = q[lo : lo + NORM_ROWS].astype(np.float32)  # [n, D] integer-valued
            np.multiply(f, f, out=f)
            np.dot(f, ones, out=o[lo : lo + NORM_ROWS])  # [n] exact: < 2^24
    else:
        for lo in range(0, T, NORM_ROWS):
            out[lo : lo + NORM_ROWS] = seq_emb_q[lo : lo + NORM_ROWS].float().square().sum(-1)
    out.sqrt_()  # PyTorch's square root: the old path's (it is not numpy's in every last bit)
    return out.masked_fill_(out == 0, float("inf"))


def _select_rows(s1: np.ndarray, cn: np.ndarray | None, k: int, G: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k of every (user, candidate) row of a chunk, best first.

    Args:
        s1: float32 [B, L, M] token-major; the score is ``s1 / cn`` (``cn`` float32 [B, M])
            or ``s1`` itself (``cn`` None). -inf on padding.
        k: <= L. G: tokens per group (L is a multiple of G).

    Returns:
        cols int64 [B M, k] token index, vals float32 [B M, k] score, ordered by the key
        (score desc, index asc).

    Every score x at token i has the key ``K(x, i) = ord(x) 2^32 + (2^32 - 1 - i)``, where
    ord maps float32 bits to an int32 of the same order (:func:`_keys`): distinct keys,
    and the top k keys are the contract's answer. Tokens are cut into contiguous groups
    of G; a group's key is the key of its best token, ``K(max x, lowest i with that x)``.
    Each of the top k tokens lies in one of the top k groups by key: if its group h were
    not, k groups would have keys above h's, hence above the token's, and each holds a
    token with that key. The top k groups' k G tokens then give the answer.

    With contiguous groups the key of group g can be built from its maximum alone as
    ``K(max, g)``: groups in index order hold tokens in index order, so among groups of
    equal maxima the lower g holds the lower-index best token. ``max x / cn`` is the
    maximum of ``x / cn`` (division by cn > 0 is monotone), so the division by cn runs
    only on group maxima and on the k G candidates.
    """
    B, L, M = s1.shape
    R = B * M
    rows_first = ((np.arange(B) * (L * M))[:, None] + np.arange(M)).reshape(R, 1)  # [R, 1] flat token 0
    cnr = None if cn is None else cn.reshape(R, 1)  # [R, 1]
    nb = L // G
    if G > 1 and nb > k:
        gmax = torch.from_numpy(s1)
        for _ in range(int(math.log2(G))):  # pairwise maxima: contiguous groups of G
            pairs = gmax.view(B, -1, 2, M)  # [B, n / 2, 2, M]
            # torch: 2x numpy's speed on these 32-byte runs of M = 8 floats
            gmax = torch.maximum(pairs[:, :, 0], pairs[:, :, 1])  # [B, n / 2, M]
        gm = gmax.numpy().transpose(0, 2, 1).reshape(R, nb)  # [R, nb] (a copy)
        if cnr is not None:
            gm /= cnr  # the groups' best scores
        top_g = _top_keys(_keys(gm, np.arange(nb, dtype=np.int64)), k, ordered=False)  # [R, k]
        g = 0xFFFFFFFF - (top_g & 0xFFFFFFFF)  # [R, k] group index
        tok = (g[:, :, None] * G + np.arange(G)).reshape(R, k * G)  # [R, k G] token index
    else:  # short rows: every token is a candidate
        tok = np.broadcast_to(np.arange(L, dtype=np.int64), (R, L))  # [R, L]
    vals = np.take(s1.reshape(-1), rows_first + tok * M)  # [R, W] float32
    if cnr is not None:
        vals /= cnr  # the scores: (dot / |s|) / |c|
    top = _top_keys(_keys(vals, tok), k, ordered=True)  # [R, k] best first
    hi = (top >> 32).astype(np.int32)  # [R, k] ord(score)
    cols = 0xFFFFFFFF - (top & 0xFFFFFFFF)  # [R, k]
    return cols, (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(np.float32)  # ord is its own inverse


def _keys(vals: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """int64 keys ordered as (value desc, col asc) read in descending order: the float's
    bits as an order-preserving int32 (negative floats have their magnitude bits flipped:
    larger magnitude, smaller int) in the high half, ``2^32 - 1 - col`` in the low half.
    ``vals``: no NaN, no -0.0 (+0.0 and -0.0 would not tie)."""
    key = vals.view(np.int32).astype(np.int64)  # [..., W] the bits, sign-extended
    flip = key >> 63  # [..., W] -1 for a negative float, else 0
    flip &= 0x7FFFFFFF
    key ^= flip  # monotonic in the float
    key <<= 32
    key |= 0xFFFFFFFF
    key -= cols  # the low half: 2^32 - 1 - col (in place: no temporary)
    return key  # [..., W]


def _top_keys(keys: np.ndarray, k: int, ordered: bool) -> np.ndarray:
    """int64 [R, k]: each row's k largest keys (descending if ``ordered``). A partition
    (linear) then a sort of only k: the keys are distinct, so no tie is left to chance."""
    W = keys.shape[1]
    top = np.partition(keys, W - k, axis=1)[:, W - k :] if W > k else keys  # [R, k]
    return np.sort(top, axis=1)[:, ::-1] if ordered else top


def _select_rows_torch(s1: torch.Tensor, cn: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_select_rows` on any device in tensor calls: the key of every score and one
    ``topk`` per row (sorted: the key order is the contract's)."""
    B, L, M = s1.shape
    x = s1.permute(0, 2, 1).reshape(B * M, L)  # [R, L] candidate-major copy
    if cn is not None:
        x = x / cn.reshape(B * M, 1)  # [R, L]
    top = torch.topk(_tie_break_key(x), k, dim=1).values  # [R, k] best first
    cols = 0xFFFFFFFF - (top & 0xFFFFFFFF)  # [R, k]
    return cols, torch.gather(x, 1, cols)


def _tie_break_key(scores: torch.Tensor) -> torch.Tensor:
    """float32 [R, L] -> int64 [R, L] whose order is (score desc, column asc); the tensor
    form of :func:`_keys`."""
    bits = scores.contiguous().view(torch.int32).to(torch.int64)  # [R, L]
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # [R, L] monotonic in the float
    col = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int64)  # [L]
    return (ordered << 32) | (0xFFFFFFFF - col)  # [R, L]


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
    """[P, ...] exact piece dots (float or int32) -> float32 [...]: Horner from the smallest
    piece, one fixed order (the kernel's), so equal dots give bit-equal results."""
    acc = dots[N_PIECES - 1].float()
    for p in range(N_PIECES - 2, -1, -1):
        acc = acc * (1.0 / 128.0) + dots[p]  # the product is exact: a power of two
    return acc * (1.0 / FIRST_PIECE_SCALE)


def _int8_dots_available(seq_emb_q: torch.Tensor) -> bool:
    return seq_emb_q.dtype == torch.int8 and seq_emb_q.device.type == "cpu" and hasattr(torch, "_int_mm")


def _is_int8_valued(x: torch.Tensor) -> bool:
    """True when every value of float ``x`` is an integer in [-128, 127] (int8 codes)."""
    return x.numel() == 0 or bool(((x == x.round()) & (x >= -128) & (x <= 127)).all())
