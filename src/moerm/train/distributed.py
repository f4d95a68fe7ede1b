"""The few multi-process facts the library needs, in one place: who is main, barriers, sharding and gathering.

Everything goes through accelerate's `PartialState`, which reads the launcher's environment (`torchrun`,
`accelerate launch`, or nothing: one process). With one process every function here is a cheap no-op, so callers
never branch on the world size themselves.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from accelerate import PartialState
from torch import nn


def _cpu_only() -> bool:
    """CPU processes: asked for (`ACCELERATE_USE_CPU=true`, `accelerate launch --cpu`), or a multi-process launch on
    a machine without CUDA (accelerate would otherwise treat each `torchrun` process as a world of one)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def state() -> PartialState:
    """The process group (initialised on first use: gloo on CPU, nccl on GPUs)."""
    return PartialState(cpu=_cpu_only())


def world_size() -> int:
    return state().num_processes


def rank() -> int:
    return state().process_index


def is_main() -> bool:
    return state().is_main_process


def device() -> torch.device:
    """The device this process trains and extracts features on (its GPU under a multi-GPU launch)."""
    return state().device


def barrier() -> None:
    state().wait_for_everyone()


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (e.g. fills a cache); the others wait, then run it (and hit the cache)."""
    with state().main_process_first():
        yield


def shard(n: int) -> list[int]:
    """This process's share of `n` items for evaluation: every world-th index, starting at its rank, padded (with
    repeats of item 0) to the same length on every process, so every process runs as many forward passes (a sharded
    model's forward is a collective). `gather_rows` drops the padding."""
    world = world_size()
    mine = list(range(rank(), n, world))
    return mine + [0] * (-(-n // world) - len(mine)) if n else mine


def gather_rows(local: Sequence[Any], n: int) -> list[Any]:
    """Undo `shard`: the full list of `n` per-item results, in item order, on every process."""
    world = world_size()
    if world == 1:
        return list(local)
    parts: list[list[Any] | None] = [None] * world
    torch.distributed.all_gather_object(parts, list(local)[: len(range(rank(), n, world))])  # without the padding
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        assert part is not None
        for j, value in enumerate(part):
            out[r + j * world] = value
    return out


def mean_across(values: Sequence[float]) -> list[float]:
    """Each value averaged over the processes (every process must call this at the same point)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return (t / world_size()).tolist()


def sum_across(values: Sequence[float]) -> list[float]:
    """Each value summed over the processes (every process must call this at the same point)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


# -- Sharded data parallelism (FSDP2) -------------------------------------------------------------------------------
# A Trainer shards its model when it starts (`shard_model`) and gives it back whole when it ends (`unshard_model`),
# so everything outside a Trainer (evaluation, feature caches, saving, the next component) sees plain modules as
# under DDP. While sharded, every forward/backward is a collective: every process must run as many as the others.


@dataclass
class Sharded:
    """A model while it is sharded: what `unshard_model` needs to give it back whole."""

    root: nn.Module
    modules: list[nn.Module]  # every module `fully_shard` was applied to, blocks first, the root last
    originals: dict[tuple[int, str], nn.Parameter]  # (id(module), name) -> the Parameter object it held before
    mesh: Any


def fsdp_wanted(cfg: Any) -> bool:
    """FSDP is on for this run: asked for (`train.fsdp.enabled`) and more than one process (one shards nothing)."""
    return bool(cfg is not None and cfg.enabled) and world_size() > 1


def transformer_blocks_of(model: nn.Module) -> list[nn.Module]:
    """Every transformer block inside `model` (of every backbone it holds): the items of a ModuleList named as Hugging
    Face names block lists (`layer`, `layers`, `h`, ...), each once."""
    from moerm.encoding.blocks import BLOCK_LIST_NAMES

    seen: set[int] = set()
    blocks: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            for block in module:
                if id(block) not in seen and any(True for _ in block.parameters()):
                    seen.add(id(block))
                    blocks.append(block)
    return blocks


def from_main(model: nn.Module) -> None:
    """Every process takes the main process's parameters and buffers, in place, as DDP does when it wraps a model.
    `fully_shard` keeps each process's own values for its shard, so a part built after the processes' random draws
    parted (a router built after a component trained with dropout on batches of different lengths) would otherwise
    be a mix of every process's draws."""
    if world_size() == 1:
        return
    dev = device()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            on_device = t.data.to(dev)
            torch.distributed.broadcast(on_device, src=0)
            if on_device is not t.data:
                t.data.copy_(on_device)


def shard_model(model: nn.Module, cfg: Any) -> Sharded:
    """Apply FSDP2 to `model` in place, as torchtune does: each transformer block, then the root (which takes the rest:
    embeddings, heads, routers), from the main process's values (`from_main`). Parameters become DTensors sharded
    over the processes; frozen ones are sharded too (only trainable ones get gradients). Build the optimizer after
    this, from the model's new parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dev = device()
    mesh = init_device_mesh(dev.type, (world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg.mixed_precision == "bf16" else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy(pin_memory=dev.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    from_main(model)
    originals = {(id(m), n): p for m in model.modules() for n, p in m._parameters.items() if p is not None}
    modules = [*transformer_blocks_of(model), model]
    # our step functions never write in place into a model's output, which is all this warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for m in modules:
        fully_shard(m, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp,
                     offload_policy=offload)
    for p in originals.values():  # their values live in the shards now: free the full copies
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return Sharded(model, modules, originals, mesh)


def reshard(sharded: Sharded) -> None:
    """Back to shards after a forward without backward (evaluation): with reshard_after_forward off, FSDP keeps the
    gathered parameters until a backward that never comes, and the optimizer's parameters would not be the model's."""
    for m in sharded.modules:
        m.reshard()  # type: ignore[operator]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor, on every process (a collective for a DTensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    local = t.to_local()
    if local.device.type != t.device_mesh.device_type:  # CPU-offloaded shards: gather them on the mesh's device
        t = DTensor.from_local(local.to(device()), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor()


def unshard_model(sharded: Sharded) -> None:
    """Give a sharded model back whole, in place: every process holds every parameter again (the same Parameter
    objects as before `shard_model`, now with the trained values), no FSDP hook or class is left, and it can be
    sharded again by a later Trainer. Every process must call this."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule, fully_shard

    root = sharded.root
    with torch.no_grad():
        full = {(id(m), n): full_tensor(p) for m in root.modules() for n, p in m._parameters.items() if p is not None}
    for m in sharded.modules:
        state = fully_shard.state(m)  # type: ignore[attr-defined]
        for group in state._fsdp_param_groups:
            for handles in (group._module_to_pre_save_state_dict_hook_handle,
                            group._module_to_pre_load_state_dict_hook_handle):
                for handle in handles.values():
                    handle.remove()
            for fp in group.fsdp_params:
                fp._post_load_hook_handle.remove()
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        states = m.__dict__.get(STATE_KEY, {})
        for fn in [fn for fn, st in states.items() if st is state]:
            del states[fn]
        m.__dict__.get(REGISTRY_KEY, {}).pop("fully_shard", None)
        for key in (STATE_KEY, REGISTRY_KEY):
            if key in m.__dict__ and not m.__dict__[key]:
                del m.__dict__[key]
        _module_state_mapping.pop(m, None)
        cls = type(m)
        if issubclass(cls, FSDPModule):
            m.__class__ = next(b for b in cls.__bases__ if b is not FSDPModule)
    for m in root.modules():
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            m.__dict__.pop(attr, None)
        for n in list(m._parameters):
            key = (id(m), n)
            if key in full:
                orig = sharded.originals.get(key)
                value = full[key].detach()
                if orig is None:
                    orig = nn.Parameter(value, requires_grad=m._parameters[n].requires_grad)
                else:
                    orig.data = value.to(orig.dtype)
                    orig.grad = None
                m._parameters[n] = orig


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient accumulation without communication: off for the micro-batches before an optimizer step (DDP's
    `no_sync`, FSDP's `set_requires_gradient_sync`), on for the last."""
    from torch.distributed.fsdp import FSDPModule

    if enabled:
        yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole, in CPU memory on the main process ({} on the others): gathered one
    parameter at a time, so no device holds them all at once. Every process must call this."""
    out: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            whole = full_tensor(p.detach())
            if is_main():
                out[n] = whole.cpu()
    return out


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, whole, on the main process (others get {}): a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole (gathered) trainable weights into a sharded model: each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state keyed by parameter name into the optimizer of a sharded or a plain model (each
    process keeps its shard), whatever the number of processes that wrote it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# -- Sharded checkpoints (train.fsdp.checkpoint=sharded): each process's own shards, never gathered -----------------


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This process's shard of every trainable parameter, by name, in CPU memory (no communication)."""
    return {n: _local(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (torch.distributed.checkpoint's sharded state dict), each
    DTensor as this process's shard; `local` names the `<param>.<key>` entries that were shards."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    state = get_optimizer_state_dict(model, optimizer)
    local = sorted(f"{n}.{k}" for n, s in state["state"].items() for k, v in s.items() if isinstance(v, DTensor))
    return {"state": {n: {k: _local(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                      for n, s in state["state"].items()},
            "param_groups": state["param_groups"], "local": local}


def load_local_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load this process's shards (`local_trainable_state` of the same number of processes) into a sharded model."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                shard = _local(p)
                if shard.shape != state[n].shape:
                    raise ValueError(f"{n}: a shard of shape {tuple(state[n].shape)}, this process holds "
                                     f"{tuple(shard.shape)}")
                shard.copy_(state[n])


def load_local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load `local_optimizer_state` (written by this process, the same number of processes) into the optimizer of
    the sharded model: each shard becomes a DTensor laid out as its parameter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    local = set(state.get("local", ()))

    def whole(name: str, key: str, value: Any) -> Any:
        p = params[name]
        if f"{name}.{key}" not in local or not isinstance(p, DTensor):
            return value
        return DTensor.from_local(value.to(p.to_local().device), p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    sharded = {"state": {n: {k: whole(n, k, v) for k, v in s.items()} for n, s in state["state"].items()},
               "param_groups": state["param_groups"]}
    set_optimizer_state_dict(model, optimizer, sharded, options=StateDictOptions(full_state_dict=False))
