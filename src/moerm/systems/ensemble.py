"""Ensemble of K independently trained reward models: the competitor family DMoERM compares against.

Every member is a `baseline` RM trained on the same pairs with its own seed (its own head initialisation and data
order). Rewards combine as in Coste et al. 2023: `mean`, `wco` (worst case: the minimum), or `uwo` (uncertainty
weighted: mean - uwo_lambda * variance across members). A BT-trained reward has an arbitrary offset and scale per
member, so before taking a minimum or a variance each member's rewards are standardised with the mean and standard
deviation of its own rewards on (a sample of) its training replies, as Coste et al. do; `mean` stays the raw mean.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from moerm.config import RunConfig
from moerm.data.schema import PreferencePair
from moerm.errors import UserError
from moerm.systems.base import FitContext, FitResult, RewardSystem, ScoreOutput, load_system, register
from moerm.systems.baseline import BaselineSystem
from moerm.atomic import atomic_write_text

ENSEMBLE_FILE = "ensemble.json"
COMBINE = ("mean", "wco", "uwo")
NORM_SAMPLE_PAIRS = 256  # training pairs whose replies set each member's reward mean and std


@dataclass
class EnsembleOptions:
    members: int = 3
    combine: str = "mean"  # mean | wco (minimum) | uwo (mean - uwo_lambda * variance)
    uwo_lambda: float = 1.0
    # baseline runs (run or model folders) already trained to combine instead of training members: `fit` loads them
    # and sets only the reward normalisation; `members` must match their number
    member_runs: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.members < 1:
            raise UserError("options.members must be at least 1")
        if self.member_runs and len(self.member_runs) != self.members:
            raise UserError(f"options.member_runs names {len(self.member_runs)} runs but options.members is "
                            f"{self.members}: give one run per member")
        if len(set(self.member_runs)) != len(self.member_runs):
            raise UserError(f"options.member_runs names a run twice: {self.member_runs}")
        if self.combine not in COMBINE:
            raise UserError(f"options.combine must be one of {', '.join(COMBINE)}; got {self.combine!r}")


def combine(rewards: torch.Tensor, how: str, uwo_lambda: float = 1.0, norm: torch.Tensor | None = None) -> torch.Tensor:
    """(K, N) member rewards -> (N,). `norm` (K, 2): each member's (mean, std); `wco`/`uwo` standardise with it."""
    if how == "mean":
        return rewards.mean(0)
    if norm is not None:
        rewards = (rewards - norm[:, :1]) / norm[:, 1:].clamp(min=1e-6)  # (K, N) on a common scale
    if how == "wco":
        return rewards.min(0).values
    if how == "uwo":
        var = rewards.var(0, unbiased=False) if rewards.shape[0] > 1 else torch.zeros(rewards.shape[1])
        return rewards.mean(0) - uwo_lambda * var
    raise ValueError(f"unknown combine {how!r}")


def _train_seconds(run: Path) -> tuple[float, float | None]:
    """A reused member's training time and epochs, from its run's train_summary.json (0 and None without one)."""
    for summary in (run / "train_summary.json", run.parent / "train_summary.json"):
        if summary.is_file():
            info = json.loads(summary.read_text())
            epochs = list((info.get("epochs_per_component") or {}).values())
            return float(info.get("train_seconds", 0.0)), (epochs[0] if len(epochs) == 1 else None)
    return 0.0, None


@register
class EnsembleSystem(RewardSystem):
    """K baseline RMs with different seeds; the reward is their mean (or worst case, or uncertainty-weighted)."""

    name = "ensemble"
    options_class = EnsembleOptions
    component_defaults = {"member": {}}

    def __init__(self, config: RunConfig, members: Sequence[BaselineSystem] = ()):
        super().__init__(config)
        self.opts: EnsembleOptions = self.options
        self.members: list[BaselineSystem] = list(members)
        self.norm: torch.Tensor | None = None  # (K, 2) per member (mean, std) of its rewards on training replies

    def _member_config(self, i: int) -> RunConfig:
        t = self.train_config("member")
        return dataclasses.replace(self.config, system="baseline", options={}, components={},
                                   train=dataclasses.replace(t, seed=t.seed + i))

    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        result = FitResult({})
        self.members = []
        if self.opts.member_runs:
            for i, run in enumerate(self.opts.member_runs):
                self.members.append(self._trained_member(Path(run)))
                result.seconds_per_component[f"member:{i}"], result.epochs_per_component[f"member:{i}"] = (
                    _train_seconds(Path(run)))
            self.norm = self._reward_stats(train)
            return result
        for i in range(self.opts.members):
            rm = BaselineSystem(self._member_config(i))
            result.merge(rm.fit(train, eval, FitContext(ctx.out_dir / "components" / f"member-{i}", ctx.resume,
                                                        ctx.progress, ctx.stop_after_steps)), f"member:{i}")
            self.members.append(rm)
        self.norm = self._reward_stats(train)
        return result

    def _trained_member(self, run: Path) -> BaselineSystem:
        """A member from options.member_runs: a saved baseline with this ensemble's max_length."""
        if not run.exists():
            raise UserError(f"options.member_runs: {run} does not exist")
        member = load_system(run)
        if not isinstance(member, BaselineSystem):
            raise UserError(f"options.member_runs: {run} holds a {member.name!r} system; members are baseline RMs")
        mine, theirs = self.config.model.max_length, member.config.model.max_length
        if mine != theirs:
            raise UserError(f"options.member_runs: {run} has model.max_length={theirs!r}; this ensemble has {mine!r}")
        return member

    def _reward_stats(self, train: Sequence[PreferencePair]) -> torch.Tensor:
        """(K, 2): each member's reward mean and std over the replies of a fixed sample of training pairs."""
        step = max(1, len(train) // NORM_SAMPLE_PAIRS)
        sample = list(train)[::step][:NORM_SAMPLE_PAIRS]
        prompts = [p.prompt for p in sample] * 2
        replies = [p.chosen for p in sample] + [p.rejected for p in sample]
        stats = []
        for m in self.members:
            r = torch.tensor(m.score(prompts, replies).rewards, dtype=torch.float64)  # (2S,)
            stats.append([float(r.mean()), float(r.std(unbiased=False))])
        return torch.tensor(stats)

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32, mode: str | None = None) -> ScoreOutput:
        self.check_mode(mode)
        if not self.members:
            raise RuntimeError("the ensemble has no members yet: fit or load it first")
        per = torch.tensor([m.score(prompts, responses, batch_size=batch_size).rewards for m in self.members])  # (K, N)
        rewards = combine(per, self.opts.combine, self.opts.uwo_lambda, self.norm)
        details = [{"system": self.name, "combine": self.opts.combine, "member_rewards": per[:, i].tolist(),
                    "member_std": float(per[:, i].std(unbiased=False))} for i in range(per.shape[1])]
        return ScoreOutput(rewards.tolist(), details)

    def components(self) -> dict[str, nn.Module]:
        return {f"member:{i}": m.model for i, m in enumerate(self.members)}

    def component_files(self) -> dict[str, list[str]]:
        return {f"member:{i}": [f"members/{i}"] for i in range(len(self.members))}

    def save_components(self, path: Path) -> None:
        for i, m in enumerate(self.members):
            m.save(path / "members" / str(i))
        norm = self.norm.tolist() if self.norm is not None else None
        atomic_write_text(path / ENSEMBLE_FILE, json.dumps({"members": len(self.members), "reward_norm": norm}, indent=2))

    @classmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "EnsembleSystem":
        index = json.loads((path / ENSEMBLE_FILE).read_text())
        system = cls(config, [load_system(path / "members" / str(i), device) for i in range(index["members"])])  # type: ignore[misc]
        if index.get("reward_norm") is not None:
            system.norm = torch.tensor(index["reward_norm"])
        return system

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        info = super().describe(path)
        info["members"] = len(self.members)
        info["combine"] = self.opts.combine
        return info
