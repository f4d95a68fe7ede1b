"""One fused LoRA step for a mixed-adapter batch: the same batched ops in every LoRA layer, however many adapters mix.

peft's mixed-adapter pass (`adapter_names=[...]`) loops, in every LoRA layer, over the batch's distinct adapters:
it gathers their rows, runs two small GEMMs each and scatters the results back, so the ops per layer grow with the
number of adapters in the batch. Here every plain-LoRA `lora.Linear` holds the adapters stacked once:

    A^T (n, in, r) and (scaling * B)^T (n, r, out), zero-padded to the layer's largest rank r

(padded ranks add exact zeros, so adapters of different ranks and alphas stay exact; an adapter that does not adapt
this layer is all zeros in it). A call picks each row's slot with one `index_select` per stack and adds
`x A_sel^T (sB)_sel^T` to the base layer's output: one `bmm` and one `baddbmm`, four ops per layer whatever the mix.
Every adapter layer of the model runs with peft's adapters switched off for the call (the layer's `_disable_adapters`
flag, which peft's `disable_adapters` property reads: a layer that carries none of the batch's adapters adds nothing,
as in peft's mixed pass); a forward hook per stacked layer adds the delta. Both are undone on exit.

`fused_step(model, names)` gives that context only where it computes exactly what peft's mixed pass does, and None
otherwise (the caller then takes peft's path): the model and its LoRA layers in eval mode (dropout is the identity),
no gradient wanted for the adapters (the stacks are detached copies: under `no_grad`, or the adapters frozen),
every adapter of the batch a plain LoRA (no DoRA or other variant, no `lora_bias`) on `nn.Linear`-like layers only
(`lora.Linear`, no LoRA on embeddings), no `modules_to_save`/trainable-token wrappers, no merged layer, one dtype for
all stacked weights. Whether the architecture can route rows at all (shared position tables) is `adapters.
can_mix_adapters`, decided before this is asked.

The stacks are cached per model and rebuilt when anything they were made from changes: the adapters (names and
config objects: add, load or delete an adapter), or any LoRA weight's identity, storage or in-place version (an
optimizer step, `load_state_dict`, `.to(device)`), or a scaling. Writes through `param.data` bypass the version
counter and are not seen; nothing in moerm writes LoRA weights that way.

Like peft's own mixed pass (which also installs hooks for the call), a model must not run two such calls at once.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from peft import LoraConfig, PeftModel
from peft.tuners import lora
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn


@dataclass
class _Layer:
    module: lora.Linear
    a_t: torch.Tensor  # (n, in, r): each slot's A^T, zero-padded to the layer's largest rank
    b_t: torch.Tensor  # (n, r, out): each slot's (scaling * B)^T, zero-padded the same way


@dataclass
class _Plan:
    adapters: tuple[tuple[str, int], ...]  # (name, id(config)) of every adapter of the model when built
    slots: dict[str, int]  # fusable adapter -> its slot in every layer's stacks
    layers: list[_Layer]  # the layers that carry a fusable adapter
    tuners: list[BaseTunerLayer]  # every adapter layer of the model: all switched off for the call
    weights: list[nn.Parameter]  # the stacked adapters' A and B
    stamp: tuple  # `_stamp` of the weights the stacks were built from
    device: torch.device


_PLANS: "weakref.WeakKeyDictionary[PeftModel, _Plan]" = weakref.WeakKeyDictionary()


def _adapters(model: PeftModel) -> tuple[tuple[str, int], ...]:
    return tuple((name, id(cfg)) for name, cfg in model.peft_config.items())


def _stamp(layers: Sequence[lora.Linear], slots: dict[str, int]) -> tuple:
    """What the stacks depend on: every stacked weight's identity, storage and version, and every scaling."""
    out: list = []
    for m in layers:
        for name in slots:
            if name in m.lora_A:
                a, b = m.lora_A[name].weight, m.lora_B[name].weight
                out += (id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version, m.scaling[name])
    return tuple(out)


def _carries(m: BaseTunerLayer, name: str) -> bool:
    return any(name in getattr(m, attr, {}) for attr in m.adapter_layer_names)


def _plain_lora(m: BaseTunerLayer, name: str) -> bool:
    """Whether layer `m`'s adapter `name` is `base(x) + scaling * B(A(dropout(x)))` on a linear layer, nothing else."""
    return (type(m) is lora.Linear and name not in m.lora_variant and not m.lora_bias.get(name, False)
            and isinstance(m.lora_A[name], nn.Linear) and isinstance(m.lora_B[name], nn.Linear))


def _build(model: PeftModel) -> _Plan:
    tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    wrapped = any(isinstance(m, AuxiliaryTrainingWrapper) for m in model.modules())
    names = [n for n, cfg in model.peft_config.items() if isinstance(cfg, LoraConfig) and not wrapped
             and all(_plain_lora(m, n) for m in tuner_layers if _carries(m, n))]
    layers = [m for m in tuner_layers if isinstance(m, lora.Linear) and any(n in m.lora_A for n in names)]
    weights = [w for m in layers for n in names if n in m.lora_A for w in (m.lora_A[n].weight, m.lora_B[n].weight)]
    if len({(w.dtype, w.device) for w in weights}) > 1:  # one dtype and device for every stack
        names, layers, weights = [], [], []
    slots = {n: i for i, n in enumerate(names)}
    device = weights[0].device if weights else torch.device("cpu")
    built = []
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, even if first called in inference mode
        for m in layers:
            here = [n for n in names if n in m.lora_A]
            rank = max(m.lora_A[n].weight.shape[0] for n in here)
            a_ref, b_ref = m.lora_A[here[0]].weight, m.lora_B[here[0]].weight
            a_t = a_ref.new_zeros((len(names), a_ref.shape[1], rank))  # (n, in, r)
            b_t = b_ref.new_zeros((len(names), rank, b_ref.shape[0]))  # (n, r, out)
            for n in here:
                a, b = m.lora_A[n].weight, m.lora_B[n].weight  # (r_n, in), (out, r_n)
                a_t[slots[n], :, : a.shape[0]] = a.t()
                b_t[slots[n], : b.shape[1], :] = (b * m.scaling[n]).t()
            built.append(_Layer(m, a_t, b_t))
    return _Plan(_adapters(model), slots, built, tuner_layers, weights, _stamp(layers, slots), device)


def _plan(model: PeftModel) -> _Plan:
    """The model's cached stacks, rebuilt first if anything they were made from has changed."""
    plan = _PLANS.get(model)
    if plan is None or plan.adapters != _adapters(model) or \
            plan.stamp != _stamp([layer.module for layer in plan.layers], plan.slots):
        plan = _PLANS[model] = _build(model)
    return plan


def _delta_hook(layer: _Layer, idx: torch.Tensor) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x, rows = args[0], idx.shape[0]
        if x.shape[0] != rows:
            raise RuntimeError(f"a LoRA layer got {x.shape[0]} rows where the batch routes {rows}")
        a_t, b_t = layer.a_t.index_select(0, idx), layer.b_t.index_select(0, idx)  # (B, in, r), (B, r, out)
        h = torch.bmm(x.reshape(rows, -1, x.shape[-1]).to(a_t.dtype), a_t)  # (B, L, r)
        base = out.reshape(rows, -1, out.shape[-1])  # (B, L, out)
        if base.dtype == b_t.dtype:
            return torch.baddbmm(base, h, b_t).view(out.shape)
        return (base + torch.bmm(h, b_t).to(base.dtype)).view(out.shape)

    return hook


def fused_step(model: PeftModel, names: Sequence[str]) -> AbstractContextManager[None] | None:
    """A context in which one forward of `model` (without `adapter_names`) sends row i through adapter `names[i]`.

    None where the fused step would not be exact (see the module docstring): the caller takes peft's path then.
    """
    if model.training or not names:
        return None
    plan = _plan(model)
    if any(n not in plan.slots for n in set(names)):
        return None
    if torch.is_grad_enabled() and any(w.requires_grad for w in plan.weights):
        return None  # the stacks are detached copies: a gradient to the adapters needs peft's pass
    if any(m.training or m.merged for m in plan.tuners):
        return None
    return _fused(plan, names)


@contextmanager
def _fused(plan: _Plan, names: Sequence[str]) -> Iterator[None]:
    idx = torch.tensor([plan.slots[n] for n in names], dtype=torch.long).to(plan.device, non_blocking=True)  # (B,)
    flags = [(m, m._disable_adapters) for m in plan.tuners]
    handles = []
    try:
        # every adapter layer off (a layer without a fusable adapter would otherwise add the active adapter's):
        # peft's own switch, which its `disable_adapters` reads; `enable_adapters` would also flip requires_grad
        for m in plan.tuners:
            m._disable_adapters = True
        for layer in plan.layers:
            handles.append(layer.module.register_forward_hook(_delta_hook(layer, idx)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags:
            m._disable_adapters = flag
