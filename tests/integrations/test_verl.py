"""The verl reward function: verl's two call signatures and batch shapes (numpy object arrays from non_tensor_batch),
loaded by file path as verl loads it, local and HTTP modes giving `system.score`'s rewards; clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch

from conftest import toy_pairs
from moerm.config import ModelConfig, RunConfig
from moerm.errors import UserError
from moerm.integrations import verl
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.systems import build_system, load_system
from moerm.systems.base import ScoreOutput


@pytest.fixture(scope="module")
def run_dir(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT baseline, random but seeded (its arithmetic matters here, not its quality), saved."""
    root = tmp_path_factory.mktemp("verl-baseline")
    torch.manual_seed(0)
    build_system(RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=48))).save(
        root / "run" / "model")
    return root / "run"


def load_by_path() -> Any:
    """The module as verl's `load_extern_object(module_path, object_name)` gets it: imported from its file."""
    spec = importlib.util.spec_from_file_location("custom_module", verl.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verl_batch(n: int, seed: int) -> tuple[list[str], list[str], dict[str, Any]]:
    """Prompts, responses and the keyword arguments BatchRewardManager.verify passes (numpy arrays as in
    DataProto.non_tensor_batch; extra_info as verl's example preprocessors write it)."""
    pairs = toy_pairs(n, seed=seed)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    extras = np.empty(n, dtype=object)
    for i, p in enumerate(prompts):
        extras[i] = {"split": "train", "index": i, "question": p, "rollout_reward_scores": {}}
    kwargs = {"data_sources": np.array(["openai/gsm8k"] * n, dtype=object), "solution_strs": responses,
              "ground_truths": ["42"] * n, "extra_infos": extras}
    return prompts, responses, kwargs


def scores(results: Sequence[Any]) -> list[float]:
    """The rewards of verl results ({"score": r, ...})."""
    return [r["score"] for r in results]


class Recording:
    """Fake system: reward = len(prompt) + len(response) / 1000; records the prompts and domains it was given."""

    name = "recording"

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.domains: list[Any] = []

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        self.prompts += prompts
        self.domains += list(domains or [None] * len(prompts))
        return ScoreOutput([len(p) + len(r) / 1000 for p, r in zip(prompts, responses)], [{}] * len(prompts))


def test_both_verl_signatures_give_system_scores_locally(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOERM_RUN", str(run_dir))
    monkeypatch.delenv("MOERM_URL", raising=False)
    prompts, responses, batch = verl_batch(6, seed=3)
    offline = torch.tensor(load_system(run_dir).score(prompts, responses).rewards)
    module = load_by_path()
    batched = module.compute_score(**batch, extra_kwarg_from_reward_kwargs=1)  # BatchRewardManager
    assert isinstance(batched, list) and all(set(r) == {"score"} for r in batched)  # a baseline logs no route
    torch.testing.assert_close(torch.tensor(scores(batched)), offline, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(scores(module.compute_score_batch(**batch))), offline, atol=1e-5, rtol=0)
    bare = module.compute_score(**batch, fields=False)
    assert all(isinstance(r, float) for r in bare) and bare == scores(batched)
    infos = batch["extra_infos"]
    singles = [module.compute_score(data_source="openai/gsm8k", solution_str=responses[i], ground_truth="42",
                                    extra_info=infos[i]) for i in range(6)]  # NaiveRewardManager's call
    torch.testing.assert_close(torch.tensor(scores(singles)), offline, atol=1e-5, rtol=0)
    positional = module.compute_score("openai/gsm8k", responses[0], "42", {"prompt": prompts[0]}, fields=False)
    assert positional == pytest.approx(float(offline[0]), abs=1e-5)
    # a chat-messages prompt (verl's raw_prompt shape, a numpy array of dicts) reads as its user turn
    messages = np.array([{"role": "system", "content": "Think step by step."},
                         {"role": "user", "content": prompts[1]}], dtype=object)
    chat = module.compute_score("openai/gsm8k", responses[1], None, {"prompt": messages}, fields=False)
    assert chat == pytest.approx(float(offline[1]), abs=1e-5)


def test_http_mode_passes_prompts_and_domains(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Recording()
    prompts, responses, batch = verl_batch(4, seed=5)
    batch["extra_infos"][1]["domain"] = "math"
    with BackgroundServer(create_app(fake, ServeConfig())) as srv:
        srv.wait_ready()
        monkeypatch.setenv("MOERM_URL", srv.url)
        monkeypatch.delenv("MOERM_RUN", raising=False)
        default = verl.compute_score(**batch)
        from_source = verl.compute_score(**batch, moerm_domain="data_source")  # as custom_reward_function.reward_kwargs
        monkeypatch.setenv("MOERM_DOMAIN", "router")
        routed = verl.compute_score(**batch)
    assert scores(default) == scores(from_source) == scores(routed) == [len(p) + len(r) / 1000 for p, r in zip(prompts, responses)]
    assert fake.prompts == prompts * 3
    assert fake.domains == ([None, "math", None, None] + ["openai/gsm8k", "math", "openai/gsm8k", "openai/gsm8k"]
                            + [None] * 4)


def test_clear_errors(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, responses, batch = verl_batch(2, seed=1)
    monkeypatch.delenv("MOERM_URL", raising=False)
    monkeypatch.delenv("MOERM_RUN", raising=False)
    with pytest.raises(UserError, match="exactly one of MOERM_URL .* or MOERM_RUN .*; got neither"):
        verl.compute_score(**batch)
    monkeypatch.setenv("MOERM_RUN", str(run_dir))
    with pytest.raises(UserError, match="exactly one .*; got both"):
        verl.compute_score(**batch, moerm_url="http://127.0.0.1:1")
    with pytest.raises(UserError, match="verl item 0: no prompt in extra_info \\(looked for prompt or question; "
                                        "it has \\['index', 'split'\\]\\)"):
        verl.compute_score("openai/gsm8k", responses[0], "42", {"index": 0, "split": "train"})
    with pytest.raises(UserError, match="verl item 0: no prompt in extra_info .*NoneType"):
        verl.compute_score("openai/gsm8k", responses[0], "42")
    with pytest.raises(UserError, match="MOERM_DOMAIN must be one of extra_info, data_source, router"):
        verl.compute_score(**batch, moerm_domain="label")
