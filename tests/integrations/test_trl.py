"""The TRL reward function: TRL's signature, conversational inputs, local and HTTP modes giving the same rewards."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from conftest import toy_pairs
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.encoding import hh_messages
from moerm.errors import UserError
from moerm.integrations.trl import completion_text, prompt_text, reward_function
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext, ScoreOutput


@pytest.fixture(scope="module")
def run_dir(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trl-baseline")
    cfg = RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=48),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0))
    system = build_system(cfg)
    system.fit(toy_pairs(24, seed=1), None, FitContext(root / "run", progress=False))
    system.save(root / "run" / "model")
    return root / "run"


class Recording:
    """Fake system: reward = len(prompt) + len(response) / 1000; records the domains it was given."""

    name = "recording"

    def __init__(self) -> None:
        self.domains: list[Any] = []
        self.sizes: list[int] = []

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        self.domains.append(domains)
        self.sizes.append(len(prompts))
        return ScoreOutput([len(p) + len(r) / 1000 for p, r in zip(prompts, responses)], [{}] * len(prompts))


def test_conversational_inputs_become_the_plain_prompt_and_response() -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    completion = [{"role": "assistant", "content": "4"}]
    assert prompt_text(prompt) == "What is 2+2?"  # the system message is the policy's, not the user's request
    assert completion_text(completion) == "4"
    multi = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And 2+2?"}]
    assert prompt_text(multi) == "Human: Hi\n\nAssistant: Hello!\n\nHuman: And 2+2?"
    assert hh_messages(prompt_text(multi)) == multi[1:]  # the turns a decoder's chat template renders
    parts = [{"type": "text", "text": "final "}, {"type": "text", "text": "answer"}]
    assert completion_text([{"role": "assistant", "content": "first"}, {"role": "tool", "content": "x"},
                            {"role": "assistant", "content": parts}]) == "final answer"
    assert prompt_text("plain") == "plain" and completion_text("plain") == "plain"
    with pytest.raises(TypeError, match="a completion must be"):
        completion_text(42)
    with pytest.raises(UserError, match="message 1: role 'tool'"):
        prompt_text([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


def test_local_and_http_modes_give_the_offline_rewards(run_dir: Path) -> None:
    pairs = toy_pairs(6, seed=3)
    prompts, completions = [p.prompt for p in pairs], [p.chosen for p in pairs]
    offline = load_system(run_dir).score(prompts, completions).rewards
    local = reward_function(run_dir)
    assert local.__name__ == "moerm_reward"
    # TRL passes extra keyword arguments (dataset columns, completion_ids, trainer_state): they are accepted
    got_local = local(prompts=prompts, completions=completions, completion_ids=[[1]] * 6, trainer_state=None)
    torch.testing.assert_close(torch.tensor(got_local), torch.tensor(offline), atol=1e-6, rtol=0)
    system_first = [[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}]
                    for p in prompts]
    torch.testing.assert_close(torch.tensor(local(system_first, completions)), torch.tensor(offline), atol=1e-6, rtol=0)
    with BackgroundServer(create_app(str(run_dir), ServeConfig(api_key="k"))) as srv:
        remote = reward_function(srv.url, api_key="k", name="rm_http")  # retries while the model loads (503)
        conversational = remote(system_first, [[{"role": "assistant", "content": c}] for c in completions])
        remote.close()
        with pytest.raises(RuntimeError, match="answered 401"):
            reward_function(srv.url, api_key="wrong")(prompts, completions)
    assert remote.__name__ == "rm_http"
    # a conversational [system, user] prompt scores as the plain user prompt, which a system block would change
    torch.testing.assert_close(torch.tensor(conversational), torch.tensor(offline), atol=1e-5, rtol=0)
    with_system = load_system(run_dir).score([f"You are a helpful assistant.\n\n{p}" for p in prompts],
                                              completions).rewards
    assert max(abs(a - b) for a, b in zip(with_system, offline)) > 1e-4


def test_http_mode_chunks_requests_and_passes_the_domain_column() -> None:
    fake = Recording()
    release = threading.Event()

    def loader() -> Recording:
        release.wait(5)
        return fake

    with BackgroundServer(create_app(loader, ServeConfig(max_items_per_request=4, retry_after_s=1))) as srv:
        reward = reward_function(srv.url, max_items_per_request=4)
        threading.Timer(0.2, release.set).start()  # the first call meets a loading server and retries
        prompts = [f"prompt {i}" for i in range(10)]
        completions = ["c" * i for i in range(10)]
        domains = ["math", None] * 5
        rewards = reward(prompts, completions, domain=domains)
    assert rewards == [len(p) + len(c) / 1000 for p, c in zip(prompts, completions)]
    assert sum(fake.sizes) == 10 and max(fake.sizes) <= 4
    seen = [d for call in fake.domains for d in call]
    assert seen == domains
