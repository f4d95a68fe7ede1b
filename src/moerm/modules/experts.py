"""K LoRA experts on one frozen base, evaluated together: the shared trunk runs once, only adapted layers fan out.

Experts adapt only the top `expert_layers` transformer blocks (peft `layers_to_transform`), so every block below is
identical for all experts. `ExpertBank.states(..., mode="batched")` runs the embeddings and those lower blocks once
per input, then repeats each row K times (row i -> rows i*K .. i*K+K-1) at the first adapted block and runs the rest
as one peft mixed-adapter batch. `mode="sequential"` is the reference: K full passes, one `set_adapter` each.
Both give the same states (tested); the batched path does (L - E + K*E) / (K*L) of the sequential block work.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from peft import PeftModel
from torch import nn

from moerm.backbone import Backbone, pooled

BLOCK_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (BERT/DeBERTa `encoder.layer`, GPT-2 `h`, Llama `layers`)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            return name, module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__} (looked for a ModuleList "
                     f"named one of {BLOCK_LIST_NAMES})")


def expert_layer_indices(model: nn.Module, expert_layers: int | None) -> list[int]:
    """The top blocks that carry expert LoRA: `expert_layers` of them, by default a third (at least one)."""
    _, blocks = transformer_blocks(model)
    total = len(blocks)
    e = max(1, total // 3) if expert_layers is None else expert_layers
    if not 1 <= e <= total:
        raise ValueError(f"options.expert_layers must be within 1..{total} for this backbone; got {e}")
    return list(range(total - e, total))


def _repeat(x: Any, n: int, k: int) -> Any:
    """Repeat batch-n tensors (and tensors inside tuples/lists) k times along dim 0, each row's copies adjacent."""
    if isinstance(x, torch.Tensor):
        return x.repeat_interleave(k, dim=0) if x.dim() >= 1 and x.shape[0] == n else x
    if isinstance(x, (tuple, list)):
        return type(x)(_repeat(v, n, k) for v in x)
    return x


@contextmanager
def fan_out(blocks: Sequence[nn.Module], n: int, k: int) -> Iterator[None]:
    """While active, every tensor argument with batch size n entering `blocks` is repeated k times.

    The first block gets (n, T, H) hidden states and leaves (n*k, T, H); later blocks get their hidden states at n*k
    already and only their batch-n arguments (attention masks, position embeddings) are expanded.
    """
    if k == 1:
        yield
        return

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _repeat(args, n, k), {key: _repeat(v, n, k) for key, v in kwargs.items()}

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ExpertBank(nn.Module):
    """A Backbone whose model is a PeftModel holding one adapter per expert; pooled states of all experts."""

    def __init__(self, backbone: Backbone, experts: Sequence[str], first_expert_layer: int):
        super().__init__()
        if not isinstance(backbone.model, PeftModel):
            raise TypeError("ExpertBank needs a backbone whose model is a PeftModel with the expert adapters")
        self.backbone = backbone
        self.experts = list(experts)
        self.first_expert_layer = first_expert_layer

    @property
    def peft(self) -> PeftModel:
        return self.backbone.model  # type: ignore[return-value]

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               mode: str = "batched") -> torch.Tensor:
        """Pooled last hidden states (N, K, H) of every expert for every input (call under no_grad, in eval mode)."""
        n, k = input_ids.shape[0], len(self.experts)
        if mode == "sequential":
            out = []
            for name in self.experts:
                self.peft.set_adapter(name)
                out.append(self.backbone(input_ids, attention_mask, token_type_ids))  # (N, H)
            return torch.stack(out, dim=1)  # (N, K, H)
        if mode != "batched":
            raise ValueError(f"mode must be batched or sequential; got {mode!r}")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        names = [name for _ in range(n) for name in self.experts]  # row i*K + j -> expert j
        _, blocks = transformer_blocks(self.peft)
        with fan_out(list(blocks)[self.first_expert_layer:], n, k):
            hidden = self.peft(**inputs, adapter_names=names).last_hidden_state  # (N*K, T, H)
        mask = attention_mask.repeat_interleave(k, dim=0)  # (N*K, T)
        return pooled(hidden, mask, self.backbone.pooling).view(n, k, -1)  # (N, K, H)
