"""Ranking a batch of requests: ONE de-duplicated model batch per call.

For the U requests of a (cross-request) micro-batch with N candidates in all:

1. candidate embeddings: the request's raw embeddings (quantised with
   :func:`transact.data.quantization.quantize`) or the source's item table;
2. sequences: one ``source.sequences(user_ids[U], ts[U])`` call -- each request's three
   sequences ONCE (jagged values + offsets), cut point-in-time before its timestamp;
3. assembly (paper §3.4.2, "request level de-duplication"): candidates concatenated and
   grouped by request with ``cand_offsets`` [U + 1]; nothing is broadcast. The ``naive``
   assembly (benchmark baseline only) copies each request's sequences once per candidate,
   as a classic ranking server does, and gives the same S_all;
4. staging: all inputs packed into the reused (pinned) arena, one H2D copy
   (:class:`transact.serving.device.StagingArena`);
5. S_all: :func:`transact.features.nn_features.build_s_all` -- the same function the
   offline NN-logging step uses (NN search through ``kernels.dispatch``);
6. model: ``Batch.from_s_all`` -> encoder (``kernels.dispatch.encoder_forward``) + heads,
   probabilities per head (calibrated: the model's one map from logits, raw heads on request);
   score ``S = sum_h w_h f_h`` by
   :func:`transact.model.metrics.ranking_score` with the request's weights; ranking by
   S descending, ties in request order (a stable sort, as HIT@3 does);
7. the served rows go to the :class:`~transact.serving.served_log.ServedLogWriter`:
   appended to its write-ahead segment here, on the model thread, before :meth:`Ranker.rank`
   returns and so before any response of the batch is sent (an Arrow conversion and one
   ``write`` per batch: the price of "an answered row is never lost"), then queued for the
   background parquet writer, which the model thread never waits for (a full queue drops
   and counts rows instead).

A request that fails on its own (unknown item ids) gets its own error; the others in
the micro-batch are served.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from transact.data.quantization import quantize
from transact.data.schema import EMB_DIM
from transact.features.nn_features import JaggedSequences, SAll, build_s_all
from transact.model.metrics import DEFAULT_SCORE_WEIGHTS, ranking_score
from transact.serving.device import ModelRunner, StagingArena
from transact.serving.served_log import LogRecord, ServedLogWriter
from transact.serving.settings import DEFAULT_CPU_FORWARD
from transact.serving.sources import SequenceSource

SEQ_FIELDS = ("emb_q", "action", "surface", "ts", "offsets")


class RequestError(ValueError):
    """A client error in one request; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SourceUnavailable(RuntimeError):
    """The sequence source failed (e.g. the online store is down): a server-side 503."""


@dataclass
class RankQuery:
    """One validated request."""

    user_id: int
    item_ids: np.ndarray  # int64 [n]
    item_emb_q: np.ndarray | None  # int8 [n, D] (from raw embeddings) or None: item table
    surface: int
    ts: int  # ms
    request_id: int
    weights: dict[str, float]
    top_k: int | None = None
    raw_probs: bool = False  #: also return the raw heads (the plain sigmoid of the logits)

    @property
    def n(self) -> int:
        return len(self.item_ids)


@dataclass
class Ranked:
    query: RankQuery
    probs: np.ndarray  # float32 [n, H], calibrated
    score: np.ndarray  # float64 [n]
    order: np.ndarray  # int64 [n], best first
    cold_start: bool
    served_ts: int
    raw: np.ndarray | None = None  # float32 [n, H], the raw heads, when the query asked for them


@dataclass
class BatchStats:
    requests: int = 0
    candidates: int = 0
    h2d_bytes: int = 0
    fetch_s: float = 0.0
    assemble_s: float = 0.0
    nn_s: float = 0.0
    forward_s: float = 0.0
    post_s: float = 0.0
    total_s: float = 0.0
    errors: int = 0
    extra: dict = field(default_factory=dict)


def quantize_embeddings(values) -> np.ndarray:
    """Raw float embeddings [n, D] -> int8 (clipped first, so huge finite values saturate)."""
    e = np.clip(np.asarray(values, dtype=np.float64), -1e3, 1e3)
    if e.ndim != 2 or e.shape[1] != EMB_DIM:
        raise RequestError("item_embeddings", f"expected shape [n, {EMB_DIM}], got {list(e.shape)}")
    return np.asarray(quantize(e.astype(np.float32)))


def default_weights(heads: tuple[str, ...], weights: dict[str, float] | None = None) -> dict[str, float]:
    w = DEFAULT_SCORE_WEIGHTS if weights is None else weights
    return {h: float(w[h]) for h in heads if h in w}


def broadcast(seq: JaggedSequences, counts: torch.Tensor) -> JaggedSequences:
    """The naive layout: user u's tokens repeated once per candidate (counts[u] times)."""
    U = seq.num_users
    lens = seq.lengths  # [U]
    cand_user = torch.repeat_interleave(torch.arange(U), counts)  # [N]
    c_len = lens[cand_user]  # [N]
    offsets = torch.zeros(len(cand_user) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(c_len, 0)
    start = torch.repeat_interleave(seq.offsets[:-1][cand_user], c_len)  # [T']
    within = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], c_len)
    idx = start + within
    return JaggedSequences(seq.emb_q[idx], seq.action[idx], seq.surface[idx], seq.ts[idx], offsets)


def assemble(ll: JaggedSequences, rt: JaggedSequences, imp: JaggedSequences, cand_q: torch.Tensor,
             counts: torch.Tensor, ts: torch.Tensor, surface: torch.Tensor, naive: bool = False
             ) -> dict[str, torch.Tensor]:
    """Flat dict of the model-input tensors of a batch (what is copied to the device).

    De-duplicated: each request's sequences once, ``cand_offsets`` [U + 1]. Naive: the
    sequences copied per candidate, one pseudo-request per candidate.
    """
    U = len(counts)
    cand_surface = torch.repeat_interleave(surface, counts)  # [N]
    if naive:
        N = int(counts.sum())
        ll, rt, imp = broadcast(ll, counts), broadcast(rt, counts), broadcast(imp, counts)
        cand_offsets = torch.arange(N + 1, dtype=torch.int64)
        req_ts = torch.repeat_interleave(ts, counts)
    else:
        cand_offsets = torch.zeros(U + 1, dtype=torch.int64)
        cand_offsets[1:] = torch.cumsum(counts, 0)
        req_ts = ts
    out = {}
    for name, s in (("ll", ll), ("rt", rt), ("imp", imp)):
        for f in SEQ_FIELDS:
            out[f"{name}.{f}"] = getattr(s, f)
    out.update({"cand_emb_q": cand_q, "cand_offsets": cand_offsets, "request_ts": req_ts,
                "cand_surface": cand_surface})
    return out


def seqs_of(t: dict[str, torch.Tensor]) -> tuple[JaggedSequences, JaggedSequences, JaggedSequences]:
    ll, rt, imp = (JaggedSequences(*(t[f"{n}.{f}"] for f in SEQ_FIELDS)) for n in ("ll", "rt", "imp"))
    return ll, rt, imp


class Ranker:
    """Model + sequence source + optional served log; :meth:`rank` serves a micro-batch.

    Args:
        model: a loaded :class:`~transact.model.transact.TransActModel` (eval).
        source: a :class:`~transact.serving.sources.SequenceSource`.
        device: where the model runs.
        model_version: written into the served log and responses.
        score_weights: default head weights (``DEFAULT_SCORE_WEIGHTS`` restricted to the heads).
        assembly: "dedup" (default) or "naive" (benchmark baseline).
        log_writer: served NN-feature log, or None.
        cuda_graphs: CUDA graphs for the model forward on GPU.
        cpu_forward: the CPU forward backend (:class:`~transact.serving.device.ModelRunner`);
            the service's default, ``compile``, unless given (``eager`` skips the build).
    """

    def __init__(self, model, source: SequenceSource, device: str | torch.device = "cpu",
                 model_version: str = "", score_weights: dict[str, float] | None = None,
                 assembly: str = "dedup", log_writer: ServedLogWriter | None = None,
                 cuda_graphs: bool = True, cpu_forward: str = DEFAULT_CPU_FORWARD) -> None:
        if assembly not in ("dedup", "naive"):
            raise ValueError(f"assembly must be dedup or naive, got {assembly!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.fcfg = model.fcfg
        self.heads = tuple(model.cfg.heads)
        self.source = source
        self.model_version = model_version
        self.weights = default_weights(self.heads, score_weights)
        self.check_weights(self.weights, "TRANSACT_SCORE_WEIGHTS")
        self.naive = assembly == "naive"
        self.log_writer = log_writer
        self.arena = StagingArena(self.device)
        self.runner = ModelRunner(self.model, self.device, cuda_graphs=cuda_graphs, cpu_forward=cpu_forward)

    def check_weights(self, weights: dict[str, float], field_name: str = "score_weights") -> None:
        unknown = sorted(set(weights) - set(self.heads))
        if unknown:
            raise RequestError(field_name, f"unknown heads {unknown}; the model's heads are {list(self.heads)}")

    # --- the batch ------------------------------------------------------------------------------

    def rank(self, queries: list[RankQuery]) -> tuple[list[Ranked | Exception], BatchStats]:
        st = BatchStats(requests=len(queries))
        t0 = time.perf_counter()
        results: list[Ranked | Exception | None] = [None] * len(queries)
        ok, embs = [], []
        for i, q in enumerate(queries):
            try:
                if q.item_emb_q is not None:
                    e = q.item_emb_q
                else:
                    try:
                        e = self.source.item_emb_q_of(q.item_ids)
                    except (ValueError, KeyError) as err:
                        raise RequestError("item_ids", f"{err}; send item_embeddings for items the "
                                                       "service does not know") from None
                self.check_weights(q.weights)
                embs.append(np.asarray(e, dtype=np.int8).reshape(q.n, EMB_DIM))
                ok.append(i)
            except RequestError as err:
                results[i] = err
                st.errors += 1
        if ok:
            served = self._rank_ok([queries[i] for i in ok], embs, st)
            for i, r in zip(ok, served):
                results[i] = r
        st.total_s = time.perf_counter() - t0
        return results, st  # type: ignore[return-value]

    def _rank_ok(self, qs: list[RankQuery], embs: list[np.ndarray], st: BatchStats) -> list[Ranked]:
        t = time.perf_counter()
        users = np.array([q.user_id for q in qs], dtype=np.int64)
        ts = np.array([q.ts for q in qs], dtype=np.int64)
        try:
            ll, rt, imp = self.source.sequences(users, ts)
        except Exception as e:  # a dependency outage, not a bug in the request
            raise SourceUnavailable(f"sequence source failed: {type(e).__name__}: {e}") from e
        tok = (ll.lengths + rt.lengths + imp.lengths).numpy()  # [U]
        st.fetch_s = time.perf_counter() - t

        t = time.perf_counter()
        counts = torch.tensor([q.n for q in qs], dtype=torch.int64)
        cand_q = torch.from_numpy(np.concatenate(embs, 0))  # [N, D]
        surface = torch.tensor([q.surface for q in qs], dtype=torch.int64)
        inputs = assemble(ll, rt, imp, cand_q, counts, torch.from_numpy(ts), surface, naive=self.naive)
        dev = self.arena.stage(inputs)
        st.h2d_bytes = self.arena.last_bytes
        st.candidates = int(counts.sum())
        st.assemble_s = time.perf_counter() - t

        s_all, logits, nn_s, fwd_s = self.compute(dev)
        st.nn_s, st.forward_s = nn_s, fwd_s

        t = time.perf_counter()
        probs = self.model.probabilities(logits.float()).cpu().numpy()  # [N, H] calibrated
        raw = self.model.probabilities(logits.float(), raw=True).cpu().numpy() if any(q.raw_probs for q in qs) else None
        served_ts = int(time.time() * 1000)
        out, lo = [], 0
        scores = []
        for q, n_tok in zip(qs, tok):
            p = probs[lo:lo + q.n]
            s = ranking_score(p, self.heads, q.weights)  # [n] float64
            order = np.argsort(-s, kind="stable")
            out.append(Ranked(q, p, s, order, cold_start=bool(n_tok == 0), served_ts=served_ts,
                              raw=raw[lo:lo + q.n] if q.raw_probs and raw is not None else None))
            scores.append(s)
            lo += q.n
        if self.log_writer is not None:
            self._log(qs, s_all, cand_q, probs, np.concatenate(scores), served_ts)
        st.post_s = time.perf_counter() - t
        return out

    def compute(self, dev: dict[str, torch.Tensor]) -> tuple[SAll, torch.Tensor, float, float]:
        """S_all and head logits [N, H] of staged inputs; (s_all, logits, nn seconds, forward seconds)."""
        from transact.model.transact import Batch

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        ll, rt, imp = seqs_of(dev)
        t = time.perf_counter()
        with torch.inference_mode():
            s_all = build_s_all(ll, rt, imp, dev["cand_emb_q"], dev["cand_offsets"], dev["request_ts"], self.fcfg)
        sync()
        nn_s = time.perf_counter() - t
        t = time.perf_counter()
        batch = Batch.from_s_all(s_all, dev["cand_emb_q"], dev["cand_surface"])
        logits = self.runner(batch)
        sync()
        return s_all, logits, nn_s, time.perf_counter() - t

    def _log(self, qs, s_all: SAll, cand_q: torch.Tensor, probs: np.ndarray, score: np.ndarray,
             served_ts: int) -> None:
        cpu = SAll(*(getattr(s_all, f).cpu() for f in ("emb_q", "action", "surface", "age_s", "seg_len")))
        n = [q.n for q in qs]
        rec = LogRecord(
            s_all=cpu, cand_emb_q=cand_q,
            request_id=np.repeat([q.request_id for q in qs], n).astype(np.int64),
            user_id=np.repeat([q.user_id for q in qs], n).astype(np.int64),
            item_id=np.concatenate([q.item_ids for q in qs]).astype(np.int64),
            ts=np.repeat([q.ts for q in qs], n).astype(np.int64),
            surface=np.repeat([q.surface for q in qs], n).astype(np.int8),
            position=np.concatenate([np.arange(k) for k in n]).astype(np.int16),
            probs=probs, score=score, model_version=self.model_version,
            served_ts=np.full(sum(n), served_ts, np.int64),
        )
        assert self.log_writer is not None  # _log runs only with a writer
        self.log_writer.submit(rec)

    def warmup(self, max_batch: int = 8) -> None:
        """Cold-start batches through the whole compute path (lazy initialisation). On GPU,
        one per CUDA-graph bucket up to ``max_batch`` candidates, so no request pays a capture."""
        sizes = [8]
        if self.runner.backend != "eager":
            sizes = [8, 1]  # build the backend; a compiled model specialises one candidate apart
        if self.runner.use_graphs:
            sizes = [1 << i for i in range(3, max(3, (max_batch - 1).bit_length()) + 1)]
        empty = JaggedSequences.empty(1)
        for n in sizes:
            cand = torch.zeros(n, EMB_DIM, dtype=torch.int8)
            inputs = assemble(empty, empty, empty, cand, torch.tensor([n]), torch.tensor([0]), torch.tensor([0]))
            self.compute(self.arena.stage(inputs))
