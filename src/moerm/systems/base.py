"""The interface every reward system implements, and the registry the CLI and trainer use.

A system is anything that can `fit` on preference pairs, `score` (prompt, response) pairs with explanations,
`save` itself to a folder (safetensors + JSON only) and `load` back, and `describe` its components.
MoRE, RODOS, ARLISS and DMoERM plug in by subclassing `RewardSystem` and calling `register`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from accelerate.utils import set_seed
from torch import nn

from moerm.config import RunConfig, from_dict
from moerm.data.schema import PreferencePair
from moerm.train.checkpoint import atomic_write_text

SYSTEM_FILE = "system.json"
FORMAT_VERSION = 1


@dataclass
class FitContext:
    """Where and how a system trains: its run folder, resume, progress bars, and a test hook."""

    out_dir: Path
    resume: bool = False
    progress: bool = True
    stop_after_steps: int | None = None


@dataclass
class FitResult:
    metrics: dict[str, float]
    seconds_per_component: dict[str, float] = field(default_factory=dict)


@dataclass
class ScoreOutput:
    """One reward per input, and for each a dict that explains it (routing, experts, sub-scores)."""

    rewards: list[float]
    details: list[dict[str, Any]]


def count_params(module: nn.Module) -> dict[str, int]:
    seen: set[int] = set()
    total = trainable = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"params_total": total, "params_trainable": trainable}


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class RewardSystem(ABC):
    """Base class of all reward systems."""

    name: ClassVar[str]
    options_class: ClassVar[type | None] = None

    def __init__(self, config: RunConfig):
        # Seeded before a subclass builds anything random (heads, routers, adapters), so the same config gives the
        # same initial weights in every process and every run (this torch build seeds randomly at import).
        set_seed(config.train.seed)
        self.config = config
        self.options = from_dict(self.options_class, config.options, "options") if self.options_class else None

    @abstractmethod
    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        """Train every component; checkpoints and metrics go under ctx.out_dir."""

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        """Rewards for (prompt, response) pairs, in input order."""

    @abstractmethod
    def save_components(self, path: Path) -> None:
        """Write this system's weights (safetensors) into `path`."""

    @classmethod
    @abstractmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "RewardSystem":
        """Rebuild the system saved in `path`."""

    @abstractmethod
    def components(self) -> dict[str, nn.Module]:
        """Named parts, for parameter counts (e.g. backbone, head, router, one per domain)."""

    def add_domain(self, pairs: Sequence[PreferencePair], ctx: FitContext, model_dir: Path) -> FitResult:
        """Train what a new domain needs (its RM, the router) and write only the changed files to `model_dir`."""
        raise NotImplementedError(f"system {self.name!r} cannot add a domain; routed systems (rodos, arliss) can")

    def component_files(self) -> dict[str, list[str]]:
        """Files (relative to the saved folder) that belong to each component, for size on disk."""
        return {}

    # -- shared behaviour
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save_components(path)
        meta = {"system": self.name, "format": FORMAT_VERSION, "config": self.config.to_dict()}
        atomic_write_text(path / SYSTEM_FILE, json.dumps(meta, indent=2))  # last: marks the save complete
        return path

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        """Parameters total/trainable per component and, given a saved folder, bytes on disk per component."""
        comps: dict[str, dict[str, int]] = {}
        for name, module in self.components().items():
            comps[name] = count_params(module)
        if path is not None:
            for name, files in self.component_files().items():
                comps.setdefault(name, {"params_total": 0, "params_trainable": 0})
                comps[name]["bytes_on_disk"] = sum(folder_bytes(Path(path) / f) for f in files)
        all_params = {id(p): p for m in self.components().values() for p in m.parameters()}
        totals = {
            "params_total": sum(p.numel() for p in all_params.values()),
            "params_trainable": sum(p.numel() for p in all_params.values() if p.requires_grad),
        }
        if path is not None:
            totals["bytes_on_disk"] = folder_bytes(Path(path))
        return {"system": self.name, "backbone": self.config.model.backbone, "tuning": self.config.model.tuning,
                "components": comps, "total": totals}


REGISTRY: dict[str, type[RewardSystem]] = {}


def register(cls: type[RewardSystem]) -> type[RewardSystem]:
    REGISTRY[cls.name] = cls
    return cls


def get_system_class(name: str) -> type[RewardSystem]:
    import moerm.systems  # noqa: F401 - importing the package registers the built-in systems

    if name not in REGISTRY:
        raise ValueError(f"unknown system {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_system(config: RunConfig) -> RewardSystem:
    return get_system_class(config.system)(config)


def find_model_dir(run_or_model_dir: str | Path) -> Path:
    """Accept a run folder (with model/ inside) or a saved model folder."""
    p = Path(run_or_model_dir)
    for cand in (p, p / "model"):
        if (cand / SYSTEM_FILE).exists():
            return cand
    raise FileNotFoundError(f"no saved reward system in {p} (expected {SYSTEM_FILE} in it or in {p / 'model'})")


def load_system(run_or_model_dir: str | Path, device: str | torch.device | None = None) -> RewardSystem:
    """Load any saved system; the folder's system.json says which class to use."""
    path = find_model_dir(run_or_model_dir)
    meta = json.loads((path / SYSTEM_FILE).read_text())
    config = from_dict(RunConfig, meta["config"])
    return get_system_class(meta["system"]).load_components(path, config, device)
