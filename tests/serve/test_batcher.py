"""The dynamic batcher on its own: grouping, order, batching off, waiting, bounds, errors, draining on close."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from moerm.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError, ScoringError
from moerm.serve.metrics import ServerMetrics
from moerm.systems.base import ScoreOutput


class Recorder:
    """A scoring function that records each call; reward = len(prompt) + 100 * len(response)."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None):
        self.calls: list[tuple[list[str], list[str], Any]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.gate: threading.Event | None = None

    def __call__(self, prompts: list[str], responses: list[str], domains: Any) -> ScoreOutput:
        self.calls.append((prompts, responses, domains))
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in prompts:
            raise RuntimeError("boom")
        doms = domains or [None] * len(prompts)
        return ScoreOutput([len(p) + 100.0 * len(r) for p, r in zip(prompts, responses)],
                           [{"prompt": p, "domain": d} for p, d in zip(prompts, doms)])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_get_their_own_slices() -> None:
    rec = Recorder()

    async def main() -> list[Any]:
        b = DynamicBatcher(rec, max_batch=4, max_wait_ms=200)
        b.start()
        out = await asyncio.gather(*(b.submit(["p" * i], ["r" * (i % 3)]) for i in range(10)))
        await b.close()
        return out

    out = run(main())
    assert [len(c[0]) for c in rec.calls] == [4, 4, 2]
    for i, (rewards, details) in enumerate(out):
        assert rewards == [i + 100.0 * (i % 3)] and details == [{"prompt": "p" * i, "domain": None}]
    assert all(c[2] is None for c in rec.calls)  # no domain given anywhere: the system routes itself


def test_multi_item_requests_are_never_split_and_domains_pass_through() -> None:
    rec = Recorder()

    async def main() -> list[Any]:
        b = DynamicBatcher(rec, max_batch=5, max_wait_ms=100)
        b.start()
        out = await asyncio.gather(b.submit(["a", "bb", "ccc"], ["x", "y", "z"], ["d1", None, "d2"]),
                                   b.submit(["dddd", "e"], ["", ""]),
                                   b.submit(["f"] * 7, ["g"] * 7))  # larger than max_batch: scored alone
        await b.close()
        return out

    out = run(main())
    assert [len(c[0]) for c in rec.calls] == [5, 7]
    assert rec.calls[0][2] == ["d1", None, "d2", None, None]
    assert out[0][0] == [101.0, 102.0, 103.0] and [d["domain"] for d in out[0][1]] == ["d1", None, "d2"]
    assert out[1][0] == [4.0, 1.0]
    assert out[2][0] == [101.0] * 7


def test_batching_off_scores_each_request_alone_in_order() -> None:
    rec = Recorder()

    async def main() -> list[Any]:
        b = DynamicBatcher(rec, max_batch=64, max_wait_ms=50, batching=False)
        b.start()
        out = await asyncio.gather(*(b.submit([str(i)] * 2, ["r", "rr"]) for i in range(6)))
        await b.close()
        return out

    out = run(main())
    assert [c[0] for c in rec.calls] == [[str(i)] * 2 for i in range(6)]
    assert [o[0] for o in out] == [[101.0, 201.0]] * 6


def test_a_lone_request_waits_at_most_max_wait() -> None:
    rec = Recorder()

    async def main() -> float:
        b = DynamicBatcher(rec, max_batch=64, max_wait_ms=100)
        b.start()
        t0 = time.perf_counter()
        await b.submit(["p"], ["r"])
        dt = time.perf_counter() - t0
        await b.close()
        return dt

    first = run(main())
    assert first >= 0.09  # it did wait for company (a wait never ends early, whatever the load)
    # ... and no longer than max_wait: a busy machine can only lengthen a wait, so one attempt of three in
    # bounds shows the batcher keeps it (a CI job beside others must not fail for their load)
    dts = [first]
    while dts[-1] >= 1.0 and len(dts) < 3:
        dts.append(run(main()))
    assert min(dts) < 1.0, dts


def test_a_full_queue_refuses_and_metrics_count_batches() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    metrics = ServerMetrics()

    async def main() -> None:
        b = DynamicBatcher(rec, max_batch=2, max_wait_ms=0, max_queue=3, metrics=metrics)
        b.start()
        first = asyncio.ensure_future(b.submit(["a"], ["r"]))
        while not rec.calls:  # the worker is now blocked inside the scoring function
            await asyncio.sleep(0.005)
        queued = [asyncio.ensure_future(b.submit(["b", "c"], ["r", "r"])),
                  asyncio.ensure_future(b.submit(["d"], ["r"]))]
        await asyncio.sleep(0.01)
        assert b.queued_items == 3 and b.queued_requests == 2 and metrics.queue_items() == 3
        with pytest.raises(QueueFullError, match="3 items waiting"):
            await b.submit(["e"], ["r"])
        rec.gate.set()
        assert (await first)[0] == [101.0]
        assert [(await q)[0] for q in queued] == [[101.0, 101.0], [101.0]]
        await b.close()

    run(main())
    assert [len(c[0]) for c in rec.calls] == [1, 2, 1]
    assert metrics.batches == 3 and metrics.pairs_scored == 4
    text = metrics.render()
    assert "moerm_batch_size_items_bucket{le=\"2\"} 3" in text and "moerm_queue_depth_items 0" in text


def test_a_failing_batch_fails_its_requests_only() -> None:
    rec = Recorder(fail_on="bad")

    async def main() -> None:
        b = DynamicBatcher(rec, max_batch=8, max_wait_ms=0, batching=False)
        b.start()
        results = await asyncio.gather(b.submit(["bad"], ["r"]), b.submit(["good"], ["r"]), return_exceptions=True)
        assert isinstance(results[0], ScoringError) and "RuntimeError: boom" in str(results[0])
        assert results[1][0] == [104.0]
        await b.close()

    run(main())


def test_when_a_batch_fails_each_request_is_scored_alone_so_only_the_bad_one_fails() -> None:
    rec = Recorder(fail_on="bad")
    metrics = ServerMetrics()

    async def main() -> list[Any]:
        b = DynamicBatcher(rec, max_batch=16, max_wait_ms=200, metrics=metrics)
        b.start()
        out = await asyncio.gather(b.submit(["a", "b"], ["r", "rr"]), b.submit(["bad"], ["r"]),
                                   b.submit(["c"], ["rrr"]), return_exceptions=True)
        await b.close()
        return out

    good1, bad, good2 = run(main())
    assert [c[0] for c in rec.calls] == [["a", "b", "bad", "c"], ["a", "b"], ["bad"], ["c"]]
    assert good1 == ([101.0, 201.0], [{"prompt": "a", "domain": None}, {"prompt": "b", "domain": None}])
    assert good2[0] == [301.0]
    assert isinstance(bad, ScoringError) and "RuntimeError: boom" in str(bad) and isinstance(bad.cause, RuntimeError)
    assert metrics.batches == 2 and metrics.pairs_scored == 3  # the two good re-scores; the failed calls do not count


def test_close_finishes_queued_requests_then_refuses_new_ones() -> None:
    rec = Recorder(delay=0.05)

    async def main() -> None:
        b = DynamicBatcher(rec, max_batch=1, max_wait_ms=0)
        b.start()
        pending = [asyncio.ensure_future(b.submit([str(i)], ["r"])) for i in range(4)]
        await asyncio.sleep(0)  # all four queued
        await b.close()
        assert all(p.done() and p.result()[0] == [101.0] for p in pending)
        with pytest.raises(BatcherClosedError):
            await b.submit(["late"], ["r"])

    run(main())
    assert len(rec.calls) == 4


def test_a_cancelled_request_is_not_scored() -> None:
    rec = Recorder()
    rec.gate = threading.Event()

    async def main() -> None:
        b = DynamicBatcher(rec, max_batch=1, max_wait_ms=0)
        b.start()
        first = asyncio.ensure_future(b.submit(["a"], ["r"]))
        while not rec.calls:
            await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(b.submit(["gone"], ["r"]))
        kept = asyncio.ensure_future(b.submit(["kept"], ["r"]))
        await asyncio.sleep(0)
        gone.cancel()  # its client disconnected
        rec.gate.set()
        await first
        assert (await kept)[0] == [104.0]
        await b.close()

    run(main())
    assert [c[0] for c in rec.calls] == [["a"], ["kept"]]


def test_abort_fails_queued_requests_at_once() -> None:
    rec = Recorder()
    rec.gate = threading.Event()

    async def main() -> None:
        b = DynamicBatcher(rec, max_batch=1, max_wait_ms=0)
        b.start()
        first = asyncio.ensure_future(b.submit(["a"], ["r"]))
        while not rec.calls:
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(b.submit(["b"], ["r"]))
        await asyncio.sleep(0)
        b.abort()  # a forced exit: nothing waits for the model
        with pytest.raises(BatcherClosedError, match="server stopped"):
            await queued
        assert b.queued_items == 0
        first.cancel()
        rec.gate.set()

    run(main())
    assert [c[0] for c in rec.calls] == [["a"]]
