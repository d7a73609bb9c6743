"""The BentoML ranking service: ``POST /rank`` (+ ``/livez``, ``/readyz``, ``/metrics``).

Start it with ``transact serve`` (or ``bentoml serve transact.serving.service:TransActRanker``
with the ``TRANSACT_*`` variables of :mod:`transact.serving.settings`). It binds
127.0.0.1:3000 unless told otherwise (``--host`` / ``--port``). Importing this module reads
no setting (except the candidate bound the request schema states,
:data:`transact.serving.schema.MAX_CANDIDATES`): the service reads
:meth:`ServeSettings.from_env` once, in :meth:`TransActRanker.__init__`, and passes the
object down (the batcher, the ranker, the ASGI middleware's :class:`RouteState`).

Per request: schema validation (strict pydantic, :mod:`transact.serving.schema`) ->
protocol checks and error format (:mod:`transact.serving.guard`) -> a
:class:`~transact.serving.ranker.RankQuery` -> the cross-request micro-batcher
(:mod:`transact.serving.batching`) -> :meth:`Ranker.rank` on the model thread -> JSON.

Status codes: 200; 400 (schema or semantic error, message names the field), 401 (API
key), 405, 413 (body too large), 415 (not JSON), 503 + ``Retry-After`` (queue full,
deadline passed, shutting down, sequence source down). A 5xx other than 503 is a bug.
Every error body is ``{"error", "fields", "detail"?}``, as ``/docs.json`` documents it
(:func:`transact.serving.guard.served_openapi`). A client ``request_ts`` must lie within
``TRANSACT_MAX_CLOCK_SKEW_S`` of the server clock (:func:`request_time`).

Prometheus metrics on ``/metrics`` (besides BentoML's own):
``transact_requests_total{code}``, ``transact_candidates_total``,
``transact_logged_rows_total`` (rows durable before their response is sent),
``transact_log_dropped_rows_total`` (stays 0 in normal operation),
``transact_log_recovered_rows_total`` (rows of a crashed process written at start-up),
``transact_batch_candidates`` and ``transact_stage_seconds{stage}``.
"""
from __future__ import annotations

import gc
import logging
import secrets
import time
from pathlib import Path

import bentoml
import numpy as np
from starlette.responses import JSONResponse

from transact.data.schema import SURFACES
from transact.serving.batching import DeadlineExceeded, MicroBatcher, Overloaded
from transact.serving.guard import GuardMiddleware, RouteState, quiet_client_error_tracebacks
from transact.serving.metrics import BATCH, CANDIDATES, DROPPED, LOGGED, RECOVERED, REQUESTS, STAGE
from transact.serving.ranker import Ranked, Ranker, RankQuery, RequestError, SourceUnavailable, quantize_embeddings
from transact.serving.schema import RankedItem, RankRequest, RankResponse
from transact.serving.served_log import ServedLogWriter
from transact.serving.settings import API_KEY_HEADER, DEFAULT_HOST, DEFAULT_PORT, MAX_REQUEST_TIMEOUT_S, ServeSettings
from transact.serving.shipping import Shipper

log = logging.getLogger("transact.serving")

#: BentoML's own per-request timeout: the service's deadline (TRANSACT_REQUEST_TIMEOUT_S, at
#: most MAX_REQUEST_TIMEOUT_S, a 503 naming it) always comes first.
TRAFFIC_TIMEOUT_S = MAX_REQUEST_TIMEOUT_S + 10

#: What the ASGI middleware in front of /rank needs from the service; it is registered with the
#: class, before any setting is read, and each instance configures it (one worker per process).
ROUTE = RouteState()


NO_SOURCE = ("no sequence source: set TRANSACT_WORLD (a world folder) or TRANSACT_FEAST_REPO (a Feast "
             "repo) -- `transact serve --world/--feast-repo`, or `bentoml serve` with the variable set")


def one_line(e: BaseException) -> str:
    """An exception as one line: its message (the type when it has none)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def request_time(request_ts: int | None, now_ms: int, max_skew_s: float | None) -> int:
    """The request time of a query: the server clock unless the client sent one it may trust.

    A client time is what point-in-time sequences are cut at and what the served log (and
    so the monitor's windows) is keyed by: a wrong one (0, year 9999) would be taken as is.
    Within ``max_skew_s`` of the server clock it is used (clients stamp requests a moment
    before they arrive); beyond it, a 400. ``max_skew_s=None`` trusts every client time
    (a replay of a past world).
    """
    if request_ts is None:
        return now_ms
    if max_skew_s is not None and abs(int(request_ts) - now_ms) > max_skew_s * 1000:
        raise RequestError("request_ts", f"{request_ts} is more than {max_skew_s:g} s from the server time "
                                         f"{now_ms} (ms since the epoch); omit it to use the server clock "
                                         "(TRANSACT_MAX_CLOCK_SKEW_S)")
    return int(request_ts)


def _error(status: int, field: str, message: str, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": "1"} if retry else None
    return JSONResponse({"error": f"{field}: {message}", "fields": [field]}, status_code=status, headers=headers)


@bentoml.service(
    name="transact_ranker",
    http={"host": DEFAULT_HOST, "port": DEFAULT_PORT},
    traffic={"timeout": TRAFFIC_TIMEOUT_S},
    workers=1,
)
class TransActRanker:
    """TransAct V2 ranking: one user's N candidates per request, de-duplicated batches.

    The model is looked up by tag when the instance is made (``TRANSACT_MODEL_TAG``), in
    BentoML's model store; a bento carries its model (bentofile ``models``), and in a
    container the bento's store holds only that one.
    """

    def __init__(self) -> None:
        from transact.serving.malloc import tune_malloc

        quiet_client_error_tracebacks()  # here: in the worker, after BentoML set up its logging
        tune_malloc()  # before the model's first allocation
        self.settings = ServeSettings()
        self.log_writer: ServedLogWriter | None = None
        self.shipper: Shipper | None = None
        self._ranker: Ranker | None = None
        self.batcher: MicroBatcher | None = None
        self.load_error: str | None = None
        try:
            # the one read of the settings: the environment is what reaches a worker process
            s = self.settings = ServeSettings.from_env()
            ROUTE.configure(max_body_bytes=s.max_body_bytes, api_key=s.api_key, max_clock_skew_s=s.max_clock_skew_s)
            stored = bentoml.models.get(s.model_tag)
            self.model_dir = Path(stored.path)
            self.model_version = str(stored.tag)
            if not s.world and not s.feast_repo:
                raise ValueError(NO_SOURCE)
            # The model is loaded and warmed up on the batcher's thread, the one that runs every
            # batch: all tensor work of the process on one thread (see transact.serving.batching).
            self.batcher = MicroBatcher(self._process, s.max_batch_candidates, s.max_wait_ms / 1000.0,
                                        s.max_queue, setup=self._load_model)
            ROUTE.configure(max_body_bytes=s.max_body_bytes, api_key=s.api_key, max_clock_skew_s=s.max_clock_skew_s,
                            heads=self.ranker.heads)
        except Exception as e:  # noqa: BLE001 - any start-up failure: alive, not ready, one line
            # Raising here made BentoML restart the worker, which failed the same way, forever
            # (a traceback every second). The worker stays up instead: /readyz 503, /rank 503
            # naming the cause; `transact serve` checks the same things before it starts.
            self.load_error = one_line(e)
            log.error("not ready: %s", self.load_error)
            return
        log.info("serving %s on %s (%s assembly, source %s, log %s, forward %s)", self.model_version,
                 self.ranker.device, s.assembly, type(self.ranker.source).__name__, s.log_dir or "off",
                 "CUDA graphs" if self.ranker.runner.use_graphs else
                 f"{self.ranker.runner.backend}, {self._threads} threads")

    @property
    def ranker(self) -> Ranker:
        assert self._ranker is not None, "set on the model thread before the first request"
        return self._ranker

    def _load_model(self) -> None:
        """Model, sequence source, served log and warm-up (runs on the model thread)."""
        import torch

        from transact.model.checkpoint import load_model
        from transact.serving.sources import open_source

        s = self.settings
        device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if s.threads:
            torch.set_num_threads(s.threads)
        self._threads = torch.get_num_threads()
        model = load_model(self.model_dir, device)
        source = open_source(s.world, s.feast_repo, model.fcfg)
        if s.log_dir:
            self.log_writer = ServedLogWriter(s.log_dir, model.fcfg, model.cfg.heads, s.log_queue_rows,
                                              s.log_flush_rows, s.log_flush_s,
                                              on_logged=LOGGED.inc, on_dropped=DROPPED.inc)
            if self.log_writer.recovered.rows_recovered:
                RECOVERED.inc(self.log_writer.recovered.rows_recovered)
            if s.log_ship_to:
                self.shipper = Shipper(s.log_dir, s.log_ship_to, s.log_ship_s)
        self._ranker = Ranker(model, source, device, model_version=self.model_version,
                             score_weights=s.score_weights, assembly=s.assembly, log_writer=self.log_writer,
                             cuda_graphs=s.cuda_graphs, cpu_forward=s.cpu_forward)
        self.ranker.warmup(min(s.max_batch_candidates, self.ranker.runner.max_graph_batch))
        # Start-up leaves millions of long-lived objects (torch.compile's graphs, BentoML,
        # pydantic); a full collection walks them all -- 0.1-0.3 s measured in warm-up, a
        # pause of the request in flight. Frozen, they are never scanned again.
        gc.collect()
        gc.freeze()

    # --- probes ---------------------------------------------------------------------------------

    def __is_alive__(self) -> bool:
        # a worker that could not load stays alive (restarting it fails the same way)
        return self.load_error is not None or (self.batcher is not None and self.batcher.alive)

    def __is_ready__(self) -> bool:
        return self.load_error is None and self.batcher is not None and self.batcher.alive

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.log_writer is not None:
            self.log_writer.close()
        if self.shipper is not None:
            self.shipper.close()  # after the writer: its last file ships too

    # --- the API --------------------------------------------------------------------------------

    @bentoml.api(route="/rank", input_spec=RankRequest, output_spec=RankResponse)
    async def rank(self, **request) -> RankResponse | JSONResponse:
        """Rank the candidates of one user: per-head probabilities, score S and the ranked list."""
        if self.load_error is not None or self.batcher is None:
            return _error(503, "service", f"not ready: {self.load_error}")
        try:
            q = self.query(**request)
        except RequestError as e:
            return _error(400, e.field, e.message)
        try:
            ranked = await self.batcher.run(q, q.n, self.settings.request_timeout_s)
        except RequestError as e:
            return _error(400, e.field, e.message)
        except Overloaded as e:
            return _error(503, "service", f"overloaded: {e}", retry=True)
        except DeadlineExceeded as e:
            return _error(503, "service", f"timeout: {e}", retry=True)
        except SourceUnavailable as e:
            log.error("%s", e)
            return _error(503, "service", "the sequence source is unavailable", retry=True)
        CANDIDATES.inc(q.n)
        return self.response(ranked)

    def query(self, user_id: int, item_ids: list[int], item_embeddings=None, surface: str = "homefeed",
              request_ts: int | None = None, request_id: int | None = None,
              score_weights: dict[str, float] | None = None, top_k: int | None = None,
              raw_probs: bool = False) -> RankQuery:
        """Validated request fields -> RankQuery (semantic checks raise RequestError)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        emb = quantize_embeddings(item_embeddings) if item_embeddings is not None else None
        weights = self.ranker.weights if score_weights is None else {k: float(v) for k, v in score_weights.items()}
        if score_weights is not None:
            self.ranker.check_weights(weights)
        return RankQuery(
            user_id=int(user_id), item_ids=ids, item_emb_q=emb, surface=SURFACES.index(surface),
            ts=request_time(request_ts, int(time.time() * 1000), self.settings.max_clock_skew_s),
            request_id=secrets.randbits(62) if request_id is None else int(request_id),
            weights=weights, top_k=top_k, raw_probs=bool(raw_probs),
        )

    def response(self, r: Ranked) -> RankResponse:
        heads = self.ranker.heads
        order = r.order if r.query.top_k is None else r.order[: r.query.top_k]
        ids, probs, score = r.query.item_ids, r.probs, r.score
        raw = r.raw
        items = [RankedItem.model_construct(item_id=int(ids[i]), position=int(i), score=float(score[i]),
                                            probs={h: float(probs[i, j]) for j, h in enumerate(heads)},
                                            raw_probs=None if raw is None else
                                            {h: float(raw[i, j]) for j, h in enumerate(heads)})
                 for i in order.tolist()]
        return RankResponse.model_construct(
            request_id=r.query.request_id, user_id=r.query.user_id, model_version=self.model_version,
            served_ts=r.served_ts, request_ts=r.query.ts, cold_start=r.cold_start, heads=list(heads),
            score_weights=r.query.weights, ranked=items)

    # --- the model thread -----------------------------------------------------------------------

    def _process(self, queries: list[RankQuery]) -> list:
        results, st = self.ranker.rank(queries)
        if st.candidates:
            BATCH.observe(st.candidates)
            for stage in ("fetch", "assemble", "nn", "forward", "post", "total"):
                STAGE.labels(stage=stage).observe(getattr(st, f"{stage}_s"))
        return results


TransActRanker.add_asgi_middleware(  # type: ignore[attr-defined]  # bentoml.service made it a Service
    GuardMiddleware, route="/rank", state=ROUTE, header=API_KEY_HEADER,
    on_status=lambda code: REQUESTS.labels(code=str(code)).inc())
