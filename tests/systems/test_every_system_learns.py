"""Every system, trained with its default recipe, learns an easy task: at least 90% held-out pairwise accuracy.

The recipe is the system's own: no learning rate, epoch count or budget is set here, only what a system needs to
train at all (DMoERM's tasks) and the data. The backbone is the embedded MiniLM (pretrained: a randomly initialised
tiny model says nothing about whether the default learning rates move a real backbone), on short toy texts
(model.max_length 32), 2 domains of 96 training pairs (with 64 per domain ARLISS stops short of 90%: 0.86). The
defaults come from the sweep in docs/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import moerm.systems  # noqa: F401 - registers the built-in systems
from moerm.config import ModelConfig, RunConfig
from moerm.systems.base import REGISTRY, FitContext, build_system

from conftest import toy_pairs

NEEDS = {  # only what a system cannot train without; never a learning rate, epochs or steps
    "dmoerm": {"tasks": {"task_a": {"domains": ["alpha"], "capabilities": ["quality"]},
                         "task_b": {"domains": ["beta"], "capabilities": ["quality"]}}},
}
PREFIX = {"alpha": "tell me about the topic", "beta": "what is this and that"}
ACCURACY = 0.90


def _pairs(domain: str, n: int, seed: int):
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}", aspects_chosen={"quality": 5.0},
                                aspects_rejected={"quality": 1.0}) for p in toy_pairs(n, seed, domain)]


TRAIN = _pairs("alpha", 96, 11) + _pairs("beta", 96, 12)
TEST = _pairs("alpha", 40, 13) + _pairs("beta", 40, 14)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_default_recipe_learns_the_easy_task(name: str, tmp_path: Path) -> None:
    cfg = RunConfig(system=name, model=ModelConfig(max_length=32, feature_cache=str(tmp_path / "features"),
                                                   trunk_cache=str(tmp_path / "trunk")),
                    options=dict(NEEDS.get(name, {})))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_every=0))
    torch.manual_seed(0)
    system = build_system(cfg)
    system.fit(TRAIN, None, FitContext(tmp_path / "run", progress=False))
    prompts = [p.prompt for p in TEST] * 2
    replies = [p.chosen for p in TEST] + [p.rejected for p in TEST]
    r = torch.tensor(system.score(prompts, replies, batch_size=64).rewards)
    accuracy = float((r[: len(TEST)] > r[len(TEST):]).float().mean())
    assert accuracy >= ACCURACY, f"{name} with its default recipe: held-out accuracy {accuracy:.3f} < {ACCURACY}"
