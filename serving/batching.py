"""Adaptive cross-request micro-batching on one model thread.

Requests are queued by the HTTP handlers (asyncio) and served by ONE worker thread that
takes everything waiting -- up to ``max_batch_size`` candidates -- as one batch. When
the model is idle a request starts at once (no added latency); under load, requests
queue while a batch runs and the next batch grows with the load. ``max_wait_s`` > 0
adds a short wait for more requests (useful on a GPU, where bigger batches are nearly
free; on a CPU the forward is compute bound, so the default is 0).

Why not BentoML's ``@bentoml.api(batchable=True)``: (1) a batchable API takes one
list-typed argument, so every HTTP body would be a list of requests instead of a flat
object keyed by field name; (2) its batch size counts list items, while our cost counts
*candidates* (1..1024 per request) -- we bound a batch by candidates; (3) one failing
request (unknown item ids) would fail every request batched with it, here it fails
alone; (4) the batch is the de-duplication unit and must be assembled on the thread
that owns the pinned staging arena and the CUDA graphs. The queue is bounded (beyond
``max_queue`` requests the service answers 503 at once: load shedding) and every
request has a deadline (expired requests are skipped, the handler answers 503).

The worker thread is the *model thread*: ``setup`` (model loading, warm-up) runs on it
before the first batch, so that every tensor operation of the process runs on one
thread. OpenMP gives each thread that starts parallel work its own pool of workers; two
pools on 2 cores make libgomp throttle its spin-waiting, and each parallel region of the
forward then pays a sleep/wake-up (measured: ~20% of the CPU forward).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("transact.serving")


class Overloaded(Exception):
    """The queue is full (or the batcher is closing): retry later."""


class DeadlineExceeded(Exception):
    """The request waited past its deadline."""


@dataclass
class _Item:
    payload: Any
    size: int
    deadline: float
    future: Future


class MicroBatcher:
    """Queue + one worker thread calling ``process(payloads) -> results`` per batch.

    ``process`` returns one result per payload; a result that is an ``Exception`` is
    raised to that request's caller only. An exception raised by ``process`` fails the
    whole batch (every caller gets it). ``clock`` (seconds, monotonic) times the queue
    deadlines and the wait to grow a batch; the callers' own waits (:meth:`run`,
    :meth:`call`) are real time.
    """

    def __init__(self, process: Callable[[list], list], max_batch_size: int, max_wait_s: float = 0.0,
                 max_queue: int = 64, name: str = "model", setup: Callable[[], None] | None = None,
                 setup_timeout_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._process = process
        self._clock = clock  # deadlines and the batch-growing wait (tests pass a fake one)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._q: deque[_Item] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches = 0
        self.expired = 0
        self._setup_done = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, args=(setup,), name=f"{name}-batcher", daemon=True)
        self._thread.start()
        # the caller (the service's constructor) fails if the model cannot be set up
        if not self._setup_done.wait(setup_timeout_s):
            raise TimeoutError(f"the {name} thread's setup did not finish in {setup_timeout_s} s")
        if self._setup_error is not None:
            raise self._setup_error

    @property
    def queued(self) -> int:
        return len(self._q)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, payload: Any, size: int, timeout_s: float) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise Overloaded("the service is shutting down")
            if len(self._q) >= self.max_queue:
                raise Overloaded(f"{len(self._q)} requests are queued (limit {self.max_queue})")
            self._q.append(_Item(payload, size, self._clock() + timeout_s, fut))
            self._cv.notify()
        return fut

    async def run(self, payload: Any, size: int, timeout_s: float) -> Any:
        """Submits and awaits the result; DeadlineExceeded after ``timeout_s``."""
        fut = self.submit(payload, size, timeout_s)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except TimeoutError:
            fut.cancel()
            raise DeadlineExceeded(f"no result within {timeout_s:g} s") from None

    def call(self, payload: Any, size: int, timeout_s: float) -> Any:
        """Blocking variant of :meth:`run` (tests, tools)."""
        fut = self.submit(payload, size, timeout_s)
        try:
            return fut.result(timeout_s)
        except TimeoutError:
            fut.cancel()
            raise DeadlineExceeded(f"no result within {timeout_s:g} s") from None

    def close(self, timeout: float = 60.0) -> None:
        """Serves what is queued, then stops the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[_Item] | None:
        with self._cv:
            while not self._q and not self._closed:
                self._cv.wait()
            if not self._q:
                return None  # closed and drained
            if self.max_wait_s > 0:
                until = self._clock() + self.max_wait_s
                while not self._closed and sum(i.size for i in self._q) < self.max_batch_size:
                    left = until - self._clock()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            batch: list = []
            size, now = 0, self._clock()
            while self._q and (not batch or size + self._q[0].size <= self.max_batch_size):
                it = self._q.popleft()
                if it.deadline < now:
                    self.expired += 1
                    if it.future.set_running_or_notify_cancel():
                        it.future.set_exception(DeadlineExceeded("expired in the queue"))
                    continue
                if not it.future.set_running_or_notify_cancel():
                    continue  # the caller gave up
                batch.append(it)
                size += it.size
            return batch

    def _loop(self, setup: Callable[[], None] | None) -> None:
        try:
            if setup is not None:
                setup()
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            self._setup_error = e
            return
        finally:
            self._setup_done.set()
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            self.batches += 1
            try:
                results = self._process([it.payload for it in batch])
            except BaseException as e:  # reported to every caller, the thread lives on
                log.exception("batch of %d requests failed", len(batch))
                for it in batch:
                    it.future.set_exception(e)
                continue
            for it, r in zip(batch, results):
                if isinstance(r, BaseException):
                    it.future.set_exception(r)
                else:
                    it.future.set_result(r)
