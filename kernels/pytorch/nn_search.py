"""PyTorch reference of the NN search (paper Eq. 3) and its exact top-k helpers.

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
"""
from __future__ import annotations

import torch


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
    over the row instead of an int64 key of every score (the table in docs/serving.md has the
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
