"""The tuning layer's default recipes: a run that sets no learning rate gets its tuning mode's, and records it."""

from __future__ import annotations

import pytest

import moerm.systems  # noqa: F401 - registers the built-in systems
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.encoding.tuning import DEFAULT_HEAD_LR, DEFAULT_LR, default_lrs
from moerm.systems.base import build_system


@pytest.mark.parametrize("system,tuning,key", [("baseline", "full", "full"), ("baselora", "lora", "lora"),
                                               ("baseline", "top", "top:full"), ("baselora", "top", "top:lora"),
                                               ("baseline", "frozen", "frozen"), ("arliss", "top", "top:lora")])
def test_unset_lr_takes_the_tuning_modes_default(tiny_bert: str, system: str, tuning: str, key: str) -> None:
    cfg = RunConfig(system=system, model=ModelConfig(backbone=tiny_bert, tuning=tuning, trainable_layers=1, max_length=64))
    built = build_system(cfg)
    assert built.config.train.lr == DEFAULT_LR[key]
    assert built.config.train.head_lr == DEFAULT_HEAD_LR[key]
    assert default_lrs(tuning, type(built).top_style) == (DEFAULT_LR[key], DEFAULT_HEAD_LR[key])


def test_a_set_lr_wins_and_an_unset_head_lr_follows_it(tiny_bert: str) -> None:
    cfg = RunConfig(system="baselora", model=ModelConfig(backbone=tiny_bert, max_length=64), train=TrainConfig(lr=1e-5))
    built = build_system(cfg)
    assert built.config.train.lr == 1e-5 and built.config.train.head_lr is None  # None: heads train at lr
    cfg = RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=64), train=TrainConfig(head_lr=2e-3))
    built = build_system(cfg)
    assert built.config.train.lr == DEFAULT_LR["full"] and built.config.train.head_lr == 2e-3


def test_lora_defaults_are_higher_than_full_fine_tuning() -> None:
    """LoRA trains a low-rank update from zero: at full fine-tuning's rate it barely moves in a short run."""
    assert DEFAULT_LR["lora"] >= 5 * DEFAULT_LR["full"] and DEFAULT_LR["top:lora"] >= DEFAULT_LR["lora"]
