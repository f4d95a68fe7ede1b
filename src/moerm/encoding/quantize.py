"""Post-load int8 inference on CPU: dynamic quantization of every backbone's `nn.Linear` layers, heads kept fp32.

`quantize_system(system, "int8")` finds every `Backbone` reachable from a loaded system (its attributes, their
modules, dicts and lists; components such as ARLISS's `ParamView`s hold parameters, not modules, so the walk reads
the system itself) and replaces each plain `nn.Linear` inside it with torch's `DynamicQuantizedLinear` (int8 packed
weights, activations quantized per batch at run time). In a peft-wrapped backbone only a LoRA layer's `base_layer`
is quantized: peft's `lora.Linear.forward` (one adapter, or a mixed batch through `adapter_names`) calls
`self.base_layer(x)` and adds the fp32 LoRA A/B path to its output, which works unchanged with a quantized
base_layer (checked in tests/encoding/test_quantize.py); the A/B matrices, heads, routers and MoE gates stay fp32.

Limits: int8 dynamic quantization is a CPU path (refused on CUDA); a quantized system is for scoring only (no
training, no saving, no `add_domain`); transformers' `Conv1D` (GPT-2) is not an `nn.Linear` and stays fp32.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from moerm.encoding.backbone import Backbone, find_backbones
from moerm.errors import UserError

QUANTIZE_MODES = ("none", "int8")


def check_quantize_mode(mode: str | None) -> str:
    mode = "none" if mode is None else str(mode).lower()
    if mode not in QUANTIZE_MODES:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}; got {mode!r}")
    return mode


def check_quantize_device(mode: str | None, device: str | torch.device | None) -> None:
    """Refuse int8 on a non-CPU device before anything loads."""
    if check_quantize_mode(mode) != "none" and device is not None and torch.device(device).type != "cpu":
        kind = torch.device(device).type
        raise UserError(f"--quantize {mode} is CPU-only (torch's int8 dynamic quantization has no {kind} kernels); "
                        "load on the CPU (--device cpu) or drop --quantize (on a GPU use model.dtype=bfloat16)")


def _int8(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice: it is still the CPU int8 path
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear.float()), {nn.Linear}, dtype=torch.qint8)[0]


def _quantize_children(module: nn.Module, keep: re.Pattern[str] | None = None, prefix: str = "") -> Iterator[str]:
    """Replace plain nn.Linear children (recursively) with int8 ones; inside a LoRA layer only its base_layer.
    Layers whose dotted name (from the backbone) matches `keep` stay fp32."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if keep is not None and keep.search(full):
            continue
        if isinstance(child, LoraLayer):
            base = child.base_layer
            if type(base) is nn.Linear:
                child.base_layer = _int8(base)
                yield f"{name}.base_layer"
            continue  # lora_A / lora_B / dropout stay fp32
        if type(child) is nn.Linear:
            setattr(module, name, _int8(child))
            yield name
        else:
            yield from (f"{name}.{n}" for n in _quantize_children(child, keep, f"{full}."))


def quantize_backbone(backbone: Backbone, keep_fp32: str | None = None) -> list[str]:
    """Quantize one backbone in place; the names of the layers replaced. `keep_fp32`: a regular expression over
    layer names (e.g. `layer\\.\\d+\\.output\\.dense`, BERT's FFN down-projections) that stay fp32."""
    for p in backbone.parameters():
        if p.device.type != "cpu":
            raise UserError(f"int8 dynamic quantization is CPU-only; this backbone is on {p.device} (load with "
                            "--device cpu, or drop --quantize)")
        break
    backbone.eval()
    return list(_quantize_children(backbone, re.compile(keep_fp32) if keep_fp32 else None))


def quantize_system(system: Any, mode: str | None, keep_fp32: str | None = None) -> dict[str, Any] | None:
    """Quantize every backbone of a loaded system in place (mode "int8"); "none"/None leaves it as it is.

    Records `system.quantized = {"mode", "layers", "backbones"}` (reported by `describe()` as "quantized": "int8")
    and returns it. Raises UserError on a non-CPU backbone or when no Linear layer is found at all.
    """
    mode = check_quantize_mode(mode)
    if mode == "none":
        return None
    if getattr(system, "quantized", None):
        return system.quantized
    backbones = find_backbones(system)
    if not backbones:
        name = getattr(system, "name", type(system).__name__)
        raise UserError(f"--quantize {mode}: no backbone found in system {name!r}")
    layers = [n for b in backbones for n in quantize_backbone(b, keep_fp32)]
    if not layers:
        raise UserError(f"--quantize {mode}: the backbone has no nn.Linear layers to quantize (e.g. GPT-2's Conv1D)")
    system.quantized = {"mode": mode, "layers": len(layers), "backbones": len(backbones)}
    return system.quantized


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, torch.ao.nn.quantized.dynamic.Linear)
