"""Tuning modes, in one place below the systems: which backbone weights train, and what a saved system keeps.

    full    every backbone weight trains; the whole backbone is saved
    lora    the backbone is frozen and carries one or more named LoRA adapters; only the adapters are saved
    frozen  nothing in the backbone trains; its pooled features are cached once (`encoding.cache`) and only heads train
    top     the embeddings and lower blocks form a frozen trunk whose token states are cached (`encoding.trunk`); only
            the top `model.trainable_layers` blocks train: fully (`style="full"`, those blocks' weights are saved) or
            with LoRA adapters restricted to them (`style="lora"`, the adapters are saved)

A system declares the modes it can honour (`RewardSystem.tunings`) and its default; `resolve_tuning` turns the
config's `auto` into that default and rejects a mode the system cannot honour, when the system is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
import torch
from torch import nn

from moerm.config import ConfigError, ModelConfig
from moerm.encoding.backbone import Backbone

TUNING_MODES = ("full", "lora", "frozen", "top")
TOP_FILE = "top.safetensors"  # top tuning, full style: the trained blocks' weights
_LORA_PARAM = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


# Default learning rates by tuning mode (and, for `top`, by how the top blocks train), used when the run's
# `train.lr` / `train.head_lr` are not set; set from the sweep in docs/RESULTS.md ("Default recipes").
DEFAULT_LR: dict[str, float] = {"full": 1e-4, "top:full": 1e-3, "lora": 2e-3, "top:lora": 2e-3, "frozen": 1e-3}
DEFAULT_HEAD_LR: dict[str, float | None] = {"full": None, "top:full": None, "lora": None, "top:lora": None,
                                            "frozen": 1e-3}  # None: the same as lr


def default_lrs(mode: str, style: str = "full") -> tuple[float, float | None]:
    """(lr, head_lr) a system trains with under tuning `mode` when the run sets neither (head_lr None: = lr)."""
    key = f"top:{style}" if mode == "top" else mode
    return DEFAULT_LR[key], DEFAULT_HEAD_LR[key]


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
    from moerm.encoding.trunk import first_trained_block
    from moerm.modules.experts import transformer_blocks

    _, blocks = transformer_blocks(backbone.model)
    first = first_trained_block(len(blocks), model.trainable_layers, model.backbone)
    return list(range(first, len(blocks)))


def adapter_config(backbone: Backbone, model: ModelConfig) -> LoraConfig:
    """The LoRA settings of a new adapter on this backbone: on every block, or under `top` tuning on the top blocks
    only (so the trunk below them is shared by every adapter and cached)."""
    if model.tuning != "top":
        return lora_config(model)
    from moerm.modules.experts import transformer_blocks

    pattern = transformer_blocks(backbone.model)[0].rsplit(".", 1)[-1]
    return lora_config(model, top_blocks(backbone, model), pattern)


def set_trunk(backbone: Backbone, model: ModelConfig) -> None:
    """Mark the blocks below the top `model.trainable_layers` as this backbone's cached trunk (`top` tuning)."""
    from moerm.encoding.cache import backbone_id
    from moerm.encoding.trunk import TrunkSpec, default_trunk_dir

    first = top_blocks(backbone, model)[0]
    root = Path(model.trunk_cache) if model.trunk_cache else default_trunk_dir()
    backbone.trunk = TrunkSpec(first, backbone_id(model.backbone, model.dtype), root)


def top_parameter_names(backbone: Backbone, model: ModelConfig) -> list[str]:
    """`backbone.model` parameter names inside the top blocks (those `top` tuning trains and saves, full style)."""
    from moerm.modules.experts import transformer_blocks

    name, _ = transformer_blocks(backbone.model)
    prefixes = tuple(f"{name}.{i}." for i in top_blocks(backbone, model))
    return [n for n, _ in backbone.model.named_parameters() if n.startswith(prefixes)]


def apply_tuning(backbone: Backbone, mode: str, model: ModelConfig, adapters: Sequence[str] = ("default",),
                 style: str = "full") -> None:
    """Freeze the backbone or make it trainable, or wrap it with the named LoRA adapters (base frozen by peft).

    `top`: the trunk is frozen and marked for caching; `style` says how the top blocks train (full or lora).
    """
    if mode not in TUNING_MODES:
        raise ConfigError(f"model.tuning must be one of {', '.join(TUNING_MODES)}; got {mode!r}")
    if mode == "full":
        backbone.requires_grad_(True)
    elif mode == "frozen":
        backbone.requires_grad_(False)
    elif mode == "top":
        set_trunk(backbone, model)
        if style == "full":
            backbone.requires_grad_(False)
            top = set(top_parameter_names(backbone, model))
            for n, p in backbone.model.named_parameters():
                p.requires_grad_(n in top)
        elif style == "lora":
            if not isinstance(backbone.model, PeftModel):
                for name in adapters:
                    add_adapter(backbone, name, adapter_config(backbone, model))
        else:
            raise ValueError(f"top tuning style must be full or lora; got {style!r}")
    elif not isinstance(backbone.model, PeftModel):
        for name in adapters:
            add_adapter(backbone, name, lora_config(model))


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


def save_backbone(backbone: Backbone, mode: str, path: Path, tokenizer=None) -> list[str]:
    """Write only what tuning changed into `path`: the whole backbone (full), the adapter(s) (lora), nothing (frozen).

    Returns the sub-folders written (relative to `path`), for size-on-disk reports.
    """
    if mode == "full":
        backbone.model.save_pretrained(path / "backbone", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path / "backbone")
        return ["backbone"]
    if mode == "lora" or (mode == "top" and isinstance(backbone.model, PeftModel)):
        backbone.model.save_pretrained(str(path / "adapter"), safe_serialization=True)
        return ["adapter"]
    if mode == "top":  # full style: only the trained top blocks; the trunk is the base model's
        from moerm.train.checkpoint import atomic_save_safetensors

        trained = {n: p.detach() for n, p in backbone.model.named_parameters() if p.requires_grad}
        if not trained:
            raise ValueError("top tuning (full style) has no trainable block to save")
        atomic_save_safetensors(trained, path / TOP_FILE)
        return [TOP_FILE]
    return []


def saved_backbone_path(mode: str, path: Path, base: str) -> str:
    """Where the backbone's weights load from: the saved copy (full) or the base model (lora, frozen)."""
    return str(path / "backbone") if mode == "full" else base


def restore_adapters(backbone: Backbone, mode: str, path: Path, trainable: bool = True,
                     model: ModelConfig | None = None) -> None:
    """After loading the base: put back the saved adapter (lora, top with LoRA) or the trained top blocks (top, full
    style; `model` is then required); nothing to do for full and frozen."""
    if mode == "lora" or (mode == "top" and (path / "adapter").is_dir()):
        load_adapter(backbone, path / "adapter", None, trainable)
    if mode == "top":
        if model is None:
            raise ValueError("restoring a top-tuned backbone needs the model config")
        set_trunk(backbone, model)
        if (path / TOP_FILE).is_file():
            from safetensors.torch import load_file

            expected = set(top_parameter_names(backbone, model))
            saved = load_file(str(path / TOP_FILE))
            if set(saved) != expected:
                raise ValueError(f"{path / TOP_FILE}: holds {len(saved)} tensors, not the {len(expected)} of the top "
                                 f"{model.trainable_layers} blocks of {model.backbone} (another trainable_layers?)")
            backbone.model.load_state_dict(saved, strict=False)
            backbone.requires_grad_(False)
            for n, p in backbone.model.named_parameters():
                p.requires_grad_(trainable and n in expected)


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
