"""Encode a batch through named LoRA adapters: each row names the adapter it goes through.

peft runs such a batch in one pass when given `adapter_names=[...]` (a mixed-adapter batch): every LoRA layer
splits its input by row and applies each row's adapter. That only works if every LoRA-wrapped module is called on
the rows' own states, whose batch dimension is the batch. Some architectures also call attention projections on a
position table shared by all rows (batch dimension 1): DeBERTa with relative attention projects its relative-position
embeddings with `query_proj`/`key_proj` when `share_att_key` is set (DeBERTa-v3), with `pos_key_proj`/`pos_query_proj`
otherwise, and DeBERTa (v1) with `pos_proj`/`pos_q_proj`. When the adapters in a batch put LoRA on one of those, a
row-routed pass is impossible (each row would need its own projection of the shared table), so the rows are encoded
in groups instead: one pass per adapter with it active (`set_adapter`), results scattered back in row order, and the
adapter that was active before restored. The rule is decided from the config and the adapted module names, up front;
errors are never caught to pick a path.

Where a mixed batch is possible, it runs as one fused LoRA step (`fused_lora.fused_step`: the same few batched ops
in every LoRA layer however many adapters the batch mixes) wherever that is exact (eval mode, plain LoRA adapters),
and as peft's mixed-adapter pass otherwise; every caller of `route_rows` and `encode_through` gets that choice.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Collection, Iterator, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PretrainedConfig

from moerm.encoding.backbone import Backbone
from moerm.encoding.fused_lora import fused_step

Rows = slice | list[int]  # which rows of the batch a pass computes: all of them, or these, in this order


def lora_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The LoRA parameters of one adapter (`...query.lora_A.<adapter_name>.weight`), in `named_parameters` order."""
    pattern = re.compile(rf"\.lora_[AB]\.{re.escape(adapter_name)}\.")
    return [p for n, p in model.named_parameters() if pattern.search(n)]


def shared_table_projections(config: PretrainedConfig) -> frozenset[str]:
    """Names of modules this architecture also applies to a position table shared by every row (batch dim 1)."""
    if not getattr(config, "relative_attention", False):
        return frozenset()
    kind = getattr(config, "model_type", "")
    if kind == "deberta-v2":
        if getattr(config, "share_att_key", False):
            return frozenset({"query_proj", "key_proj"})
        return frozenset({"pos_key_proj", "pos_query_proj"})
    if kind == "deberta":
        return frozenset({"pos_proj", "pos_q_proj"})
    return frozenset()


def adapted_module_names(model: nn.Module, adapters: Collection[str]) -> set[str]:
    """Last name components of the modules that carry LoRA of any of `adapters` (e.g. {"query", "value"})."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and any(a in m.lora_A for a in adapters)}


def can_mix_adapters(model: PeftModel, adapters: Collection[str]) -> bool:
    """Whether one peft mixed-adapter batch over `adapters` is exact: none of them adapts a shared-table projection."""
    return not shared_table_projections(model.config) & adapted_module_names(model, adapters)


@contextmanager
def active_adapter(model: PeftModel, name: str) -> Iterator[None]:
    """Inside, adapter `name` is active; afterwards the previous adapter is again, and every `requires_grad` as before.

    (peft's `set_adapter` also marks the adapter it activates trainable; that must not leak out of an inference pass.)
    """
    previous = model.active_adapter
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, g in grads:
            p.requires_grad_(g)


def route_rows(model: PeftModel, names: Sequence[str],
               run: Callable[[Rows, list[str] | None], torch.Tensor]) -> torch.Tensor:
    """Outputs (B, ...) of a batch in which row i goes through adapter `names[i]`, in row order.

    `run(rows, adapter_names)` computes the outputs of `rows`: with `adapter_names` (one per row) it is one peft
    mixed-adapter pass over every row; with None it is a plain pass, whose rows go through the adapters applied
    around the call (the one made active, or each row's own in the fused LoRA step).
    """
    if can_mix_adapters(model, set(names)):
        fused = fused_step(model, names)
        if fused is None:
            return run(slice(None), list(names))
        with fused:
            return run(slice(None), None)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    out: torch.Tensor | None = None
    for name, rows in groups.items():
        with active_adapter(model, name):
            y = run(rows, None)  # (len(rows), ...)
        if out is None:
            out = y.new_empty((len(names), *y.shape[1:]))
        out[rows] = y
    if out is None:
        raise ValueError("route_rows needs at least one row")
    return out


def encode_through(backbone: Backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor | None, names: Sequence[str]) -> torch.Tensor:
    """Pooled features (B, H) of a peft-wrapped backbone, row i through adapter `names[i]` (call in eval mode)."""
    if len(names) != input_ids.shape[0]:
        raise ValueError(f"got {len(names)} adapter names for {input_ids.shape[0]} rows")
    if not isinstance(backbone.model, PeftModel):
        raise TypeError("encode_through needs a backbone whose model is a PeftModel")

    def run(rows: Rows, adapter_names: list[str] | None) -> torch.Tensor:
        extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
        types = token_type_ids[rows] if token_type_ids is not None else None
        return backbone(input_ids[rows], attention_mask[rows], types, **extra)  # (b, H)

    return route_rows(backbone.model, names, run)
