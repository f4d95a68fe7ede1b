"""The reward server end to end: a real uvicorn on a free loopback port, real HTTP, tiny trained systems."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import pytest
import torch

from conftest import toy_pairs
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext, ScoreOutput

PREFIX = {"alpha": "python code function", "beta": "recipe cooking kitchen"}


def routed_pairs(domain: str, n: int, seed: int) -> list:
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


@pytest.fixture(scope="module")
def baseline_dir(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT baseline trained for one epoch and saved (its quality does not matter, its arithmetic does)."""
    root = tmp_path_factory.mktemp("serve-baseline")
    cfg = RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=48),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0))
    system = build_system(cfg)
    system.fit(toy_pairs(32, seed=1), None, FitContext(root / "run", progress=False))
    return system.save(root / "run" / "model")


@pytest.fixture(scope="module")
def arliss(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny routed system (ARLISS, batched mixed-adapter inference) on two domains."""
    root = tmp_path_factory.mktemp("serve-arliss")
    cfg = RunConfig(system="arliss", model=ModelConfig(backbone=tiny_bert, max_length=48),
                    train=TrainConfig(lr=5e-3, batch_size=8, epochs=1, save_every=0),
                    options={"inference": "batched"},
                    components={"router": {"train": {"epochs": 2, "lr": 1e-2}}})
    system = build_system(cfg)
    train = routed_pairs("alpha", 16, 1) + routed_pairs("beta", 16, 2)
    system.fit(train, None, FitContext(root / "run", progress=False))
    return system


class FakeSystem:
    """Same `score` signature as a RewardSystem; reward = len(prompt) + len(response) / 1000.

    `gate` (when set) blocks every call until released, to hold requests in flight; `fail` makes calls raise.
    """

    name = "fake"
    domains = ["x", "y"]

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.gate = gate
        self.fail = fail
        self.calls: list[int] = []
        self.entered = threading.Event()

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        self.calls.append(len(prompts))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail:
            raise RuntimeError("the GPU caught fire")
        return ScoreOutput([len(p) + len(r) / 1000 for p, r in zip(prompts, responses)],
                           [{"system": "fake", "domain": (domains or [None] * len(prompts))[i]}
                            for i in range(len(prompts))])


def expected(prompt: str, response: str) -> float:
    return len(prompt) + len(response) / 1000


@contextmanager
def serving(source: Any, ready: bool = True, **settings: Any) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(source, ServeConfig(**settings))) as srv:
        if ready:
            key = settings.get("api_key")
            srv.wait_ready(headers={"Authorization": f"Bearer {key}"} if key else None)
        yield srv


def post_score(url: str, items: list[dict[str, Any]], **kw: Any) -> httpx.Response:
    return httpx.post(url + "/v1/score", json={"items": items}, timeout=60, **kw)


def concurrently(fn: Any, args: Sequence[Any], workers: int) -> list[Any]:
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, args))


# -- scoring
@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_scores_equal_offline_scores_with_and_without_batching(baseline_dir: Path, batching: bool) -> None:
    offline_system = load_system(baseline_dir)
    pairs = toy_pairs(24, seed=5)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    offline = offline_system.score(prompts, responses)
    with serving(str(baseline_dir), max_wait_ms=100, batching=batching) as srv:  # loads the run folder itself
        singles = concurrently(lambda i: post_score(srv.url, [{"prompt": prompts[i], "response": responses[i]}]),
                               range(18), workers=18)
        multi = post_score(srv.url, [{"prompt": p, "response": r} for p, r in zip(prompts[18:], responses[18:])])
        batches = srv.app.state.moerm.metrics.batches
    assert all(r.status_code == 200 for r in singles + [multi])
    got = [r.json()["rewards"][0] for r in singles] + multi.json()["rewards"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(offline.rewards), atol=1e-5, rtol=0)
    assert singles[0].json()["details"] == [offline.details[0]] == [{"system": "baseline"}]
    if batching:
        assert batches < 19  # concurrent requests shared forward passes
    else:
        assert batches == 19  # one scoring call per request


def test_routed_system_scores_through_its_batched_path_and_explains_each_reward(arliss: Any) -> None:
    pairs = routed_pairs("alpha", 4, 7) + routed_pairs("beta", 4, 8)
    domains = [None] * 7 + ["alpha"]  # the last one routed by the caller
    items = [{"prompt": p.prompt, "response": p.chosen, **({"domain": d} if d else {})} for p, d in zip(pairs, domains)]
    offline = arliss.score([p.prompt for p in pairs], [p.chosen for p in pairs], domains)
    with serving(arliss, max_wait_ms=50) as srv:
        halves = concurrently(lambda part: post_score(srv.url, part), [items[:4], items[4:]], workers=2)
    assert [r.status_code for r in halves] == [200, 200]
    rewards = halves[0].json()["rewards"] + halves[1].json()["rewards"]
    details = halves[0].json()["details"] + halves[1].json()["details"]
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(offline.rewards), atol=1e-5, rtol=0)
    assert all(d["inference"] == "batched" and set(d["router_probs"]) == {"alpha", "beta"} for d in details)
    assert [d["routed_domain"] for d in details] == [d["routed_domain"] for d in offline.details]
    assert details[-1]["route_source"] == "given" and details[-1]["routed_domain"] == "alpha"


def test_openrlhf_get_reward_splits_queries_and_matches_v1_score() -> None:
    prompts = ["What is 2+2?", "Name a colour."]
    responses = ["It is 4.", "Blue."]
    heads = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in prompts]
    queries = [f"<|endoftext|>{h}{r}<|im_end|><|endoftext|>" for h, r in zip(heads, responses)]
    want = [expected(p, r) for p, r in zip(prompts, responses)]
    with serving(FakeSystem()) as srv:
        url = srv.url + "/get_reward"
        with_prompts = httpx.post(url, json={"query": queries, "prompts": heads, "labels": ["4", None]})
        template_only = httpx.post(url, json={"query": queries, "future_openrlhf_field": 1})
        v1 = post_score(srv.url, [{"prompt": p, "response": r} for p, r in zip(prompts, responses)])
        mismatch = httpx.post(url, json={"query": queries, "prompts": heads[:1]})
        unsplittable = httpx.post(url, json={"query": [queries[0], "no chat markup at all"]})
        not_a_list = httpx.post(url, json={"query": "one string"})
    for r in (with_prompts, template_only):
        assert r.status_code == 200, r.text
        assert r.json() == {"rewards": want, "scores": want, "extra_logs": {}}
    assert v1.json()["rewards"] == want
    assert mismatch.status_code == 422 and mismatch.json()["detail"].startswith("prompts: 1 prompts for 2 queries")
    assert unsplittable.status_code == 422 and unsplittable.json()["detail"].startswith(
        "query.1: cannot split into prompt and response")
    assert not_a_list.status_code == 422 and not_a_list.json()["detail"] == "query: Input should be a valid list"


def test_info_and_prometheus_metrics(arliss: Any) -> None:
    with serving(arliss, max_batch=16) as srv:
        info = httpx.get(srv.url + "/v1/info").json()
        post_score(srv.url, [{"prompt": "python code function a", "response": "b"}] * 3)
        post_score(srv.url, [{"prompt": 1}])
        m = httpx.get(srv.url + "/metrics")
    assert info["system"] == "arliss" and info["domains"] == ["alpha", "beta"]
    assert info["parameters"]["params_total"] > info["parameters"]["params_trainable"] > 0
    assert info["server"]["max_batch"] == 16 and info["server"]["auth"] is False
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = m.text
    assert 'moerm_requests_total{endpoint="/v1/score",status="200"} 1' in text
    assert 'moerm_requests_total{endpoint="/v1/score",status="422"} 1' in text
    assert "moerm_pairs_scored_total 3" in text and "moerm_batches_total 1" in text
    assert 'moerm_batch_size_items_bucket{le="4"} 1' in text and 'moerm_batch_size_items_bucket{le="2"} 0' in text
    assert re.search(r'moerm_request_latency_seconds_bucket\{endpoint="/v1/score",le="\+Inf"\} 2', text)
    assert 'moerm_request_latency_seconds_count{endpoint="/v1/score"} 2' in text
    assert "# TYPE moerm_queue_depth_items gauge" in text and "moerm_queue_depth_items 0" in text
    assert "moerm_requests_in_flight 1" in text  # the /metrics request itself


def test_sixty_four_concurrent_clients_each_get_their_own_rewards() -> None:
    fake = FakeSystem()
    with serving(fake, max_batch=32, max_wait_ms=10) as srv:
        def client(i: int) -> list[bool]:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                oks = []
                for j in range(3):
                    item = {"prompt": "p" * (i + 1), "response": "r" * j}
                    r = c.post("/v1/score", json={"items": [item]})
                    want = [expected(item["prompt"], item["response"])]
                    oks.append(r.status_code == 200 and r.json()["rewards"] == want)
                return oks
        results = concurrently(client, range(64), workers=64)
    assert all(all(r) for r in results)
    assert sum(fake.calls) == 192 and len(fake.calls) < 192


# -- errors
def test_limits_413_and_malformed_requests_422_name_the_field() -> None:
    fake = FakeSystem()
    ok = {"prompt": "p", "response": "r"}
    with serving(fake, max_items_per_request=3, max_chars_per_text=10) as srv:
        too_many = post_score(srv.url, [ok] * 4)
        too_long = post_score(srv.url, [ok, {"prompt": "p", "response": "r" * 11}])
        long_query = httpx.post(srv.url + "/get_reward", json={"query": ["q" * 11]})
        bad_json = httpx.post(srv.url + "/v1/score", content=b'{"items": [',
                              headers={"Content-Type": "application/json"})
        wrong_type = post_score(srv.url, [{"prompt": "p", "response": 5}])
        extra = post_score(srv.url, [{**ok, "respnse": "typo"}])
        missing = httpx.post(srv.url + "/v1/score", json={"itemz": []})
        bad_domain = post_score(srv.url, [{**ok, "domain": ["x"]}])
        empty = post_score(srv.url, [])
        fine = post_score(srv.url, [ok] * 3)
    assert too_many.status_code == 413 and too_many.json()["detail"] == "items: 4 items, the limit is 3 per request"
    assert too_long.status_code == 413 and too_long.json()["detail"].startswith("items.1.response: 11 characters")
    assert long_query.status_code == 413 and long_query.json()["detail"].startswith("query.0: 11 characters")
    assert bad_json.status_code == 422 and bad_json.json()["detail"].startswith("body: invalid JSON at position")
    assert wrong_type.status_code == 422
    assert wrong_type.json()["detail"] == "items.0.response: Input should be a valid string"
    assert wrong_type.json()["errors"] == [{"field": "items.0.response", "message": "Input should be a valid string"}]
    assert extra.status_code == 422 and "items.0.respnse: Extra inputs are not permitted" in extra.json()["detail"]
    assert missing.status_code == 422 and "items: Field required" in missing.json()["detail"]
    assert bad_domain.status_code == 422 and bad_domain.json()["detail"].startswith("items.0.domain:")
    assert empty.status_code == 200 and empty.json() == {"rewards": [], "details": []}
    assert fine.status_code == 200
    assert fake.calls == [3]  # nothing refused ever reached the model


def test_a_lone_surrogate_is_422_and_the_requests_batched_with_it_still_score(baseline_dir: Path) -> None:
    """The real tokenizer raises on a lone surrogate; it must never see one, nor fail the other requests."""
    pairs = toy_pairs(6, seed=9)
    offline = load_system(baseline_dir).score([p.prompt for p in pairs], [p.chosen for p in pairs])
    bad = json.dumps({"items": [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d \ud800 e"}]})
    with serving(str(baseline_dir), max_wait_ms=300) as srv:  # a wide window: they all share one batch
        with ThreadPoolExecutor(8) as ex:
            goods = [ex.submit(post_score, srv.url, [{"prompt": p.prompt, "response": p.chosen}]) for p in pairs[:3]]
            refused = ex.submit(httpx.post, srv.url + "/v1/score", content=bad.encode(),
                                headers={"Content-Type": "application/json"}, timeout=60)
            goods += [ex.submit(post_score, srv.url, [{"prompt": p.prompt, "response": p.chosen}]) for p in pairs[3:]]
            answers, refused_answer = [g.result() for g in goods], refused.result()
    assert refused_answer.status_code == 422
    assert refused_answer.json()["detail"].startswith("items.1.response: not encodable as UTF-8: a lone surrogate")
    assert [a.status_code for a in answers] == [200] * 6
    torch.testing.assert_close(torch.tensor([a.json()["rewards"][0] for a in answers]), torch.tensor(offline.rewards),
                               atol=1e-5, rtol=0)


def test_scoring_failure_is_500_and_the_server_keeps_serving() -> None:
    fake = FakeSystem(fail=True)
    with serving(fake) as srv:
        r = post_score(srv.url, [{"prompt": "p", "response": "r"}])
        fake.fail = False
        again = post_score(srv.url, [{"prompt": "p", "response": "r"}])
    assert r.status_code == 500 and "RuntimeError: the GPU caught fire" in r.json()["detail"]
    assert again.status_code == 200


def test_a_full_queue_answers_503_with_retry_after() -> None:
    gate = threading.Event()
    fake = FakeSystem(gate=gate)
    item = {"prompt": "p", "response": "r"}
    with serving(fake, max_batch=1, max_wait_ms=0, max_queue=2, max_items_per_request=2, retry_after_s=3) as srv:
        batcher = srv.app.state.moerm.batcher
        with ThreadPoolExecutor(3) as ex:
            first = ex.submit(post_score, srv.url, [item])
            assert fake.entered.wait(10)  # the worker is busy with the first request
            queued = [ex.submit(post_score, srv.url, [item]) for _ in range(2)]
            deadline = time.monotonic() + 10
            while batcher.queued_items < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = post_score(srv.url, [item])
            metrics = httpx.get(srv.url + "/metrics").text
            gate.set()
            answers = [first.result(), *(q.result() for q in queued)]
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "3"
    assert "queue full: 2 items waiting" in refused.json()["detail"]
    assert "moerm_queue_depth_items 2" in metrics and 'moerm_rejected_total{reason="queue_full"} 1' in metrics
    assert [a.status_code for a in answers] == [200, 200, 200]


def test_bearer_token_is_required_except_for_health(monkeypatch: pytest.MonkeyPatch) -> None:
    item = {"prompt": "p", "response": "r"}
    with serving(FakeSystem(), api_key="s3cret") as srv:
        none = post_score(srv.url, [item])
        wrong = post_score(srv.url, [item], headers={"Authorization": "Bearer nope"})
        malformed_unauth = httpx.post(srv.url + "/v1/score", content=b"{", headers={"Content-Type": "application/json"})
        right = post_score(srv.url, [item], headers={"Authorization": "Bearer s3cret"})
        metrics = httpx.get(srv.url + "/metrics")
        health = httpx.get(srv.url + "/health")
    assert none.status_code == wrong.status_code == malformed_unauth.status_code == metrics.status_code == 401
    assert none.headers["WWW-Authenticate"] == "Bearer"
    assert right.status_code == 200 and health.status_code == 200
    monkeypatch.setenv("MOERM_API_KEY", "from-env")
    assert ServeConfig().api_key == "from-env"
    assert ServeConfig(api_key="").api_key is None  # explicitly no auth
    with serving(FakeSystem()) as srv:  # the key comes from the environment
        assert post_score(srv.url, [item]).status_code == 401
        assert post_score(srv.url, [item], headers={"Authorization": "Bearer from-env"}).status_code == 200


# -- life cycle
def test_health_is_503_while_loading_and_200_once_loaded() -> None:
    release = threading.Event()

    def slow_loader() -> FakeSystem:
        assert release.wait(30)
        return FakeSystem()

    with serving(slow_loader, ready=False) as srv:
        loading = httpx.get(srv.url + "/health")
        early = post_score(srv.url, [{"prompt": "p", "response": "r"}])
        info = httpx.get(srv.url + "/v1/info")
        release.set()
        srv.wait_ready(timeout=10)
        ready = httpx.get(srv.url + "/health")
        later = post_score(srv.url, [{"prompt": "p", "response": "r"}])
    assert loading.status_code == 503 and loading.json() == {"status": "loading"} and "Retry-After" in loading.headers
    assert early.status_code == 503 and early.json()["detail"].startswith("the model is loading")
    assert info.status_code == 503
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "system": "fake"}
    assert later.status_code == 200

    def broken_loader() -> FakeSystem:
        raise FileNotFoundError("no saved reward system in /nowhere")

    with serving(broken_loader, ready=False) as srv:
        with pytest.raises(RuntimeError, match="no saved reward system"):
            srv.wait_ready(timeout=10)
        health = httpx.get(srv.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "error"


def test_graceful_shutdown_finishes_requests_in_flight() -> None:
    gate = threading.Event()
    fake = FakeSystem(gate=gate)
    with serving(fake, max_batch=2, max_wait_ms=0) as srv:
        metrics = srv.app.state.moerm.metrics
        with ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(post_score, srv.url, [{"prompt": "p" * (i + 1), "response": "r"}]) for i in range(6)]
            deadline = time.monotonic() + 10
            while metrics.in_flight < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert metrics.in_flight == 6 and fake.entered.is_set()
            stopper = ex.submit(srv.stop)  # as SIGTERM would: stop accepting, wait for in-flight requests
            time.sleep(0.3)
            assert not stopper.done()  # still waiting on the six requests
            with pytest.raises(httpx.TransportError):
                httpx.get(srv.url + "/health", timeout=2)  # no longer accepting
            gate.set()
            answers = [f.result(timeout=30) for f in futures]
            stopper.result(timeout=30)
    assert [a.status_code for a in answers] == [200] * 6
    assert [a.json()["rewards"] for a in answers] == [[expected("p" * (i + 1), "r")] for i in range(6)]
    assert not srv.thread.is_alive()
