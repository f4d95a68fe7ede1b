"""`/get_reward` end to end, with requests built as OpenRLHF builds them: the served reward is the reward
`system.score` (what `moerm score` prints) gives the plain prompt and response, and what the reward system (and a
router) reads is the user's words; a query that cannot be split is a 422 naming it, never a reward."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import tiny_model
from moerm.config import ModelConfig, RunConfig
from moerm.errors import UserError
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.systems import build_system, load_system
from moerm.systems.base import ScoreOutput
from test_openrlhf import (
    PRESET_OF, QWEN_DEFAULT_SYSTEM, TOKENIZERS, cases, new_client_request, old_client_request, qwen_tokenizer,
    save_tokenizer,
)


class Recording:
    """Fake system: reward = len(prompt) + len(response) / 1000; records every prompt and response it scores."""

    name = "recording"

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.responses: list[str] = []

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        self.prompts += prompts
        self.responses += responses
        return ScoreOutput([len(p) + len(r) / 1000 for p, r in zip(prompts, responses)], [{}] * len(prompts))


@contextmanager
def serving(source: Any, query_template: str) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(source, ServeConfig(query_template=query_template))) as srv:
        srv.wait_ready()
        yield srv


def get_reward(srv: BackgroundServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.url + "/get_reward", json=body, timeout=60)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 decoder reward model (random, seeded) whose tokenizer is Qwen2.5's format: `auto` reads it."""
    root = tmp_path_factory.mktemp("openrlhf-qwen-rm")
    backbone = root / "backbone"
    tok = qwen_tokenizer()
    tok.save_pretrained(backbone)
    tiny_model("qwen2", vocab_size=len(tok)).save_pretrained(backbone, safe_serialization=True)
    torch.manual_seed(0)
    system = build_system(RunConfig(system="baseline", model=ModelConfig(backbone=str(backbone), max_length=128)))
    system.save(root / "run" / "model")
    return root / "run"


@pytest.mark.parametrize("kind", ["qwen2.5", "llama3", "gpt2"])
def test_the_system_reads_the_plain_prompt_and_response(kind: str, tmp_path: Path) -> None:
    tok = TOKENIZERS[kind]()
    prompts, responses, plain = cases(kind)
    want = [len(p) + len(r) / 1000 for p, r in zip(plain, responses)]
    fake = Recording()
    for template in (PRESET_OF[kind], f"tokenizer:{save_tokenizer(kind, tmp_path)}"):
        with serving(fake, template) as srv:
            current = get_reward(srv, new_client_request(tok, prompts, responses))
            old = get_reward(srv, old_client_request(tok, prompts, responses))
        for r in (current, old):
            assert r.status_code == 200, r.text
            assert r.json() == {"rewards": want, "scores": want, "extra_logs": {}}
    assert fake.prompts == plain * 4 and fake.responses == responses * 4  # what a router would read
    assert not any(QWEN_DEFAULT_SYSTEM in p or "Answer tersely" in p for p in fake.prompts)


def test_unsplittable_queries_get_422_naming_the_item_and_score_nothing() -> None:
    qwen, llama = TOKENIZERS["qwen2.5"](), TOKENIZERS["llama3"]()
    prompts, responses, _ = cases("qwen2.5")
    good = new_client_request(qwen, prompts, responses)
    fake = Recording()
    with serving(fake, "chatml") as srv:
        swapped = get_reward(srv, {**good, "prompts": [good["prompts"][0], good["prompts"][2], good["prompts"][1]]})
        wrong_format = get_reward(srv, new_client_request(llama, prompts, responses))
        wrong_query_only = get_reward(srv, {"query": old_client_request(llama, prompts, responses)["query"]})
    with serving(fake, "plain") as srv:
        plain_query_only = get_reward(srv, {"query": ["Tell me a joke. Why did the chicken cross the road?"]})
    assert swapped.status_code == 422 and swapped.json()["detail"].startswith(
        "query.1: cannot split into prompt and response: it does not start with prompts[1]")
    assert wrong_format.status_code == 422 and wrong_format.json()["detail"].startswith(
        "prompts.0: cannot split into prompt and response: prompts[0] does not start the way chatml prompts start")
    assert wrong_query_only.status_code == 422 and wrong_query_only.json()["errors"][0]["field"] == "query.0"
    assert "does not start the way chatml conversations start" in wrong_query_only.json()["detail"]
    assert plain_query_only.status_code == 422 and "send `prompts`" in plain_query_only.json()["detail"]
    assert fake.prompts == []


def test_served_rewards_equal_offline_scores_of_the_plain_pairs(qwen_run: Path, tmp_path: Path) -> None:
    system = load_system(qwen_run)
    for kind, template in (("qwen2.5", "auto"), ("llama3", "llama3"),
                           ("gpt2", f"tokenizer:{save_tokenizer('gpt2', tmp_path)}")):
        tok = TOKENIZERS[kind]()
        prompts, responses, plain = cases(kind)
        offline = torch.tensor(system.score(plain, responses).rewards)
        with serving(str(qwen_run), template) as srv:
            info = httpx.get(srv.url + "/v1/info").json()
            served = [get_reward(srv, new_client_request(tok, prompts, responses)),
                      get_reward(srv, old_client_request(tok, prompts, responses))]
        for r in served:
            assert r.status_code == 200, r.text
            torch.testing.assert_close(torch.tensor(r.json()["rewards"]), offline, atol=1e-5, rtol=0)
        assert info["server"]["query_template"] == template
        if template == "auto":
            assert info["server"]["query_format"]["name"] == f"auto ({system.config.model.backbone})"
    # the rewards are sensitive to what is removed: the templated prompt would score differently
    templated = new_client_request(TOKENIZERS["qwen2.5"](), ["What is two plus two?"], ["It is four."])["prompts"]
    assert abs(system.score(templated, ["It is four."]).rewards[0] - system.score(["What is two plus two?"],
                                                                                ["It is four."]).rewards[0]) > 1e-4


def test_auto_with_a_loader_function_reads_the_loaded_systems_backbone(qwen_run: Path) -> None:
    tok = TOKENIZERS["qwen2.5"]()
    prompts, responses, plain = cases("qwen2.5")
    system = load_system(qwen_run)
    with serving(lambda: system, "auto") as srv:
        r = get_reward(srv, new_client_request(tok, prompts, responses))
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["rewards"]), torch.tensor(system.score(plain, responses).rewards),
                               atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="has none to read"):  # a loaded object that names no backbone
        create_app(Recording(), ServeConfig(query_template="auto"))
