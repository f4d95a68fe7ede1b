"""Dynamic batching: concurrent requests wait in one bounded queue and are scored together.

One worker task takes the oldest request, waits up to `max_wait_ms` (counted from that request's arrival) for
others to join until the batch holds `max_batch` items, then runs the scoring function in a one-thread executor
(torch work blocks, the event loop must not) and hands each request its own slice of the result. With batching
off each request is scored alone, in arrival order. The queue is bounded in items: a request that would pass
`max_queue` is refused at once (`QueueFullError`), so overload turns into fast 503s, not unbounded latency.

When the scoring call of a batch of several requests raises, each of its requests is scored again on its own, so
one bad request fails alone and its batch-mates still get their rewards.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from moerm.serve.metrics import ServerMetrics
from moerm.systems.base import ScoreOutput

ScoreFn = Callable[[list[str], list[str], "list[str | None] | None"], ScoreOutput]


class QueueFullError(Exception):
    """The queue cannot take this request now; the client should retry later."""

    def __init__(self, queued: int, incoming: int, limit: int):
        super().__init__(f"queue full: {queued} items waiting, this request has {incoming}, the limit is {limit}")
        self.queued, self.incoming, self.limit = queued, incoming, limit


class BatcherClosedError(RuntimeError):
    """The server is shutting down and takes no new work."""


class ScoringError(RuntimeError):
    """The scoring function failed on this request (scored on its own); `cause` is what it raised."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


@dataclass
class _Request:
    prompts: list[str]
    responses: list[str]
    domains: list[str | None]
    future: asyncio.Future[tuple[list[float], list[dict[str, Any]]]]
    enqueued_at: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.prompts)


class DynamicBatcher:
    """Queue + single worker that scores requests in batches.

    Args:
        score_fn: `(prompts, responses, domains or None) -> ScoreOutput`, called in a worker thread.
        max_batch: most items per call (a single larger request is still scored, alone).
        max_wait_ms: how long the oldest waiting request may wait for company.
        max_queue: most items waiting; more raises QueueFullError.
        batching: False scores one request per call, whatever max_batch says.
        metrics: where batch sizes, batch time and pairs scored are counted; its queue gauges read this batcher.
    """

    def __init__(self, score_fn: ScoreFn, *, max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 batching: bool = True, metrics: ServerMetrics | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.score_fn = score_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.batching = batching
        self.metrics = metrics
        self._pending: deque[_Request] = deque()
        self._queued_items = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        if metrics is not None:
            metrics.queue_items = lambda: self._queued_items
            metrics.queue_requests = lambda: len(self._pending)

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def queued_requests(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is not None:
            raise RuntimeError("batcher already started")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moerm-score")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="moerm-batcher")

    async def submit(self, prompts: Sequence[str], responses: Sequence[str],
                     domains: Sequence[str | None] | None = None) -> tuple[list[float], list[dict[str, Any]]]:
        """Queue one request's items and wait for their rewards and details, in input order."""
        if self._worker is None or self._wakeup is None:
            raise RuntimeError("batcher not started")
        if self._closing:
            raise BatcherClosedError("server is shutting down")
        n = len(prompts)
        if len(responses) != n or (domains is not None and len(domains) != n):
            raise ValueError("prompts, responses and domains must have the same length")
        if n == 0:
            return [], []
        if self._queued_items + n > self.max_queue:
            raise QueueFullError(self._queued_items, n, self.max_queue)
        future: asyncio.Future[tuple[list[float], list[dict[str, Any]]]] = asyncio.get_running_loop().create_future()
        req = _Request(list(prompts), list(responses), list(domains) if domains is not None else [None] * n, future)
        self._pending.append(req)
        self._queued_items += n
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Take no new requests, finish every queued one, then stop the worker and its thread."""
        self._closing = True
        if self._worker is None:
            return
        assert self._wakeup is not None and self._executor is not None
        self._wakeup.set()
        await self._worker
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def abort(self) -> None:
        """Stop now: fail every queued request and leave the scoring thread to finish on its own."""
        self._closing = True
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                req.future.set_exception(BatcherClosedError("server stopped"))
        self._queued_items = 0
        if self._worker is not None:
            self._worker.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- worker
    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.batching:
                await self._gather()
            batch = self._take()
            if batch:
                await self._score(batch)

    async def _gather(self) -> None:
        """Wait until max_batch items are queued or the oldest request has waited max_wait."""
        assert self._wakeup is not None
        while self._pending and self._queued_items < self.max_batch and not self._closing:
            remaining = self._pending[0].enqueued_at + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Request]:
        """Pop the next batch: whole requests, oldest first, at most max_batch items (one request at least)."""
        batch: list[_Request] = []
        items = 0
        while self._pending:
            nxt = self._pending[0]
            if batch and (not self.batching or items + len(nxt) > self.max_batch):
                break
            self._pending.popleft()
            self._queued_items -= len(nxt)
            if nxt.future.done():  # its client went away: nothing to compute
                continue
            batch.append(nxt)
            items += len(nxt)
        return batch

    async def _call(self, batch: list[_Request]) -> ScoreOutput:
        """One scoring call over the batch's items, in the executor; ScoringError if it raises or miscounts."""
        prompts = [p for r in batch for p in r.prompts]
        responses = [x for r in batch for x in r.responses]
        flat_domains = [d for r in batch for d in r.domains]
        domains = flat_domains if any(d is not None for d in flat_domains) else None
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self.score_fn, prompts, responses, domains)
        except Exception as e:
            raise ScoringError(f"{type(e).__name__}: {e}", e) from e
        if len(out.rewards) != len(prompts) or len(out.details) != len(prompts):
            raise ScoringError(f"the system returned {len(out.rewards)} rewards and {len(out.details)} details "
                               f"for {len(prompts)} inputs")
        if self.metrics is not None:
            self.metrics.observe_batch(len(prompts), len(batch), time.perf_counter() - t0)
        return out

    async def _score(self, batch: list[_Request]) -> None:
        try:
            out = await self._call(batch)
        except ScoringError as e:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                return
            # One request may have broken the call for all: score each alone, so only the one that fails fails.
            for r in batch:
                if not r.future.done():
                    await self._score([r])
            return
        start = 0
        for r in batch:
            end = start + len(r)
            if not r.future.done():
                r.future.set_result((list(out.rewards[start:end]), list(out.details[start:end])))
            start = end
