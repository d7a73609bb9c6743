"""Fused NN search over request-level de-duplicated sequences (paper §3.4.2, Eq. 3).

One kernel does, for every candidate c of user u and every token t of u's own sequence:

    c / |c|  ~=  sum_p h_p(c) 2^-(6 + 7p),  h_p int8     (:func:`unit_pieces`, host side)
    s(c,t) = (sum_p 2^-(6 + 7p) <h_p(c), q_t>) / |q_t|   (cosine on the int8 codes q_t)
    NN(c) = the K tokens of largest s(c, t), best first, ties to the lower t

The dequantisation scale cancels in the cosine, so tokens are scored on their codes.
Each <h_p, q_t> is an int8 x int8 dot accumulated in int32: exact, whatever order the
hardware (or, under TRITON_INTERPRET, numpy's BLAS) sums it in. A float dot is not: two
identical tokens in different columns of a tile could score an ulp apart, and the tie
rule below would then not decide between them. Exact integer dots make a score a
function of (token, candidate) only, so identical tokens tie exactly.

Inputs stay jagged (values + offsets): each user's sequence is read once per block of
candidates, never broadcast or padded. Semantics are those of the PyTorch reference
:func:`transact.kernels.pytorch.nn_search.nn_search` (same signature, same outputs).

Design
------
Grid: (candidate blocks, splits). Axis 0 has one entry per block of ``BLOCK_C``
consecutive candidates (``cdiv(N, BLOCK_C)``, known without a device->host sync).
Candidates are grouped by user, so a block covers a contiguous range of users, found by
binary search in ``cand_offsets``; the program loops over those users and, for each,
streams that user's sequence in blocks of ``BLOCK_L`` tokens. A block usually covers
one user (a request ranks many candidates). Scoring a token block against the candidate
block is one ``tl.dot`` [BLOCK_C, D] x [D, BLOCK_L], so each token block is dequantised
and normalised once per BLOCK_C candidates.

Axis 1 splits every sequence into ``n_split`` runs of whole token blocks: one request
with N = 256 candidates is only 16 candidate blocks, far fewer programs than a GPU has
SMs, and a 16k-token sequence is 128 token blocks of serial work. Each split writes its
partial top-K tile to a scratch buffer and bumps a per-block counter (atomic, acq_rel);
the split that finishes last merges the n_split partial lists (bitonic merges, below)
and writes the result -- still one launch. ``n_split`` = 1 skips all of that.

Top-K: (score, index) pairs are packed into one int64 key whose integer order is
(score ascending, index descending):

    key = ord32(score) << 32 | (2^31 - 1 - index)

where ``ord32`` maps the fp32 bit pattern to an int32 with the same order as the float
(negative floats have their 31 low bits flipped). The largest key is then the best
token and, on equal scores, the lower index -- the tie rule falls out of the packing.
Empty slots hold INT64_MIN, below every real key.

Each program keeps a running top-``K_PAD`` per candidate (``K_PAD`` = K rounded up to
a power of two, at least 32), a [BLOCK_C, K_PAD] int64 tile sorted descending. Token
blocks are K_PAD long (BLOCK_L = K_PAD). Merging a new block:
  1. sort the block's keys ascending (bitonic sort of each row, in registers);
  2. ``max(running_desc, block_asc)`` elementwise: by Batcher's bitonic lemma this holds
     exactly the K_PAD largest keys of the union, as a bitonic sequence;
  3. a bitonic merge sorts it descending in log2(K_PAD) compare-exchange stages.
The sorting network is written here rather than taken from ``tl.sort``: the same code
runs compiled and under TRITON_INTERPRET, where ``tl.sort``'s xor-reductions fall back
to a per-element Python loop (seconds per block); min/max over the size-2 axes of a
[2, ..., 2] view are plain numpy reductions there and warp shuffles on a GPU.
A block that cannot change any candidate's top-K (its best key is below every owned
candidate's current K-th key) skips steps 1-3. The test is cheap; how often it fires
depends on the data (rarely for random embeddings with K = 96, since any of the BLOCK_C
candidates gaining forces the merge). Only the first K slots are exact after a skip,
and only those are written.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from transact.kernels.pytorch.nn_search import N_PIECES, unit_pieces

if N_PIECES != 4:  # the kernel unrolls four pieces (h0..h3)
    raise ImportError(f"nn_search kernel unrolls 4 candidate pieces, kernels.pytorch.nn_search.N_PIECES is {N_PIECES}")

#: INT64_MIN: an empty top-K slot, below every packed (score, index) key.
EMPTY_KEY = tl.constexpr(-(2**63))
#: INT64_MAX, above every key.
FULL_KEY = tl.constexpr(2**63 - 1)

DEFAULT_BLOCK_C = 16


@triton.jit
def _owner(off_ptr, c, U, n_steps):
    """Largest u in [0, U) with off[u] <= c, i.e. the user owning candidate c.

    Binary search with invariant off[lo] <= c < off[hi] (off[0] = 0, off[U] = N > c);
    empty users (off[u] == off[u + 1]) are skipped because the search takes the last u.
    """
    lo = tl.zeros([], tl.int32)  # tensors, not constants: U == 1 is specialised to a constant
    hi = lo + U
    for _ in range(n_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(off_ptr + mid) <= c
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _pack(score, pos):
    """fp32 score [R, C] and int64 index [C] -> int64 keys [R, C], see the module doc."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0: equal scores, equal keys
    b = score.to(tl.int32, bitcast=True)  # [R, C]
    b = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)  # [R, C] int32, ordered like the floats
    return (b.to(tl.int64) << 32) | (0x7FFFFFFF - pos)[None, :].to(tl.int64)


@triton.jit
def _unpack(key):
    """int64 keys [R, C] -> (index int64 [R, C], score fp32 [R, C]); empty -> (-1, -inf)."""
    hi = key >> 32  # [R, C] arithmetic shift: floor(key / 2^32)
    pos = 0x7FFFFFFF - (key - (hi << 32))  # [R, C] int64
    b = hi.to(tl.int32)
    b = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)  # [R, C] back to the fp32 bit pattern
    score = b.to(tl.float32, bitcast=True)
    empty = key == EMPTY_KEY
    return tl.where(empty, -1, pos), tl.where(empty, float("-inf"), score)


@triton.jit
def _bit(N_DIMS: tl.constexpr, J: tl.constexpr):
    """0/1 along hypercube axis ``N_DIMS - 1 - J`` (= bit J of the flat index), size 1 elsewhere."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - J - 1) + [2] + [1] * J)


@triton.jit
def _compare_exchange(h, N_DIMS: tl.constexpr, J: tl.constexpr, desc):
    """One bitonic compare-exchange stage between elements whose flat index differs in bit J.

    h: a [2, 2, ..., 2] hypercube view. Each pair's low slot gets the min (the max where
    ``desc``), its high slot the other. min/max over the size-2 axis read the partner.
    """
    lo = tl.min(h, axis=N_DIMS - 1 - J, keep_dims=True)
    hi = tl.max(h, axis=N_DIMS - 1 - J, keep_dims=True)
    return tl.where((_bit(N_DIMS, J) == 1) != desc, hi, lo)


@triton.jit
def _sort_rows(x, LOG_R: tl.constexpr, LOG_N: tl.constexpr, DESC: tl.constexpr):
    """Bitonic sort of each row of x [2^LOG_R, 2^LOG_N] (log2(n)(log2(n)+1)/2 stages)."""
    N_DIMS: tl.constexpr = LOG_R + LOG_N
    h = tl.reshape(x, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_N + 1):
        # Runs of 2^stage elements alternate direction (bit `stage` of the index) so that
        # each pair of runs forms a bitonic sequence; the last stage sorts the whole row.
        if stage < LOG_N:
            desc = _bit(N_DIMS, stage) == 1
        else:
            desc = DESC
        for i in tl.static_range(stage):
            h = _compare_exchange(h, N_DIMS, stage - 1 - i, desc)
    return tl.reshape(h, x.shape)


@triton.jit
def _merge_rows(x, LOG_R: tl.constexpr, LOG_N: tl.constexpr, DESC: tl.constexpr):
    """Sorts each row of x [2^LOG_R, 2^LOG_N] that is a bitonic sequence (log2(n) stages)."""
    N_DIMS: tl.constexpr = LOG_R + LOG_N
    h = tl.reshape(x, [2] * N_DIMS)
    for i in tl.static_range(LOG_N):
        h = _compare_exchange(h, N_DIMS, LOG_N - 1 - i, DESC)
    return tl.reshape(h, x.shape)


@triton.jit
def _nn_search_kernel(
    seq_ptr,  # int8 [T, D], all users' tokens
    seq_off_ptr,  # int64 [U + 1]
    piece_ptr,  # int8 [N_PIECES, N, D], the candidates' unit vectors in pieces
    cand_off_ptr,  # int64 [U + 1]
    idx_ptr,  # int64 [N, K] out
    score_ptr,  # fp32 [N, K] out
    part_ptr,  # int64 [n_cblocks, n_split, BLOCK_C, K_PAD] partial top-Ks (split mode)
    count_ptr,  # int32 [n_cblocks] zeros: splits finished per candidate block (split mode)
    N, U, K, D, n_steps,
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two, >= 32 (an int8 dot's k)
    LOG_C: tl.constexpr,  # log2(BLOCK_C), candidates per program
    LOG_K: tl.constexpr,  # log2(K_PAD): K rounded up to a power of two; also the token block
    SPLIT: tl.constexpr,  # grid axis 1 splits each sequence (num_programs(1) > 1)
):
    BLOCK_C: tl.constexpr = 2**LOG_C
    K_PAD: tl.constexpr = 2**LOG_K
    BLOCK_L: tl.constexpr = K_PAD  # tokens per streamed block: one sort of K_PAD per block
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    c0 = pid * BLOCK_C
    c_end = tl.minimum(c0 + BLOCK_C, N)
    r = tl.arange(0, BLOCK_C)  # [BLOCK_C] row within the block
    rows = c0 + r  # [BLOCK_C] candidate ids
    rows64 = rows.to(tl.int64)
    dcol = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = dcol < D
    kcol = tl.arange(0, K_PAD)  # [K_PAD]
    lpos = tl.arange(0, BLOCK_L)  # [BLOCK_L]
    # This block's partial top-Ks, one [BLOCK_C, K_PAD] tile per split (split mode).
    tile_rows = part_ptr + (pid.to(tl.int64) * n_split * BLOCK_C + r[:, None]) * K_PAD  # [BLOCK_C, 1]
    part = tile_rows + kcol[None, :]  # [BLOCK_C, K_PAD] split 0's tile
    part_rev = tile_rows + (K_PAD - 1 - kcol)[None, :]  # [BLOCK_C, K_PAD] same, columns reversed

    # The candidates' int8 pieces, loaded once (padding columns load as 0: dots unchanged).
    h_ptr = piece_ptr + rows64[:, None] * D + dcol[None, :]  # [BLOCK_C, BLOCK_D] piece 0
    h_mask = (rows < N)[:, None] & dmask[None, :]
    piece = N.to(tl.int64) * D  # elements per piece
    h0 = tl.load(h_ptr, mask=h_mask, other=0)  # [BLOCK_C, BLOCK_D] int8
    h1 = tl.load(h_ptr + piece, mask=h_mask, other=0)
    h2 = tl.load(h_ptr + 2 * piece, mask=h_mask, other=0)
    h3 = tl.load(h_ptr + 3 * piece, mask=h_mask, other=0)

    u_first = _owner(cand_off_ptr, c0, U, n_steps)
    u_last = _owner(cand_off_ptr, c_end - 1, U, n_steps)
    for u in range(u_first, u_last + 1):
        cu0 = tl.load(cand_off_ptr + u)
        cu1 = tl.load(cand_off_ptr + u + 1)
        mine = (rows64 >= cu0) & (rows64 < cu1)  # [BLOCK_C] candidates of user u
        t0 = tl.load(seq_off_ptr + u)
        n_tok = tl.load(seq_off_ptr + u + 1) - t0
        n_tok = tl.where(cu1 > cu0, n_tok, 0)  # a user without candidates here: no work
        # This split's share of the sequence: a run of whole token blocks.
        chunk = tl.cdiv(tl.cdiv(n_tok, n_split), BLOCK_L) * BLOCK_L
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_tok)

        run = tl.full([BLOCK_C, K_PAD], EMPTY_KEY, tl.int64)  # running top-K_PAD, descending
        for l0 in range(lo, hi, BLOCK_L):
            pos = l0 + lpos  # [BLOCK_L] int64 index within the user's sequence
            pmask = pos < hi
            q = tl.load(seq_ptr + (t0 + pos)[:, None] * D + dcol[None, :],
                        mask=pmask[:, None] & dmask[None, :], other=0)  # [BLOCK_L, BLOCK_D] int8
            qf = q.to(tl.float32)
            q_norm = tl.sqrt(tl.sum(qf * qf, 1))  # [BLOCK_L], the sum is an exact integer
            q_norm = tl.where(q_norm > 0, q_norm, 1.0)  # a zero token: dots 0, score +0.0
            qt = tl.trans(q)  # [BLOCK_D, BLOCK_L] int8
            # Exact int32 dots, combined as :func:`combine_pieces` does (Horner, smallest
            # first; each product by a power of two is exact, so FMA contraction is harmless).
            s = tl.dot(h3, qt, out_dtype=tl.int32).to(tl.float32)  # [BLOCK_C, BLOCK_L]
            s = s * (1.0 / 128.0) + tl.dot(h2, qt, out_dtype=tl.int32).to(tl.float32)
            s = s * (1.0 / 128.0) + tl.dot(h1, qt, out_dtype=tl.int32).to(tl.float32)
            s = s * (1.0 / 128.0) + tl.dot(h0, qt, out_dtype=tl.int32).to(tl.float32)
            s = s * (1.0 / 64.0) / q_norm[None, :]  # [BLOCK_C, BLOCK_L] cosine
            key = _pack(s, pos)  # [BLOCK_C, BLOCK_L]
            key = tl.where(pmask[None, :], key, EMPTY_KEY)

            # Skip the merge when no owned candidate's top-K can change.
            kth = tl.min(tl.where(kcol[None, :] < K, run, FULL_KEY), 1)  # [BLOCK_C] K-th best
            gain = (tl.max(key, 1) > kth) & mine  # [BLOCK_C]
            if tl.max(gain.to(tl.int32), 0) > 0:
                blk = _sort_rows(key, LOG_C, LOG_K, False)  # [BLOCK_C, K_PAD] ascending
                # desc vs asc elementwise max = top K_PAD of the union, bitonic; then sort.
                run = _merge_rows(tl.maximum(run, blk), LOG_C, LOG_K, True)  # [BLOCK_C, K_PAD]

        if SPLIT:
            tl.store(part + split * BLOCK_C * K_PAD, run, mask=mine[:, None])
        else:
            idx, score = _unpack(run)  # [BLOCK_C, K_PAD] each
            out = rows64[:, None] * K + kcol[None, :]  # [BLOCK_C, K_PAD]
            omask = mine[:, None] & (kcol[None, :] < K)
            tl.store(idx_ptr + out, idx, mask=omask)
            tl.store(score_ptr + out, score, mask=omask)

    if SPLIT:
        # The last split to finish merges all partials (one launch, no second kernel):
        # the barrier orders every thread's partial stores before the release of the
        # counter increment; the acquire side makes the other splits' partials visible.
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if done == n_split - 1:
            run = tl.load(part, cache_modifier=".cg")  # [BLOCK_C, K_PAD] split 0, descending
            for sp in range(1, n_split):
                # Read split sp's tile with columns reversed: ascending, ready for the merge.
                other = tl.load(part_rev + sp * BLOCK_C * K_PAD, cache_modifier=".cg")  # [BLOCK_C, K_PAD]
                run = _merge_rows(tl.maximum(run, other), LOG_C, LOG_K, True)
            idx, score = _unpack(run)
            out = rows64[:, None] * K + kcol[None, :]  # [BLOCK_C, K_PAD]
            omask = (rows < c_end)[:, None] & (kcol[None, :] < K)
            tl.store(idx_ptr + out, idx, mask=omask)
            tl.store(score_ptr + out, score, mask=omask)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def launch_config(k: int, d: int, block_c: int = DEFAULT_BLOCK_C) -> dict:
    """Compile-time sizes for top-k over d-dim embeddings (plus num_warps).

    K_PAD = next power of two >= max(k, 32); the token block is K_PAD tokens, so a
    merge is one row sort of K_PAD keys plus one bitonic merge.
    """
    if block_c < 16 or block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of two >= 16 (tl.dot tile), got {block_c}")
    k_pad = max(32, _next_pow2(k))
    return dict(BLOCK_D=max(32, _next_pow2(d)), LOG_C=block_c.bit_length() - 1,
                LOG_K=k_pad.bit_length() - 1, num_warps=4 if k_pad <= 128 else 8)


def choose_split(n_cblocks: int, avg_len: int, k_pad: int, device: torch.device) -> int:
    """Sequence splits per candidate block: enough programs for ~4 per SM, never more
    splits than the average user has token blocks. Shapes only: no device->host sync."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    max_split = max(1, triton.cdiv(avg_len, k_pad))
    return max(1, min(triton.cdiv(4 * sms, n_cblocks), max_split))


def nn_search_triton(seq_emb_q: torch.Tensor, seq_offsets: torch.Tensor, cand_emb: torch.Tensor,
                     cand_offsets: torch.Tensor, k: int, *, block_c: int = DEFAULT_BLOCK_C,
                     n_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused NN search; same contract as :func:`transact.kernels.pytorch.nn_search.nn_search`.

    Args:
        seq_emb_q: int8 [T, D], the U users' sequences concatenated.
        seq_offsets: int64 [U + 1].
        cand_emb: float [N, D], candidates grouped by user.
        cand_offsets: int64 [U + 1] (cand_offsets[U] must be N; not checked, that would sync).
        k: number of neighbours.
        block_c: candidates per program (a power of two >= 16).
        n_split: programs sharing each candidate block's sequences (grid axis 1); None
            picks one from the shapes and the GPU's SM count (:func:`choose_split`).

    Returns:
        idx int64 [N, k] (index within the user's sequence, -1 = none), score fp32 [N, k]
        (cosine, -inf = none), best first, ties to the lower index.
    """
    if seq_emb_q.dtype != torch.int8 or seq_emb_q.dim() != 2:
        raise ValueError(f"seq_emb_q must be int8 [T, D], got {seq_emb_q.dtype} {tuple(seq_emb_q.shape)}")
    N, D = cand_emb.shape
    if seq_emb_q.shape[1] != D:
        raise ValueError(f"token dim {seq_emb_q.shape[1]} != candidate dim {D}")
    U = seq_offsets.numel() - 1
    if cand_offsets.numel() != U + 1:
        raise ValueError(f"seq_offsets has {U + 1} entries, cand_offsets {cand_offsets.numel()}")
    device = cand_emb.device
    idx = torch.full((N, k), -1, dtype=torch.int64, device=device)  # [N, k]
    score = torch.full((N, k), float("-inf"), dtype=torch.float32, device=device)  # [N, k]
    if N == 0 or k == 0:
        return idx, score

    seq = seq_emb_q.contiguous()
    if seq.shape[0] == 0:  # no tokens at all: a 1-row dummy so the pointer is valid (never read)
        seq = torch.zeros(1, D, dtype=torch.int8, device=device)
    seq_off = seq_offsets.to(device=device, dtype=torch.int64).contiguous()
    cand_off = cand_offsets.to(device=device, dtype=torch.int64).contiguous()
    cfg = launch_config(k, D, block_c)
    k_pad = 2 ** cfg["LOG_K"]
    n_cblocks = triton.cdiv(N, block_c)
    if n_split is None:
        n_split = choose_split(n_cblocks, triton.cdiv(seq_emb_q.shape[0], max(U, 1)), k_pad, device)
    if n_split < 1:
        raise ValueError(f"n_split must be >= 1, got {n_split}")
    if n_split > 1:
        part = torch.empty(n_cblocks, n_split, block_c, k_pad, dtype=torch.int64, device=device)
        count = torch.zeros(n_cblocks, dtype=torch.int32, device=device)  # [n_cblocks]
    else:  # unused: valid pointers for the signature
        part = torch.empty(1, dtype=torch.int64, device=device)
        count = torch.empty(1, dtype=torch.int32, device=device)
    pieces = unit_pieces(cand_emb).contiguous()  # [N_PIECES, N, D] int8, the reference's
    _nn_search_kernel[(n_cblocks, n_split)](
        seq, seq_off, pieces, cand_off, idx, score, part, count,
        N, U, k, D, max(U, 1).bit_length(),
        SPLIT=n_split > 1, **cfg,
    )
    return idx, score


def aot_compile(cc: int = 90, k: int = 96, d: int = 32, split: bool = True):
    """Compiles the kernel for an NVIDIA GPU of compute capability ``cc`` without one.

    Checks that the kernel lowers to PTX and assembles (ptxas ships with triton); needs
    TRITON_INTERPRET unset (the interpreter replaces ``triton.jit`` functions).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot_compile needs TRITON_INTERPRET unset")
    cfg = launch_config(k, d)
    num_warps = cfg.pop("num_warps")
    cfg["SPLIT"] = split
    sig = {"seq_ptr": "*i8", "seq_off_ptr": "*i64", "piece_ptr": "*i8", "cand_off_ptr": "*i64",
           "idx_ptr": "*i64", "score_ptr": "*fp32", "part_ptr": "*i64", "count_ptr": "*i32",
           "N": "i32", "U": "i32", "K": "i32", "D": "i32",
           "n_steps": "i32", **{name: "constexpr" for name in cfg}}
    src = ASTSource(fn=_nn_search_kernel, signature=sig, constexprs=cfg)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
