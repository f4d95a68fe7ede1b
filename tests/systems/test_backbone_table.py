"""Systems without their own table-parametrized tests, on every backbone of the table (conftest.BACKBONES).

ARLISS, DMoERM, RODOS and MoRE are parametrized over the table in their own test files.
"""

import pytest
import torch

from conftest import BACKBONES, DEFAULT_LORA_TARGETS, lora_sites, toy_pairs
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext


def _scores(system, pairs):
    return system.score([p.prompt for p in pairs], [p.chosen for p in pairs], batch_size=8).rewards


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ensemble_trains_scores_and_reloads(backbone, request, tmp_path):
    cfg = RunConfig(system="ensemble", model=ModelConfig(backbone=request.getfixturevalue(backbone), max_length=48),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0), options={"members": 2})
    system = build_system(cfg)
    system.fit(toy_pairs(32, 1), None, FitContext(tmp_path / "run", progress=False))
    test = toy_pairs(12, 2)
    out = system.score([p.prompt for p in test], [p.chosen for p in test])
    member = torch.tensor([d["member_rewards"] for d in out.details])  # (N, K)
    assert member.shape == (12, 2) and (member[:, 0] - member[:, 1]).abs().max() > 1e-4
    torch.testing.assert_close(torch.tensor(out.rewards), member.mean(1))
    system.save(tmp_path / "model")
    again = load_system(tmp_path / "model")
    torch.testing.assert_close(torch.tensor(_scores(again, test)), torch.tensor(out.rewards), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_baselora_uses_pefts_default_targets_and_reloads_exactly(backbone, request, tmp_path):
    cfg = RunConfig(system="baselora", model=ModelConfig(backbone=request.getfixturevalue(backbone), max_length=48),
                    train=TrainConfig(lr=5e-3, batch_size=8, epochs=1, save_every=0))
    system = build_system(cfg)
    peft = system.backbone.model
    assert lora_sites(peft) == {(i, name) for i in range(2) for name in DEFAULT_LORA_TARGETS[peft.config.model_type]}
    system.fit(toy_pairs(32, 1), None, FitContext(tmp_path / "run", progress=False))
    test = toy_pairs(10, 2)
    batched = _scores(system, test)
    single = [system.score([p.prompt], [p.chosen], batch_size=1).rewards[0] for p in test]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=1e-5)
    system.save(tmp_path / "model")
    torch.testing.assert_close(torch.tensor(_scores(load_system(tmp_path / "model"), test)), torch.tensor(batched),
                               atol=1e-6, rtol=0)


def test_tiny_llama_is_a_chat_decoder_with_its_own_specials(tiny_llama):
    from moerm.encoding import load_config, load_tokenizer

    tok, cfg = load_tokenizer(tiny_llama), load_config(tiny_llama)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (cfg.bos_token_id, cfg.eos_token_id,
                                                                    cfg.pad_token_id) == (1, 2, 3)
    assert tok("good answer")["input_ids"][0] == tok.bos_token_id  # Llama-style: BOS is added
    text = tok.apply_chat_template([{"role": "user", "content": "why"}, {"role": "assistant", "content": "yes"}],
                                   tokenize=False)
    assert text == "<|im_start|>user\nwhy<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]
