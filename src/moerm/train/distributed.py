"""The few multi-process facts the library needs, in one place: who is main, barriers, sharding and gathering.

Everything goes through accelerate's `PartialState`, which reads the launcher's environment (`torchrun`,
`accelerate launch`, or nothing: one process). With one process every function here is a cheap no-op, so callers
never branch on the world size themselves.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from accelerate import PartialState


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
    """This process's share of `n` items for evaluation: every world-th index, starting at its rank."""
    return list(range(rank(), n, world_size()))


def gather_rows(local: Sequence[Any], n: int) -> list[Any]:
    """Undo `shard`: the full list of `n` per-item results, in item order, on every process."""
    world = world_size()
    if world == 1:
        return list(local)
    parts: list[list[Any] | None] = [None] * world
    torch.distributed.all_gather_object(parts, list(local))
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
