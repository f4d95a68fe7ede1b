"""K LoRA experts on one frozen base, evaluated together: the shared trunk runs once, only adapted layers fan out.

Experts adapt only the top `expert_layers` transformer blocks (peft `layers_to_transform`), so every block below is
identical for all experts. `ExpertBank.states(..., mode="batched")` works in two passes:

1. the trunk: the model runs on the N inputs only up to the first adapted block, whose hidden-state input (N, T, H)
   a forward pre-hook catches (and stops the pass by raising a private exception);
2. the top: the model runs on the inputs repeated K times (row i -> rows i*K .. i*K+K-1), so it builds its own masks,
   position and relative-position embeddings for N*K rows; the lower blocks are replaced by pass-throughs and the
   first adapted block is fed the caught states, repeated the same way. Each row goes through its own expert
   (`adapters.route_rows`): one peft mixed-adapter batch, or, where the architecture cannot mix adapters (DeBERTa-v3),
   one pass per expert over the N rows.

Nothing is inferred from tensor shapes, so the result is exactly that of `mode="sequential"`, the reference: K full
passes, one `set_adapter` each. The lower blocks run once per input; the top blocks once per (input, expert); only the
embedding lookup and mask construction are repeated for N*K rows.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from moerm.encoding import Backbone, decoder_position_ids, pooled
from moerm.encoding.adapters import Rows, active_adapter, route_rows
from moerm.encoding.trunk import inference_states
from moerm.errors import UserError

BLOCK_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (BERT/DeBERTa `encoder.layer`, GPT-2 `h`, Llama `layers`)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            return name, module
    raise UserError(f"cannot find the {n} transformer blocks of {type(model).__name__} (looked for a ModuleList "
                     f"named one of {BLOCK_LIST_NAMES})")


def expert_layer_indices(model: nn.Module, expert_layers: int | None) -> list[int]:
    """The top blocks that carry expert LoRA: `expert_layers` of them, by default a third (at least one)."""
    _, blocks = transformer_blocks(model)
    total = len(blocks)
    e = max(1, total // 3) if expert_layers is None else expert_layers
    if not 1 <= e <= total:
        raise UserError(f"options.expert_layers must be within 1..{total} for this backbone; got {e}")
    return list(range(total - e, total))


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A Hugging Face block's hidden-state input: its first argument, positional or `hidden_states=`."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise TypeError("a transformer block was called without a hidden_states tensor as its first argument")
    return hidden


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _TrunkDone(Exception):
    """Raised at the first adapted block to stop the trunk pass; carries that block's hidden-state input."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("trunk pass stopped at the first adapted block")
        self.hidden = hidden


def trunk_states(model: nn.Module, blocks: nn.ModuleList, first: int, inputs: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, Any]:
    """Run `model(**inputs)` only up to block `first` (> 0): that block's hidden-state input (N, T, H), and what
    block `first - 1` returned (the form a stand-in for a lower block must return)."""
    returned: list[Any] = []

    def keep(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        returned.append(output)

    def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _TrunkDone(_hidden_of(args, kwargs))

    handles = [blocks[first - 1].register_forward_hook(keep),
               blocks[first].register_forward_pre_hook(stop, with_kwargs=True)]
    try:
        model(**inputs)
    except _TrunkDone as done:
        return done.hidden, returned[-1]
    finally:
        for h in handles:
            h.remove()
    raise RuntimeError(f"the model returned without running block {first}")


class _PassThrough(nn.Module):
    """Stands in for a lower block: returns its hidden-state input, in the form the real block returned."""

    def __init__(self, like: Any):
        super().__init__()
        if not isinstance(like, (torch.Tensor, tuple)):
            raise TypeError(f"a transformer block returned {type(like).__name__}; expected a tensor or a tuple")
        self.like = like

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = _hidden_of(args, kwargs)
        return hidden if isinstance(self.like, torch.Tensor) else (hidden, *self.like[1:])


@contextmanager
def fed_from_trunk(blocks: nn.ModuleList, first: int, hidden: torch.Tensor, like: Any) -> Iterator[None]:
    """While active, blocks[:first] are pass-throughs and block `first` reads `hidden` (B, T, H) as its states.

    The batch the model runs on must have `hidden`'s rows; anything else is an error, never a silent mismatch.
    """

    def feed(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        current = _hidden_of(args, kwargs)
        if current.shape != hidden.shape:
            raise ValueError(f"block {first} got states {tuple(current.shape)}; the trunk gave {tuple(hidden.shape)}")
        return _with_hidden(args, kwargs, hidden)

    originals = [blocks[i] for i in range(first)]
    stub = _PassThrough(like)
    for i in range(first):
        blocks[i] = stub
    handle = blocks[first].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, block in enumerate(originals):
            blocks[i] = block


class ExpertBank(nn.Module):
    """A Backbone whose model is a PeftModel holding one adapter per expert; pooled states of all experts."""

    def __init__(self, backbone: Backbone, experts: Sequence[str], first_expert_layer: int):
        super().__init__()
        if not isinstance(backbone.model, PeftModel):
            raise TypeError("ExpertBank needs a backbone whose model is a PeftModel with the expert adapters")
        _, blocks = transformer_blocks(backbone.model)
        below = [f"{i}.{n}" for i in range(first_expert_layer) for n, m in blocks[i].named_modules()
                 if isinstance(m, LoraLayer)]
        if below:  # the trunk is shared only if no adapter touches it
            raise ValueError(f"blocks below first_expert_layer={first_expert_layer} carry LoRA ({below[0]}, ...)")
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
                with active_adapter(self.peft, name):
                    out.append(self.backbone(input_ids, attention_mask, token_type_ids))  # (N, H)
            return torch.stack(out, dim=1)  # (N, K, H)
        if mode != "batched":
            raise ValueError(f"mode must be batched or sequential; got {mode!r}")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}  # (N, T) each, as Backbone passes them
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.backbone.decoder_positions:
            inputs["position_ids"] = decoder_position_ids(attention_mask)
        _, blocks = transformer_blocks(self.peft)
        first = self.first_expert_layer
        repeated = {key: v.repeat_interleave(k, dim=0) for key, v in inputs.items()}  # (N*K, T)
        names = [name for _ in range(n) for name in self.experts]  # row i*K + j -> expert j
        cached = inference_states(self.backbone, inputs, first) if first > 0 else None  # trunk_cache_at_inference
        trunk, like = cached or (trunk_states(self.peft, blocks, first, inputs) if first > 0 else (None, None))  # (N, T, H)
        trunk = trunk.repeat_interleave(k, dim=0) if trunk is not None else None  # (N*K, T, H)

        def run(rows: Rows, adapter_names: list[str] | None) -> torch.Tensor:
            extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
            feed = fed_from_trunk(blocks, first, trunk[rows], like) if trunk is not None else nullcontext()
            with feed:
                return self.peft(**{key: v[rows] for key, v in repeated.items()}, **extra).last_hidden_state  # (b, T, H)

        hidden = route_rows(self.peft, names, run)  # (N*K, T, H)
        return pooled(hidden, repeated["attention_mask"], self.backbone.pooling).view(n, k, -1)  # (N, K, H)
