"""Block surgery on Hugging Face transformers, in one place: find a model's transformer blocks, run a model only up to
block k (catching that block's hidden-state input), and run it from block k on given states (lower blocks replaced by
pass-throughs). The trunk of `top` tuning, the early states of a frozen router and the expert bank build on these."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

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
