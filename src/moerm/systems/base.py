"""The interface every reward system implements, and the registry the CLI and trainer use.

A system is anything that can `fit` on preference pairs, `score` (prompt, response) pairs with explanations,
`save` itself to a folder (safetensors + JSON only) and `load` back, and `describe` its components.
MoRE, RODOS, ARLISS and DMoERM plug in by subclassing `RewardSystem` and calling `register`.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from accelerate.utils import set_seed
from torch import nn

from moerm.config import ConfigError, RunConfig, TrainConfig, from_dict
from moerm.data.schema import PreferencePair
from moerm.encoding.cache import backbone_id
from moerm.encoding.tuning import TuningMode, resolve_tuning, tuning_mode
from moerm.errors import UnsupportedError, UserError
from moerm.systems.arguments import check_device, checked_score
from moerm.systems.components import ComponentFit, check_component_config, component_train_config
from moerm.atomic import atomic_write_text

SYSTEM_FILE = "system.json"
FORMAT_VERSION = 1  # of the saved folder; `load_system` refuses a newer one and loads every older one


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
    epochs_per_component: dict[str, float | None] = field(default_factory=dict)

    def add(self, fit: ComponentFit, metrics_prefix: str | None = None) -> None:
        """Record one trained component: its time and epochs, and its eval metrics under `metrics_prefix:`."""
        self.seconds_per_component[fit.name] = fit.seconds
        self.epochs_per_component[fit.name] = fit.epochs
        if metrics_prefix is not None:
            self.metrics.update({f"{metrics_prefix}:{k}": v for k, v in fit.metrics.items() if k.startswith("eval_")})

    def merge(self, other: "FitResult", metrics_prefix: str | None = None) -> None:
        """Fold in a sub-system's result (e.g. one domain RM of RODOS), its components named `<prefix>:<name>`."""
        for name, sec in other.seconds_per_component.items():
            key = metrics_prefix if metrics_prefix and len(other.seconds_per_component) == 1 else (
                f"{metrics_prefix}:{name}" if metrics_prefix else name)
            self.seconds_per_component[key] = sec
            self.epochs_per_component[key] = other.epochs_per_component.get(name)
        prefix = f"{metrics_prefix}:" if metrics_prefix else ""
        self.metrics.update({f"{prefix}{k}": v for k, v in other.metrics.items() if k.startswith("eval_")})


@dataclass
class BenchPlan:
    """How `moerm bench` runs a system on other data than the shared sample (see `RewardSystem.bench_plan`).

    The bench writes `train`/`test` into OUT/data/<system>/, merges `options` over the system's own options in every
    cell, and reports `domains` (those of `train`), `left_out` (domain -> why) and `report` beside every system's
    accuracy on those domains. `skipped`: a reason not to run the system at all (e.g. no labels it needs).
    """

    train: list[PreferencePair] | None = None  # None: the shared training pairs
    test: list[PreferencePair] | None = None  # None: the shared held-out pairs
    options: dict[str, Any] = field(default_factory=dict)  # over per_system.<name>.options (JSON-able)
    left_out: dict[str, str] = field(default_factory=dict)  # domain of the data -> why the system does not cover it
    report: list[str] = field(default_factory=list)  # markdown lines for the report (what it kept, what it dropped)
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able details for results.json
    skipped: str | None = None


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
    tunings: ClassVar[tuple[str, ...]] = ("full", "lora", "frozen", "top")  # the model.tuning modes it honours
    default_tuning: ClassVar[str] = "full"  # what model.tuning=auto means for it
    top_style: ClassVar[str] = "full"  # model.tuning=top: the top blocks train fully (full) or carry LoRA (lora)
    # tuning mode -> the head's rate in the default recipe (the run sets no train.lr and no train.head_lr), where the
    # system's head needs another rate than the tuning mode's (encoding.tuning.DEFAULT_HEAD_LR)
    default_head_lr: ClassVar[dict[str, float]] = {}
    inference_modes: ClassVar[tuple[str, ...]] = ("default",)  # `score(mode=...)`; the first is the default
    routed: ClassVar[bool] = False  # whether `score` details carry Route.details() (router choice, fallback)
    # The components it trains, each with its train settings over the run's `train` (components.<kind>.train)
    component_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "score" in cls.__dict__:  # every system's public `score` checks its arguments first (systems/arguments.py)
            cls.score = checked_score(cls.__dict__["score"])  # type: ignore[method-assign]

    def __init__(self, config: RunConfig):
        # Seeded before a subclass builds anything random (heads, routers, adapters), so the same config gives the
        # same initial weights in every process and every run (this torch build seeds randomly at import).
        set_seed(config.train.seed)
        self.config = type(self).resolve_config(config)
        self.options = self.parse_options(self.config)

    # -- configuration: what a run config means for this system, resolved in one place
    @classmethod
    def resolve_config(cls, config: RunConfig) -> RunConfig:
        """The run config this system trains with: `model.tuning: auto` made its default, unset learning rates its
        tuning mode's (and this system's head rate), options and component sections checked, and `resolve_options`
        applied. Idempotent; `config.yaml`, resume and `moerm info` all hold its result, so they say what trained."""
        tuning = resolve_tuning(config.model.tuning, cls.tunings, cls.default_tuning, cls.name)
        if tuning != config.model.tuning:  # the saved config says what really trained, never `auto`
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, tuning=tuning))
        if config.train.lr is None:  # the tuning mode's default recipe (the saved config records the value)
            mode = tuning_mode(tuning, cls.top_style)
            lr, head_lr = mode.lr, cls.default_head_lr.get(tuning, mode.head_lr)
            head_lr = config.train.head_lr if config.train.head_lr is not None else head_lr
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr, head_lr=head_lr))
        check_component_config(config, cls.component_defaults, cls.name)
        cls.parse_options(config)  # every option checked before anything is built or written
        return cls.resolve_options(config)

    @classmethod
    def parse_options(cls, config: RunConfig) -> Any:
        """`config.options` as this system's typed options (None for a system without options)."""
        if cls.options_class is None:
            if config.options:
                raise ConfigError(f"system {cls.name!r} takes no options; got options.{sorted(config.options)[0]}")
            return None
        raw = config.options
        if hasattr(cls.options_class, "without_legacy"):
            raw = cls.options_class.without_legacy(raw, cls.name)  # keys of options it never honoured, old runs
        return from_dict(cls.options_class, raw, "options")

    @classmethod
    def resolve_options(cls, config: RunConfig) -> RunConfig:
        """A system's own resolution of its options (DMoERM writes its tasks file inline); none by default."""
        return config

    @property
    def tuning(self) -> TuningMode:
        """The tuning mode this system trains with (`model.tuning`, `top` in this system's `top_style`)."""
        return tuning_mode(self.config.model.tuning, self.top_style)

    def train_config(self, kind: str) -> TrainConfig:
        """The train settings of component `kind`: `train`, this system's defaults for it, `components.<kind>.train`."""
        return component_train_config(self.config, kind, self.component_defaults.get(kind, {}))

    @abstractmethod
    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        """Train every component; checkpoints and metrics go under ctx.out_dir."""

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32, mode: str | None = None) -> ScoreOutput:
        """Rewards for (prompt, response) pairs, in input order.

        `domains`: the caller's domain per input, where known (routed systems use it as the route; others ignore
        it). `mode`: one of `inference_modes` (None: the first). Routed systems put `Route.details()` keys in every
        detail dict, so eval and bench read routing the same way for all of them.
        """

    @property
    def domains(self) -> list[str]:
        """The domains this system routes to (empty for systems without a router)."""
        return []

    def route_of(self, domain: str) -> str | None:
        """The route (router label) a pair of `domain` should take: the domain itself by default (RODOS, ARLISS);
        a group of domains for systems that route to tasks (DMoERM). Only meaningful when `routed`."""
        return domain

    @property
    def default_mode(self) -> str:
        """The inference mode `score` uses when given none (a system may take it from its options)."""
        return self.inference_modes[0]

    def check_mode(self, mode: str | None) -> str:
        """The inference mode to use; an unknown one is an error naming the ones this system has."""
        mode = mode or self.default_mode
        if mode not in self.inference_modes:
            raise UserError(f"system {self.name!r} has inference modes {', '.join(self.inference_modes)}; got {mode!r}")
        return mode

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

    @classmethod
    def bench_plan(cls, options: dict[str, Any], train: Sequence[PreferencePair], test: Sequence[PreferencePair],
                   seeds: Sequence[int], out_dir: Path) -> BenchPlan | None:
        """What `moerm bench` trains and evaluates this system on, given its `per_system.<name>.options`, the shared
        sampled pairs and the bench's seeds; None (the default): the shared pairs as they are. `out_dir` is a folder
        of its own for any other file it needs. A ConfigError here stops the bench before anything trains."""
        return None

    def add_domain(self, pairs: Sequence[PreferencePair], ctx: FitContext, model_dir: Path) -> FitResult:
        """Train what a new domain needs (its RM, the router) and write only the changed files to `model_dir`."""
        raise UnsupportedError(f"system {self.name!r} cannot add a domain; routed systems (rodos, arliss) can")

    def component_files(self) -> dict[str, list[str]]:
        """Files (relative to the saved folder) that belong to each component, for size on disk."""
        return {}

    # -- shared behaviour
    def save(self, path: str | Path) -> Path:
        if getattr(self, "quantized", None):
            raise UserError(f"system {self.name!r} was quantized at load ({self.quantized['mode']}) for inference; "
                            "save the fp32 system (load it without --quantize)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save_components(path)
        self.write_system_file(path)
        return path

    def write_system_file(self, path: Path) -> None:
        """`system.json`: which class loads the folder and the resolved config; written last, it marks a complete save."""
        m = self.config.model
        meta = {"system": self.name, "format": FORMAT_VERSION, "config": self.config.to_dict(),
                "backbone_id": backbone_id(m.backbone, m.dtype)}  # what the base was: a swapped base is refused
        atomic_write_text(Path(path) / SYSTEM_FILE, json.dumps(meta, indent=2))

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
        out = {"system": self.name, "backbone": self.config.model.backbone, "tuning": self.config.model.tuning,
               "components": comps, "total": totals}
        if getattr(self, "quantized", None):  # int8 packed weights are no parameters: the backbone's counts omit them
            out["quantized"] = self.quantized["mode"]
            out["quantized_layers"] = self.quantized["layers"]
        return out


REGISTRY: dict[str, type[RewardSystem]] = {}


def register(cls: type[RewardSystem]) -> type[RewardSystem]:
    REGISTRY[cls.name] = cls
    return cls


def get_system_class(name: str) -> type[RewardSystem]:
    import moerm.systems  # noqa: F401 - importing the package registers the built-in systems

    if name not in REGISTRY:
        raise UserError(f"unknown system {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def resolve_run_config(config: RunConfig) -> RunConfig:
    """The one resolution of a run config (after YAML and `--set` were merged by `config.load_config`): the
    system's and its tuning mode's defaults applied and every section checked. The CLI, the bench, resume and
    `moerm info` use it, and `config.yaml` holds its result."""
    return get_system_class(config.system).resolve_config(config)


def build_system(config: RunConfig) -> RewardSystem:
    return get_system_class(config.system)(config)


def find_model_dir(run_or_model_dir: str | Path) -> Path:
    """Accept a run folder (with model/ inside) or a saved model folder."""
    p = Path(run_or_model_dir)
    for cand in (p, p / "model"):
        if (cand / SYSTEM_FILE).exists():
            return cand
    raise FileNotFoundError(f"no saved reward system in {p} (expected {SYSTEM_FILE} in it or in {p / 'model'})")


def load_system(run_or_model_dir: str | Path, device: str | torch.device | None = None,
                quantize: str | None = None) -> RewardSystem:
    """Load any saved system; the folder's system.json says which class to use.

    `quantize`: "int8" quantizes every backbone's Linear layers after loading (CPU only, `encoding/quantize.py`),
    "none" does not; None: the saved config's `model.quantize`.
    """
    from moerm.encoding.quantize import check_quantize_device, check_quantize_mode, quantize_system

    check_device(device)
    if quantize is not None:
        check_quantize_mode(quantize)
        check_quantize_device(quantize, device)
    path = find_model_dir(run_or_model_dir)
    try:
        meta = json.loads((path / SYSTEM_FILE).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "system" not in meta:
            raise ValueError("expected an object with 'system' and 'config'")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path / SYSTEM_FILE}: not a readable system file ({e}); the save may be incomplete or "
                        "the file edited") from None
    fmt = meta.get("format", 1)
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise UserError(f"{path / SYSTEM_FILE}: saved in format {fmt!r} by a newer moerm (this one reads format "
                        f"{FORMAT_VERSION} and older): upgrade moerm to load it")
    config = from_dict(RunConfig, meta["config"])
    saved_id = meta.get("backbone_id")
    if saved_id is not None:
        now = backbone_id(config.model.backbone, config.model.dtype)
        if now != saved_id:
            raise UserError(f"{path}: the base backbone {config.model.backbone!r} is not the one this system was "
                            f"trained on (saved {saved_id}, now {now}): its weights, config or tokenizer changed. "
                            "Restore the original backbone folder, or retrain")
    quantize = config.model.quantize if quantize is None else quantize
    check_quantize_device(quantize, device)
    try:
        system = get_system_class(meta["system"]).load_components(path, config, device)
    except (UserError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or edited weight/index file: say which folder, not a traceback
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{path}: the saved {meta['system']} system cannot be read ({type(e).__name__}: {first[:300]});"
                        " a file in it is truncated, missing or was edited (e.g. a size mismatch). Retrain, or "
                        "restore the folder from a copy") from None
    quantize_system(system, quantize)  # after loading, before any scoring
    return system
