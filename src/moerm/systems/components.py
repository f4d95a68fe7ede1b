"""One way to train a component of a system (a domain RM, a router, an expert, an aggregator) around the Trainer.

A system declares its component kinds and their defaults (`RewardSystem.component_defaults`, e.g. a router trains
3 epochs at lr 1e-3); the run's `components.<kind>.train` section overrides them, over the run's `train` section.
`fit_component` then wires the Trainer the same way for every component: its checkpoint folder under the run, the
step and held-out evaluation of its kind (pairwise preference or classification), the stop hook, the device, the
time, and what it trained (steps, epochs, examples).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from moerm.config import ConfigError, RunConfig, TrainConfig, from_dict
from moerm.train.classification import classification_eval, classification_step
from moerm.train.pairwise import make_pairwise_step, pairwise_eval
from moerm.train.trainer import Trainer

KINDS = ("pairwise", "classification")
# Flat options of earlier releases and the component setting that replaced each.
MOVED_OPTIONS = {
    "router_lr": "components.router.train.lr", "router_epochs": "components.router.train.epochs",
    "expert_lr": "components.expert.train.lr", "expert_epochs": "components.expert.train.epochs",
    "aggregator_lr": "components.aggregator.train.lr", "aggregator_epochs": "components.aggregator.train.epochs",
    "aggregator_batch_size": "components.aggregator.train.batch_size",
}


@dataclass
class ComponentFit:
    """What training one component did."""

    name: str
    seconds: float
    steps: int
    epochs: float | None  # None when it ran a fixed number of steps (train.max_steps)
    examples: int
    metrics: dict[str, float]  # its final eval_* metrics and train_loss


def check_component_config(config: RunConfig, kinds: Mapping[str, Any], system: str) -> None:
    """At build time: unknown component sections, and flat options that moved to a component section, are errors."""
    for key in MOVED_OPTIONS:
        if key in config.options:
            raise ConfigError(f"options.{key} is now {MOVED_OPTIONS[key]} (e.g. --set {MOVED_OPTIONS[key]}=...)")
    unknown = sorted(set(config.components) - set(kinds))
    if unknown:
        known = ", ".join(sorted(kinds)) or "none"
        raise ConfigError(f"components.{unknown[0]}: system {system!r} has no such component (its components: {known})")
    for kind, section in config.components.items():
        if not isinstance(section, dict) or set(section) - {"train"}:
            raise ConfigError(f"components.{kind}: expected a mapping with a 'train' section, got {section!r}")
        component_train_config(config, kind, kinds[kind])  # validates the section's fields now, not mid-run


def component_train_config(config: RunConfig, kind: str, defaults: Mapping[str, Any]) -> TrainConfig:
    """The run's `train` section, then the system's defaults for this kind, then `components.<kind>.train`."""
    section = (config.components.get(kind) or {}).get("train") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"components.{kind}.train: expected a mapping, got {section!r}")
    return from_dict(TrainConfig, {**asdict(config.train), **defaults, **section}, f"components.{kind}.train")


def fit_component(name: str, module: nn.Module, data: Any, cfg: TrainConfig, ctx: Any, folder: Path,
                  groups: Sequence[tuple[nn.Module, float]], eval_data: Any = None, kind: str = "pairwise") -> ComponentFit:
    """Train `module` on `data` (a dataset with `collate`) as component `name`; checkpoints go to `folder`.

    `kind` picks the step and the held-out metric: `pairwise` (Bradley-Terry, pairwise accuracy) or
    `classification` (cross-entropy on logits, accuracy; routers). Held-out data is evaluated at the end (and every
    `eval_every` steps), sharded over processes.
    """
    from moerm.encoding.trunk import attach_trunk

    attach_trunk(module, (data, eval_data), cfg.eval_batch_size, ctx.progress)  # `top` tuning: cached trunk states

    if kind == "pairwise":
        step = make_pairwise_step(cfg.center_rewards_coefficient, cfg.use_margin)
        evaluate = (lambda m: pairwise_eval(m, eval_data, cfg.eval_batch_size)) if eval_data is not None else None
    elif kind == "classification":
        step = classification_step
        evaluate = (lambda m: classification_eval(m, eval_data, cfg.eval_batch_size)) if eval_data is not None else None
    else:
        raise ValueError(f"component kind must be one of {', '.join(KINDS)}; got {kind!r}")
    trainer = Trainer(module, step, data, data.collate, cfg, folder, groups, eval_fn=evaluate, desc=name,
                      progress=ctx.progress, stop_after_steps=ctx.stop_after_steps)
    result = trainer.train(resume=ctx.resume)
    module.to(trainer.accelerator.device)
    epochs = None if cfg.max_steps else float(cfg.epochs)
    return ComponentFit(name, result.seconds, result.steps, epochs, len(data), result.final_metrics)
