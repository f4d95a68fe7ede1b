"""Measurements the bench takes of trained systems: throughput side by side, trained parameters, time per epoch.

`timed_round_robin` is the measurement of benchmarks/inference_throughput.py, moved into the library.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from moerm.data.schema import PreferencePair


def environment(device: str = "cpu") -> dict[str, Any]:
    """Where a figure was measured: versions, threads, device, and the load average (1, 5, 15 min) beside it."""
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": device, "platform": platform.platform(), "load_average": load}


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # the CPU seconds of this process, every thread summed: what a run costs whatever else the machine runs (a
    # shared machine's load stretches wall time, not this), at the price of not seeing time spent waiting
    "cpu": time.process_time,
}


def timed_round_robin(runs: dict[str, Callable[[], Any]], repeats: int, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds of every repeat per run (`clock`: wall or cpu, `CLOCKS`); one warm-up each, then repeats interleaved
    so machine drift hits all alike."""
    now = CLOCKS[clock]
    for fn in runs.values():
        fn()  # warm-up: allocator, lazy init, thread pools
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = now()
            fn()
            times[name].append(now() - t0)
    return times


def timed_alone(fn: Callable[[], Any], repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def throughput_row(times: Sequence[float], pairs: int) -> dict[str, Any]:
    sec = statistics.median(times)
    return {"seconds": sec, "seconds_all": list(times), "seconds_per_pair": sec / pairs,
            "pairs_per_second": pairs / sec if sec > 0 else math.inf}


def inference_batch(pairs: Sequence[PreferencePair], n: int, seed: int) -> list[PreferencePair]:
    """`n` held-out pairs spread evenly over the domains, shuffled so every forward batch mixes domains."""
    rng = random.Random(seed)
    by: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        by.setdefault(p.domain, []).append(p)
    for v in by.values():
        rng.shuffle(v)
    out: list[PreferencePair] = []
    while len(out) < n and any(by.values()):
        for d in sorted(by):
            if by[d] and len(out) < n:
                out.append(by[d].pop())
    rng.shuffle(out)
    return out


def trained_params(run_dir: Path) -> dict[str, int]:
    """Parameters each trainer updated, from the last checkpoint of every component (its trainable tensors).

    A loaded system freezes what it does not need to train further, so `describe` cannot tell what was trained;
    the checkpoints can: each holds exactly the tensors its component's optimizer updated.
    """
    from safetensors import safe_open

    from moerm.train.checkpoint import latest_checkpoint

    out: dict[str, int] = {}
    for root in sorted(p for p in Path(run_dir).rglob("checkpoints") if p.is_dir()):
        ckpt = latest_checkpoint(root)
        if ckpt is None:
            continue
        n = 0
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            for k in f.keys():
                n += math.prod(f.get_slice(k).get_shape())
        out[str(root.parent.relative_to(run_dir))] = n
    return out


def seconds_per_epoch(seconds: dict[str, float], epochs: dict[str, float | None]) -> dict[str, float | None]:
    """Each component's training seconds per epoch, from the epochs it recorded (None: it ran fixed steps)."""
    return {comp: sec / ep if (ep := epochs.get(comp)) else None for comp, sec in seconds.items()}
