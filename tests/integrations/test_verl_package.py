"""moerm's verl reward functions driven by verl's own code (verl 0.9.1): `get_custom_reward_fn` loads them from
`reward.custom_reward_function.path/name`, the registered `naive` reward manager calls them per sample, and the
reward loop worker's `compute_score_batch` runs every sample of a batch concurrently, as in training. Rewards equal
offline `score` within 1e-5, and concurrent samples reach the server as one request.

verl pins an older transformers than this project, so it is not a test dependency: this file runs where `verl`
imports (e.g. verl installed with `--no-deps` beside tensordict, omegaconf, hydra-core, codetiming, dill,
pylatexenc, torchdata and pyvers on PYTHONPATH) and is skipped elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("omegaconf")

from conftest import toy_pairs  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from routedutil import tiny_rodos  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker  # noqa: E402
from verl.trainer.ppo.reward import load_reward_manager  # noqa: E402

from moerm.config import ModelConfig, RunConfig  # noqa: E402
from moerm.integrations import verl as moerm_verl  # noqa: E402
from moerm.serve import BackgroundServer, ServeConfig, create_app  # noqa: E402
from moerm.systems import build_system, load_system  # noqa: E402
from moerm.systems.base import ScoreOutput  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verl-pkg")
    torch.manual_seed(0)
    build_system(RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=48))).save(
        root / "run" / "model")
    return root / "run"


def verl_config(name: str, **reward_kwargs: Any) -> Any:
    """The parts of verl's trainer config its reward loop reads, as `reward.*` (verl 0.9.1's layout)."""
    return OmegaConf.create({"reward": {
        "custom_reward_function": {"path": moerm_verl.__file__, "name": name, "reward_kwargs": reward_kwargs},
        "reward_manager": {"name": "naive", "source": "register"}, "reward_model": {"enable": False},
        "num_workers": 1}})


def rollout_batch(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                  extra: Sequence[dict[str, Any]] | None = None) -> DataProto:
    """A rollout as verl's agent loop hands it to the reward loop: left-padded prompts, right-padded responses,
    one attention mask over both; data_source, reward_model and extra_info in non_tensor_batch."""
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    P, R, pad = max(map(len, p_ids)), max(map(len, r_ids)), tokenizer.pad_token_id
    prompt_t = torch.tensor([[pad] * (P - len(x)) + x for x in p_ids])
    resp_t = torch.tensor([x + [pad] * (R - len(x)) for x in r_ids])
    mask = torch.tensor([[0] * (P - len(a)) + [1] * len(a) + [1] * len(b) + [0] * (R - len(b))
                         for a, b in zip(p_ids, r_ids)])
    n = len(prompts)
    infos = np.empty(n, dtype=object)
    for i, p in enumerate(prompts):
        infos[i] = {"split": "train", "index": i, "question": p, **(extra[i] if extra else {})}
    rm = np.empty(n, dtype=object)
    for i in range(n):
        rm[i] = {"ground_truth": "42", "style": "model"}
    return DataProto.from_dict(
        tensors={"prompts": prompt_t, "responses": resp_t, "input_ids": torch.cat([prompt_t, resp_t], 1),
                 "attention_mask": mask},
        non_tensors={"data_source": np.array(["openai/gsm8k"] * n, dtype=object), "reward_model": rm,
                     "extra_info": infos})


def reward_loop(config: Any, tokenizer: Any, data: DataProto) -> list[dict]:
    """verl's RewardLoopWorker.compute_score_batch (one task per sample, gathered) on its own event loop."""
    worker = RewardLoopWorker.__new__(RewardLoopWorker)  # its __init__ only loads tokenizers from the config
    worker.config, worker.reward_router_address = config, None
    worker.reward_manager = load_reward_manager(config, tokenizer)
    worker.loop = worker.reward_manager.loop
    return worker.loop.run_until_complete(worker.compute_score_batch(data))


class Counting:
    """Fake system: reward = len(prompt) + len(response) / 1000; counts its score calls."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        self.calls.append(len(prompts))
        return ScoreOutput([len(p) + len(r) / 1000 for p, r in zip(prompts, responses)], [{}] * len(prompts))


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_verl_reward_loop_scores_through_moerm_locally(name: str, run_dir: Path, tiny_bert: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOERM_URL", raising=False)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    pairs = toy_pairs(6, seed=4)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    out = reward_loop(verl_config(name, moerm_run=str(run_dir)), tok, rollout_batch(tok, prompts, responses))
    decoded = [tok.decode(tok(r, add_special_tokens=False)["input_ids"], skip_special_tokens=True) for r in responses]
    offline = torch.tensor(load_system(run_dir).score(prompts, decoded).rewards)
    torch.testing.assert_close(torch.tensor([o["reward_score"] for o in out]), offline, atol=1e-5, rtol=0)
    assert all(o["reward_extra_info"]["score"] == o["reward_score"] for o in out)


def test_verl_reward_loop_sends_one_request_per_batch(tiny_bert: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOERM_RUN", raising=False)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    pairs = toy_pairs(8, seed=6)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    fake = Counting()
    with BackgroundServer(create_app(fake, ServeConfig(max_wait_ms=0))) as srv:
        srv.wait_ready()
        out = reward_loop(verl_config("compute_score_async", moerm_url=srv.url, moerm_max_wait_ms="200"), tok,
                          rollout_batch(tok, prompts, responses))
    decoded = [tok.decode(tok(r, add_special_tokens=False)["input_ids"], skip_special_tokens=True) for r in responses]
    assert [o["reward_score"] for o in out] == [len(p) + len(r) / 1000 for p, r in zip(prompts, decoded)]
    assert fake.calls == [8]  # eight concurrent samples, one request, one score call


def test_routed_system_logs_its_route_through_verl(tiny_bert: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A RODOS run: the domain given in extra_info reaches the system, and the route is in reward_extra_info."""
    run = tiny_rodos(tiny_bert, tmp_path)
    monkeypatch.delenv("MOERM_URL", raising=False)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    pairs = toy_pairs(4, seed=2)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    domains = ["alpha", "beta", "alpha", "beta"]
    out = reward_loop(verl_config("compute_score", moerm_run=str(run)), tok,
                      rollout_batch(tok, prompts, responses, [{"domain": d} for d in domains]))
    decoded = [tok.decode(tok(r, add_special_tokens=False)["input_ids"], skip_special_tokens=True) for r in responses]
    offline = torch.tensor(load_system(run).score(prompts, decoded, domains).rewards)
    torch.testing.assert_close(torch.tensor([o["reward_score"] for o in out]), offline, atol=1e-5, rtol=0)
    infos = [o["reward_extra_info"] for o in out]
    assert [i["moerm/domain"] for i in infos] == domains
    assert [i[f"moerm/route/{d}"] for i, d in zip(infos, domains)] == [1.0] * 4
    assert all(i["moerm/fallback"] == 0.0 for i in infos)
