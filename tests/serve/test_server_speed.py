"""What makes the server as fast as offline scoring (issue 15): the model is never left idle while requests wait,
and a batch of mixed-length pairs scores each pair exactly as offline `score` does, in request order.

The timing tests use a scoring function that sleeps (it releases the GIL, as torch does), so they measure the
batcher and the HTTP path, not this machine's CPU; their bounds leave room for a busy machine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import torch
from conftest import toy_pairs

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.serve.batcher import DynamicBatcher
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext, ScoreOutput

T = TypeVar("T")


class SleepyModel:
    """`score` that takes `per_call_s` + `per_item_s` per item; reward = len(prompt) + len(response) / 1000.

    Records (start, end, items) of every call, to measure how much of the wall time the model was busy."""

    name = "sleepy"
    domains = ()

    def __init__(self, per_call_s: float, per_item_s: float = 0.0):
        self.per_call_s, self.per_item_s = per_call_s, per_item_s
        self.spans: list[tuple[float, float, int]] = []
        self.lock = threading.Lock()

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        t0 = time.perf_counter()
        time.sleep(self.per_call_s + self.per_item_s * len(prompts))
        with self.lock:
            self.spans.append((t0, time.perf_counter(), len(prompts)))
        return ScoreOutput([len(p) + len(r) / 1000 for p, r in zip(prompts, responses)],
                           [{"n": len(p)} for p in prompts])

    def busy_fraction(self, skip: int = 1) -> float:
        """Time inside calls / wall time from the first counted call's start to the last call's end."""
        spans = self.spans[skip:]
        return sum(e - s for s, e, _ in spans) / (spans[-1][1] - spans[0][0])


def test_requests_queued_while_the_model_is_busy_are_scored_the_moment_it_is_free() -> None:
    """While one call runs, the requests that arrive queue; when it ends they have waited longer than
    `max_wait_ms` and are scored together at once. This is what keeps the model busy at 32 clients (batches
    alternate between the two halves of the clients).

    Held by events, not by sleeps: the first call is a full batch (no waiting for company) that blocks until the
    others have waited past max_wait; a batcher that made them wait max_wait again would leave a 2 s gap."""
    model = SleepyModel(per_call_s=0.0)
    started, release = threading.Event(), threading.Event()
    wait_s = 2.0

    def score(p: Sequence[str], r: Sequence[str], d: Sequence[str | None] | None) -> ScoreOutput:
        if not started.is_set():
            started.set()
            assert release.wait(30)
        return model.score(p, r, d)

    async def run() -> list[tuple[list[float], list[dict[str, int]]]]:
        b = DynamicBatcher(score, max_batch=4, max_wait_ms=wait_s * 1000)
        b.start()
        first = asyncio.create_task(b.submit(["a"] * 4, ["b"] * 4))  # a full batch: scored at once
        while not started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit(["p" * i], ["r"])) for i in range(1, 4)]
        await asyncio.sleep(wait_s + 0.1)  # they have now waited longer than max_wait (sleep never ends early)
        release.set()
        out = [await first] + [await t for t in rest]
        await b.close()
        return out

    out = asyncio.run(run())
    assert [n for _, _, n in model.spans] == [4, 3]
    gap = model.spans[1][0] - model.spans[0][1]
    assert gap < wait_s / 2, gap  # not another max_wait: they waited through the first call already
    assert [o[0] for o in out] == [[1.001] * 4] + [[i + 0.001] for i in range(1, 4)]


def best_of(attempts: int, measure: Callable[[], T], ok: Callable[[T], bool]) -> T:
    """The first of up to `attempts` measurements that meets the bound: a busy machine can only make a timing
    worse, never better, so one good attempt shows the code meets it (and a CI job running beside others does
    not fail for their load). Returns the last measurement when none does, for the assertion to show it."""
    for _ in range(attempts - 1):
        value = measure()
        if ok(value):
            return value
    return measure()


def test_an_idle_model_waits_at_most_max_wait_for_company() -> None:
    """32 closed-loop clients whose requests all come back together: each batch waits `max_wait_ms` for company
    (no more), and every client gets its own reward."""
    model = SleepyModel(per_call_s=0.05)
    wait_s = 0.02

    async def run() -> list[tuple[str, float]]:
        b = DynamicBatcher(lambda p, r, d: model.score(p, r, d), max_batch=64, max_wait_ms=wait_s * 1000)
        b.start()
        got: list[tuple[str, float]] = []

        async def client(cid: int) -> None:
            end = time.monotonic() + 1.0
            k = 0
            while time.monotonic() < end:
                prompt = f"{cid}-{k}" + "x" * ((cid * 7 + k) % 13)
                rewards, _ = await b.submit([prompt], ["abc"])
                got.append((prompt, rewards[0]))
                k += 1

        await asyncio.gather(*(client(c) for c in range(32)))
        await b.close()
        return got

    def measure() -> tuple[list[tuple[str, float]], list[float], float]:
        model.spans.clear()
        got = asyncio.run(run())
        gaps = sorted(s1 - e0 for (_, e0, _), (s1, _, _) in zip(model.spans, model.spans[1:]))
        return got, gaps, sum(n for _, _, n in model.spans) / len(model.spans)

    def fast(m: tuple[list[tuple[str, float]], list[float], float]) -> bool:  # median idle gap: max_wait + scheduling
        return bool(m[1]) and m[1][len(m[1]) // 2] < wait_s + 0.015 and m[2] >= 16

    got, gaps, mean_batch = best_of(3, measure, fast)
    assert all(reward == len(prompt) + 0.003 for prompt, reward in got)
    assert gaps and gaps[len(gaps) // 2] < wait_s + 0.015, gaps
    assert mean_batch >= 16


def test_over_http_the_model_stays_busy_at_32_clients() -> None:
    """The same through uvicorn: per-request work on the event loop (HTTP, JSON, validation) overlaps the model
    call, so 32 clients sending one pair each keep the model busy."""
    model = SleepyModel(per_call_s=0.15)
    cfg = ServeConfig(max_batch=64, max_wait_ms=5, freeze_gc=False)
    errors: list[str] = []
    with BackgroundServer(create_app(model, cfg)) as srv:
        srv.wait_ready()
        best_of(3, lambda: busy_at_32_clients(srv, model, errors), lambda busy: busy >= 0.8)
    assert not errors, errors[:3]
    assert len(model.spans) >= 6
    assert model.busy_fraction() >= 0.8, model.spans


def busy_at_32_clients(srv: BackgroundServer, model: SleepyModel, errors: list[str]) -> float:
    """32 closed-loop HTTP clients for 2 s; the model's busy fraction (its spans cleared first)."""
    model.spans.clear()

    async def load() -> None:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as client:
            async def one(cid: int) -> None:
                end = time.monotonic() + 2.0
                k = 0
                while time.monotonic() < end:
                    prompt = f"{cid}-{k}"
                    r = await client.post("/v1/score", json={"items": [{"prompt": prompt, "response": "ab"}]})
                    if r.status_code != 200 or r.json()["rewards"] != [len(prompt) + 0.002]:
                        errors.append(f"{r.status_code} {r.text[:100]}")
                    k += 1

            await asyncio.gather(*(one(c) for c in range(32)))

    asyncio.run(load())
    return model.busy_fraction() if len(model.spans) > 2 else 0.0


@pytest.fixture(scope="module")
def baseline_dir(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("speed-baseline")
    cfg = RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=32),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0))
    system = build_system(cfg)
    system.fit(toy_pairs(16, seed=1), None, FitContext(root / "run", progress=False))
    return system.save(root / "run" / "model")


def test_a_mixed_length_batch_scores_in_request_order_equal_to_offline(baseline_dir: Path) -> None:
    """Pairs from 2 to past max_length tokens, sent concurrently so they share batches that are length-sorted
    and split into forward batches of 3: each answer is its own pair's offline reward (scored alone), within 1e-5."""
    pairs = toy_pairs(16, seed=7)
    prompts = [" ".join([p.prompt] * (1 + i % 5)) for i, p in enumerate(pairs)]  # some truncated at 32 tokens
    responses = [p.chosen if i % 3 else "" for i, p in enumerate(pairs)]
    offline = load_system(baseline_dir)
    alone = [offline.score([p], [r], batch_size=1).rewards[0] for p, r in zip(prompts, responses)]
    cfg = ServeConfig(max_batch=16, max_wait_ms=300, batch_size=3, freeze_gc=False)
    with BackgroundServer(create_app(str(baseline_dir), cfg)) as srv:
        srv.wait_ready()

        async def send() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(*(
                    client.post("/v1/score", json={"items": [{"prompt": p, "response": r}]})
                    for p, r in zip(prompts, responses)))

        singles = asyncio.run(send())
        multi = httpx.post(srv.url + "/v1/score", timeout=60,  # one request holding every length, in a known order
                           json={"items": [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]})
        metrics = srv.app.state.moerm.metrics
        batches = metrics.batches
    assert all(r.status_code == 200 for r in singles) and multi.status_code == 200
    torch.testing.assert_close(torch.tensor([r.json()["rewards"][0] for r in singles]), torch.tensor(alone),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(multi.json()["rewards"]), torch.tensor(alone), atol=1e-5, rtol=0)
    assert batches < 1 + len(prompts)  # the single requests shared batches
