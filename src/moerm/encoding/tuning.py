"""Tuning modes, in one place below the systems: which backbone weights train, and what a saved system keeps.

Each mode is a registered `TuningMode` object (peft's pattern: what a method does lives on its object); systems ask
the mode (`tuning_mode(name, style)`) and never branch on its name:

    full       every backbone weight trains; the whole backbone is saved
    lora       the backbone is frozen and carries one or more named LoRA adapters; only the adapters are saved
    frozen     nothing in the backbone trains; its pooled features are cached once (`encoding.cache`), only heads train
    top        the embeddings and lower blocks form a frozen trunk whose token states are cached (`encoding.trunk`);
               only the top `model.trainable_layers` blocks train: fully (`top:full`, those blocks' weights are
               saved) or with LoRA adapters restricted to them (`top:lora`, the adapters are saved). A system's
               `top_style` says which.

A system declares the modes it can honour (`RewardSystem.tunings`) and its default; `resolve_tuning` turns the
config's `auto` into that default and rejects a mode the system cannot honour, when the system is built. A new mode
is one subclass of `TuningMode` with `@register_tuning` in this file; nothing else branches on it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from moerm.config import ConfigError, ModelConfig
from moerm.encoding.backbone import Backbone
from moerm.encoding.blocks import transformer_blocks
from moerm.encoding.cache import backbone_id
from moerm.encoding.trunk import TrunkSpec, default_trunk_dir, first_trained_block
from moerm.atomic import atomic_save_safetensors

TUNING_MODES = ("full", "lora", "frozen", "top")
TOP_FILE = "top.safetensors"  # top tuning, full style: the trained blocks' weights
_LORA_PARAM = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def resolve_tuning(requested: str, supported: Sequence[str], default: str, system: str) -> str:
    """`auto` -> the system's default; a mode the system cannot honour is a config error, never replaced."""
    mode = default if requested == "auto" else requested
    if mode not in supported:
        raise ConfigError(f"system {system!r} cannot honour model.tuning={requested!r}: it supports "
                          f"{' | '.join(supported)} (or auto = {default})")
    return mode


def lora_config(model: ModelConfig, layers: Sequence[int] | None = None, layers_pattern: str | None = None) -> LoraConfig:
    """The run's LoRA settings; `layers` restricts the adapter to those transformer blocks (peft layers_to_transform)."""
    extra = {"layers_to_transform": list(layers), "layers_pattern": layers_pattern} if layers is not None else {}
    return LoraConfig(r=model.lora_r, lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout,
                      target_modules=model.lora_target_modules, **extra)


def is_lora_parameter(name: str, adapter: str | None = None) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (any, or the one named `adapter`)."""
    if adapter is None:
        return _LORA_PARAM.search(name) is not None
    return re.search(rf"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.{re.escape(adapter)}\.", name) is not None


def add_adapter(backbone: Backbone, name: str, config: LoraConfig) -> None:
    """Give the backbone LoRA adapter `name`: wrap it in a PeftModel the first time, add to it after that."""
    if isinstance(backbone.model, PeftModel):
        backbone.model.add_adapter(name, config)
    else:
        backbone.model = get_peft_model(backbone.model, config, adapter_name=name)


def top_blocks(backbone: Backbone, model: ModelConfig) -> list[int]:
    """`top` tuning: the indices of the blocks that train (the top `model.trainable_layers`)."""
    _, blocks = transformer_blocks(backbone.model)
    first = first_trained_block(len(blocks), model.trainable_layers, model.backbone)
    return list(range(first, len(blocks)))


def set_trunk(backbone: Backbone, model: ModelConfig) -> None:
    """Mark the blocks below the top `model.trainable_layers` as this backbone's cached trunk (`top` tuning)."""
    first = top_blocks(backbone, model)[0]
    root = Path(model.trunk_cache) if model.trunk_cache else default_trunk_dir()
    backbone.trunk = TrunkSpec(first, backbone_id(model.backbone, model.dtype), root)


def top_parameter_names(backbone: Backbone, model: ModelConfig) -> list[str]:
    """`backbone.model` parameter names inside the top blocks (those `top` tuning trains and saves, full style)."""
    name, _ = transformer_blocks(backbone.model)
    prefixes = tuple(f"{name}.{i}." for i in top_blocks(backbone, model))
    return [n for n, _ in backbone.model.named_parameters() if n.startswith(prefixes)]


def set_trainable_adapter(model: nn.Module, adapter: str | None) -> None:
    """Only LoRA adapter `adapter` trains among the model's parameters (None: none of them; everything else frozen)."""
    for n, p in model.named_parameters():
        p.requires_grad_(adapter is not None and is_lora_parameter(n, adapter))


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def base_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not part of a LoRA adapter (the shared base of an adapted model)."""
    return [p for n, p in module.named_parameters() if not is_lora_parameter(n)]


class ParamView(nn.Module):
    """Shares (never copies) a set of parameters, so a component of a shared model (one adapter, the base) can be
    counted and described like any module."""

    def __init__(self, params: Sequence[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(list(params))


def load_adapter(backbone: Backbone, folder: Path, name: str | None = None, trainable: bool = True) -> None:
    """Load one saved adapter (safetensors only: a folder holding a pickled `adapter_model.bin` is refused before
    peft reads anything), wrapping the backbone on the first one."""
    if not (folder / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (moerm loads adapters from safetensors only)")
    kw = {"adapter_name": name} if name is not None else {}
    if isinstance(backbone.model, PeftModel):
        backbone.model.load_adapter(str(folder), adapter_name=name or "default", is_trainable=trainable)
    else:
        backbone.model = PeftModel.from_pretrained(backbone.model, str(folder), is_trainable=trainable, **kw)


def share_trunk(backbones: Sequence[Backbone], model: ModelConfig) -> int:
    """Make `top`-tuned (full style) backbones of one base share their trunk: every parameter outside the top
    blocks becomes the first backbone's Parameter object (they hold the same pretrained weights; checked), so N
    domain models cost one trunk plus N sets of top blocks in memory. Returns the parameters freed."""
    if len(backbones) < 2:
        return 0
    first = backbones[0]
    top = set(top_parameter_names(first, model))
    shared = {n: p for n, p in first.model.named_parameters() if n not in top}
    freed = 0
    for other in backbones[1:]:
        if set(top_parameter_names(other, model)) != top:
            raise ValueError("share_trunk: the backbones have different top blocks")
        for name, p in list(other.model.named_parameters()):
            if name in top or p is shared.get(name):
                continue
            src = shared.get(name)
            if src is None or src.shape != p.shape or not torch.equal(src.data, p.data):
                raise ValueError(f"share_trunk: trunk parameter {name} differs between the backbones (not one base)")
            parent_name, _, attr = name.rpartition(".")
            parent = other.model.get_submodule(parent_name) if parent_name else other.model
            setattr(parent, attr, src)
            freed += p.numel()
    return freed


class TuningMode:
    """What one tuning mode does: what trains (`apply`), its default learning rates, what a saved system keeps of the
    backbone (`save`, `saved_files`) and how it comes back (`backbone_path`, `restore`)."""

    name: ClassVar[str]  # the model.tuning value
    key: ClassVar[str]  # the registry key: the name, or top:<style>
    lr: ClassVar[float]  # default learning rates when the run sets none (docs/RESULTS.md, "Default recipes")
    head_lr: ClassVar[float | None] = None  # None: the same as lr
    trains_backbone: ClassVar[bool] = True  # False: the backbone is frozen and heads train on its cached features
    trunk: ClassVar[bool] = False  # a frozen trunk below the trained blocks, its token states cached
    shared_trunk: ClassVar[bool] = False  # models of one base may share the trunk's parameters in memory
    saves_backbone: ClassVar[bool] = False  # the saved folder holds the whole backbone (and its tokenizer)

    def apply(self, backbone: Backbone, model: ModelConfig, adapters: Sequence[str] = ("default",)) -> None:
        """Freeze the backbone or make (part of) it trainable, or give it the named LoRA adapters."""
        raise NotImplementedError

    def adapter_config(self, backbone: Backbone, model: ModelConfig) -> LoraConfig:
        """The LoRA settings of an adapter a system adds on this backbone (ARLISS's per-domain adapters)."""
        return lora_config(model)

    def saved_files(self) -> list[str]:
        """What `save` writes, relative to the saved folder (for size-on-disk reports)."""
        return []

    def save(self, backbone: Backbone, path: Path, tokenizer: Any = None) -> list[str]:
        """Write only what tuning changed into `path`; returns `saved_files()`."""
        return []

    def backbone_path(self, path: Path, base: str) -> str:
        """Where the backbone's weights load from: the base model, unless the mode saved a copy."""
        return base

    def restore(self, backbone: Backbone, path: Path, model: ModelConfig, trainable: bool = True) -> None:
        """After loading `backbone_path`: put back what `save` kept (adapters, trained blocks)."""

    def mark_trunk(self, backbone: Backbone, model: ModelConfig) -> None:
        """A base the system adapts itself (ARLISS): mark its cached trunk, where the mode has one."""
        if self.trunk:
            set_trunk(backbone, model)


TUNINGS: dict[str, TuningMode] = {}
TUNING_MODES = ("full", "lora", "frozen", "top")  # the model.tuning values (top has two styles)


def register_tuning(cls: type[TuningMode]) -> type[TuningMode]:
    TUNINGS[cls.key] = cls()
    return cls


def tuning_mode(name: str, style: str = "full") -> TuningMode:
    """The mode object of model.tuning `name` (`style`: how a system trains the top blocks under `top`)."""
    key = f"top:{style}" if name == "top" else name
    if key not in TUNINGS:
        known = ", ".join(TUNING_MODES)
        raise ConfigError(f"model.tuning must be one of {known}; got {name!r}" if name not in TUNING_MODES
                          else f"top tuning style must be full or lora; got {style!r}")
    return TUNINGS[key]


def default_lrs(mode: str, style: str = "full") -> tuple[float, float | None]:
    """(lr, head_lr) a system trains with under tuning `mode` when the run sets neither (head_lr None: = lr)."""
    m = tuning_mode(mode, style)
    return m.lr, m.head_lr


def apply_tuning(backbone: Backbone, mode: str, model: ModelConfig, adapters: Sequence[str] = ("default",),
                 style: str = "full") -> None:
    """`tuning_mode(mode, style).apply(...)`: freeze, unfreeze or adapt the backbone."""
    tuning_mode(mode, style).apply(backbone, model, adapters)


def _add_missing_adapters(backbone: Backbone, adapters: Sequence[str], config: LoraConfig) -> None:
    if not isinstance(backbone.model, PeftModel):
        for name in adapters:
            add_adapter(backbone, name, config)


@register_tuning
class Full(TuningMode):
    name = key = "full"
    lr = 1e-4
    saves_backbone = True

    def apply(self, backbone: Backbone, model: ModelConfig, adapters: Sequence[str] = ("default",)) -> None:
        backbone.requires_grad_(True)

    def saved_files(self) -> list[str]:
        return ["backbone"]

    def save(self, backbone: Backbone, path: Path, tokenizer: Any = None) -> list[str]:
        backbone.model.save_pretrained(path / "backbone", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path / "backbone")
        return self.saved_files()

    def backbone_path(self, path: Path, base: str) -> str:
        return str(path / "backbone")


@register_tuning
class LoRA(TuningMode):
    name = key = "lora"
    lr = 2e-3

    def apply(self, backbone: Backbone, model: ModelConfig, adapters: Sequence[str] = ("default",)) -> None:
        _add_missing_adapters(backbone, adapters, lora_config(model))

    def saved_files(self) -> list[str]:
        return ["adapter"]

    def save(self, backbone: Backbone, path: Path, tokenizer: Any = None) -> list[str]:
        backbone.model.save_pretrained(str(path / "adapter"), safe_serialization=True)
        return self.saved_files()

    def restore(self, backbone: Backbone, path: Path, model: ModelConfig, trainable: bool = True) -> None:
        load_adapter(backbone, path / "adapter", None, trainable)


@register_tuning
class Frozen(TuningMode):
    name = key = "frozen"
    lr = 1e-3
    head_lr = 1e-3
    trains_backbone = False

    def apply(self, backbone: Backbone, model: ModelConfig, adapters: Sequence[str] = ("default",)) -> None:
        backbone.requires_grad_(False)


@register_tuning
class TopFull(TuningMode):
    """The top blocks train fully; their weights alone are saved (the trunk is the base model's)."""

    name, key = "top", "top:full"
    lr = 1e-3
    trunk = shared_trunk = True

    def apply(self, backbone: Backbone, model: ModelConfig, adapters: Sequence[str] = ("default",)) -> None:
        set_trunk(backbone, model)
        backbone.requires_grad_(False)
        top = set(top_parameter_names(backbone, model))
        for n, p in backbone.model.named_parameters():
            p.requires_grad_(n in top)

    def saved_files(self) -> list[str]:
        return [TOP_FILE]

    def save(self, backbone: Backbone, path: Path, tokenizer: Any = None) -> list[str]:
        trained = {n: p.detach() for n, p in backbone.model.named_parameters() if p.requires_grad}
        if not trained:
            raise ValueError("top tuning (full style) has no trainable block to save")
        atomic_save_safetensors(trained, path / TOP_FILE)
        return self.saved_files()

    def restore(self, backbone: Backbone, path: Path, model: ModelConfig, trainable: bool = True) -> None:
        set_trunk(backbone, model)
        expected = set(top_parameter_names(backbone, model))
        saved = load_file(str(path / TOP_FILE))
        if set(saved) != expected:
            raise ValueError(f"{path / TOP_FILE}: holds {len(saved)} tensors, not the {len(expected)} of the top "
                             f"{model.trainable_layers} blocks of {model.backbone} (another trainable_layers?)")
        backbone.model.load_state_dict(saved, strict=False)
        backbone.requires_grad_(False)
        for n, p in backbone.model.named_parameters():
            p.requires_grad_(trainable and n in expected)


@register_tuning
class TopLoRA(LoRA):
    """LoRA adapters on the top blocks only, so the trunk below them is shared by every adapter and cached."""

    name, key = "top", "top:lora"
    lr = 2e-3
    trunk = True

    def adapter_config(self, backbone: Backbone, model: ModelConfig) -> LoraConfig:
        pattern = transformer_blocks(backbone.model)[0].rsplit(".", 1)[-1]
        return lora_config(model, top_blocks(backbone, model), pattern)

    def apply(self, backbone: Backbone, model: ModelConfig, adapters: Sequence[str] = ("default",)) -> None:
        set_trunk(backbone, model)
        _add_missing_adapters(backbone, adapters, self.adapter_config(backbone, model))

    def restore(self, backbone: Backbone, path: Path, model: ModelConfig, trainable: bool = True) -> None:
        super().restore(backbone, path, model, trainable)
        set_trunk(backbone, model)


# The default learning rates by registry key, read off the modes (docs/RESULTS.md, "Default recipes").
DEFAULT_LR: dict[str, float] = {key: mode.lr for key, mode in TUNINGS.items()}
DEFAULT_HEAD_LR: dict[str, float | None] = {key: mode.head_lr for key, mode in TUNINGS.items()}
