"""A tiny RODOS run (domains alpha and beta, hard routing) for the trainer-integration tests' logged routes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from conftest import toy_pairs

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.systems import build_system
from moerm.systems.base import FitContext

PREFIX = {"alpha": "alpha topic:", "beta": "beta topic:"}


def tiny_rodos(backbone: str, root: Path) -> Path:
    """Fitted briefly on a few pairs per domain: its rewards matter only as `score` gives them, not their quality."""
    torch.manual_seed(0)
    train = [dataclasses.replace(p, prompt=f"{PREFIX[d]} {p.prompt}")
             for d, seed in (("alpha", 1), ("beta", 2)) for p in toy_pairs(8, seed, d)]
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=backbone, max_length=32, feature_cache=str(root / "c")),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0, seed=0),
                    options={"routing": "hard", "min_confidence": 0.0},
                    components={"router": {"train": {"epochs": 2, "lr": 2e-2}}})
    system = build_system(cfg)
    system.fit(train, None, FitContext(root / "rodos", progress=False))
    system.save(root / "rodos" / "model")
    return root / "rodos"
