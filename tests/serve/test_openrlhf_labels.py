"""`/get_reward` and what OpenRLHF sends besides queries: a domain per sample from `labels` (opt-in), limits that
count text and not the padding older clients add, and the route fields in `extra_logs`.

The end-to-end test drives OpenRLHF's own client (`openrlhf.utils.agent.SingleTurnAgentExecutor`, OpenRLHF 0.11.2,
installed `--no-deps` where available; skipped elsewhere) against a real server over a tiny RODOS run."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import toy_pairs
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.serve.openrlhf import SplitError, label_domain
from moerm.systems import load_system
from moerm.systems.base import ScoreOutput
from routedutil import PREFIX, tiny_rodos

TEMPLATE = "Q: {prompt}\nA: {response}"  # the policy's format: prompts[i] = "Q: ...\nA: ", query = prompt + reply


class Recording:
    """Fake routed system: reward = len(prompt) + len(response) / 1000; records the domains it was given and
    reports a route as RODOS does (hard to the given domain, else a fallback)."""

    name = "recording"
    domains = ["math", "code"]

    def __init__(self) -> None:
        self.given: list[Any] = []

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        ds = list(domains or [None] * len(prompts))
        self.given += ds
        details = [{"routed_domain": d, "route_source": "given" if d else "fallback", "fallback": d is None,
                    "weights": {} if d else {"math": 0.5, "code": 0.5}, "ood": False} for d in ds]
        return ScoreOutput([len(p) + len(r) / 1000 for p, r in zip(prompts, responses)], details)


def request(prompts: list[str], responses: list[str], labels: list[Any] | None = None) -> dict[str, Any]:
    texts = [f"Q: {p}\nA: " for p in prompts]
    body: dict[str, Any] = {"query": [t + r for t, r in zip(texts, responses)], "prompts": texts}
    if labels is not None:
        body["labels"] = labels
    return body


def test_label_formats() -> None:
    assert label_domain("math", 0) == "math" and label_domain("", 0) is None and label_domain(None, 0) is None
    assert label_domain({"domain": "code", "answer": "42"}, 0) == "code"
    assert label_domain('{"domain": "code", "answer": "42"}', 0) == "code"
    assert label_domain({"answer": "42"}, 0) is None
    with pytest.raises(SplitError, match="got int"):
        label_domain(3, 2)
    with pytest.raises(SplitError, match='"domain" must be a string'):
        label_domain({"domain": 1}, 0)


def test_labels_are_domains_only_when_asked_and_extra_logs_carry_the_route() -> None:
    fake = Recording()
    body = request(["add two", "sort a list", "hello"], ["4", "sorted()", "hi"],
                   ["math", '{"domain": "code", "answer": "x"}', ""])
    with BackgroundServer(create_app(fake, ServeConfig(query_template=TEMPLATE))) as off:
        off.wait_ready()
        r_off = httpx.post(off.url + "/get_reward", json=body, timeout=30)
    with BackgroundServer(create_app(fake, ServeConfig(query_template=TEMPLATE, labels_as_domain=True))) as on:
        on.wait_ready()
        r_on = httpx.post(on.url + "/get_reward", json=body, timeout=30)
        bad = httpx.post(on.url + "/get_reward", json={**body, "labels": ["math", 7, ""]}, timeout=30)
        short = httpx.post(on.url + "/get_reward", json={**body, "labels": ["math"]}, timeout=30)
    assert r_off.status_code == r_on.status_code == 200
    assert fake.given == [None, None, None, "math", "code", None]
    assert r_on.json()["rewards"] == r_off.json()["rewards"] == [len("add two") + 0.001, len("sort a list") + 0.008,
                                                               len("hello") + 0.002]
    logs = r_on.json()["extra_logs"]
    assert logs == {"moerm/fallback": [0.0, 0.0, 1.0], "moerm/ood": [0.0, 0.0, 0.0],
                    "moerm/route/math": [1.0, 0.0, 0.5], "moerm/route/code": [0.0, 1.0, 0.5]}
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "labels.1"
    assert short.status_code == 422 and "1 labels for 3 queries" in short.text


def test_max_chars_counts_text_not_padding() -> None:
    """An older client pads a short query to the longest of its micro-batch: the short one is scored as unpadded;
    a query whose text is too long is still refused."""
    fake = Recording()
    cfg = ServeConfig(query_template=TEMPLATE, max_chars_per_text=200)
    pad = "<|endoftext|>" * 40  # 520 characters of padding
    body = request(["add two"], ["4"])
    padded = {"query": [pad + body["query"][0] + pad], "prompts": [pad + body["prompts"][0]]}
    with BackgroundServer(create_app(fake, cfg)) as srv:
        srv.wait_ready()
        ok = httpx.post(srv.url + "/get_reward", json=padded, timeout=30)
        long = httpx.post(srv.url + "/get_reward", json=request(["x" * 300], ["4"]), timeout=30)
    assert ok.status_code == 200 and ok.json()["rewards"] == [len("add two") + 0.001]
    assert long.status_code == 413 and long.json()["errors"][0]["field"] == "query.0"


@pytest.fixture(scope="module")
def rodos_run(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_rodos(tiny_bert, tmp_path_factory.mktemp("openrlhf-rodos"))


def test_openrlhf_client_passes_domains_through_labels(rodos_run: Path) -> None:
    agent = pytest.importorskip("openrlhf.utils.agent")
    pairs = toy_pairs(4, seed=9)
    domains = ["alpha", "beta", "beta", "alpha"]
    prompts = [f"{PREFIX[d]} {p.prompt}" for d, p in zip(domains, pairs)]
    # the labels route against the router: each prompt names the other domain
    labels = ["beta", "alpha", "alpha", "beta"]
    responses = [p.chosen for p in pairs]
    body = request(prompts, responses)
    cfg = ServeConfig(query_template=TEMPLATE, labels_as_domain=True)
    with BackgroundServer(create_app(str(rodos_run), cfg)) as srv:
        srv.wait_ready()
        executor = agent.SingleTurnAgentExecutor(srv.url + "/get_reward")
        # OpenRLHF's executor posts one sample per request; several run concurrently
        async def fetch() -> list[Any]:
            return await asyncio.gather(*(executor._fetch_rewards_via_http([q], [p], [lab]) for q, p, lab in
                                          zip(body["query"], body["prompts"], labels)))
        answers = [a[0] for a in asyncio.run(fetch())]
    system = load_system(rodos_run)
    offline = torch.tensor(system.score(prompts, responses, labels).rewards)
    routed = torch.tensor(system.score(prompts, responses).rewards)
    served = torch.tensor([a["rewards"][0] for a in answers])
    torch.testing.assert_close(served, offline, atol=1e-5, rtol=0)
    assert float((offline - routed).abs().max()) > 1e-4  # the labels changed which RM scored
    for a, lab in zip(answers, labels):
        logs = a["extra_logs"]
        assert logs[f"moerm/route/{lab}"] == [1.0] and logs["moerm/fallback"] == [0.0]
        assert all(torch.tensor([v]).numel() == 1 for v in logs.values())  # as OpenRLHF turns them into tensors
