"""Tuning modes, in one place below the systems: which backbone weights train, and what a saved system keeps.

    full    every backbone weight trains; the whole backbone is saved
    lora    the backbone is frozen and carries one or more named LoRA adapters; only the adapters are saved
    frozen  nothing in the backbone trains; its pooled features are cached once (`encoding.cache`) and only heads train

A system declares the modes it can honour (`RewardSystem.tunings`) and its default; `resolve_tuning` turns the
config's `auto` into that default and rejects a mode the system cannot honour, when the system is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from moerm.config import ConfigError, ModelConfig
from moerm.encoding.backbone import Backbone

TUNING_MODES = ("full", "lora", "frozen")
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


def apply_tuning(backbone: Backbone, mode: str, model: ModelConfig, adapters: Sequence[str] = ("default",)) -> None:
    """Freeze the backbone or make it trainable, or wrap it with the named LoRA adapters (base frozen by peft)."""
    if mode not in TUNING_MODES:
        raise ConfigError(f"model.tuning must be one of {', '.join(TUNING_MODES)}; got {mode!r}")
    if mode == "full":
        backbone.requires_grad_(True)
    elif mode == "frozen":
        backbone.requires_grad_(False)
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
    if mode == "lora":
        backbone.model.save_pretrained(str(path / "adapter"), safe_serialization=True)
        return ["adapter"]
    return []


def saved_backbone_path(mode: str, path: Path, base: str) -> str:
    """Where the backbone's weights load from: the saved copy (full) or the base model (lora, frozen)."""
    return str(path / "backbone") if mode == "full" else base


def restore_adapters(backbone: Backbone, mode: str, path: Path, trainable: bool = True) -> None:
    """After loading the base: put back the saved adapter (lora); nothing to do for full and frozen."""
    if mode == "lora":
        load_adapter(backbone, path / "adapter", None, trainable)


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
