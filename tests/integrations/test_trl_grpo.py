"""TRL's own GRPOTrainer (trl 1.16, where installed) scoring through moerm: its `_calculate_rewards` calls the
reward function with the dataset's columns and its `log_metric` / `log_extra` hooks, over HTTP; the rewards are
the server's, and the route fields land in the trainer's pending metrics and completions table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from moerm.integrations.trl import reward_function
from moerm.serve import BackgroundServer, ServeConfig, create_app
from test_client import Fake

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """GRPOTrainer sets accelerate's process-wide state (its mixed precision): reset it for the tests after."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_grpo_trainer_logs_moerm_routes(tiny_llama: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config("llama", vocab_size=len(tok))).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    rows = [{"prompt": "what is two and two", "domain": "math"}, {"prompt": "tell me a joke", "domain": "code"}]
    with BackgroundServer(create_app(Fake(), ServeConfig())) as srv:
        srv.wait_ready()
        reward = reward_function(srv.url)
        args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
                              max_completion_length=4, report_to=[], use_cpu=True, logging_steps=1,
                              bf16=False)
        trainer = trl.GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=reward, args=args,
                                  train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
        completions = ["four", "a b c"]
        rewards = trainer._calculate_rewards(rows, [r["prompt"] for r in rows], completions, [[1], [2]])
    assert rewards[:, 0].tolist() == pytest.approx([len(rows[0]["prompt"]) + 0.004,
                                                    len(rows[1]["prompt"]) + 0.005])
    metrics = {k: v for k, v in trainer._pending_metrics.items() if k.startswith("moerm/")}
    assert metrics["moerm/route/math"] == [0.5] and metrics["moerm/route/code"] == [0.5]
    assert metrics["moerm/fallback"] == [0.0] and metrics["moerm/cap/logic"] == [1.0]
    assert trainer._pending_extra_logs["moerm/domain"] == ["math", "code"]
