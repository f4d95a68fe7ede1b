"""Measurements the bench takes of trained systems: throughput side by side, trained parameters, time per epoch.

`timed_round_robin` is the measurement of benchmarks/inference_throughput.py, moved into the library.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from moerm.config import RunConfig, from_dict
from moerm.data.schema import PreferencePair


def timed_round_robin(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of every repeat per run; one warm-up each, then repeats interleaved so machine drift hits all alike."""
    for fn in runs.values():
        fn()  # warm-up: allocator, lazy init, thread pools
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
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


def component_epochs(config: RunConfig, component: str) -> float | None:
    """How many epochs a component trained for (None with train.max_steps): the run's epochs, or the component's
    own (routers: options.router_epochs; DMoERM experts: expert_epochs; its aggregator: aggregator_epochs)."""
    from moerm.systems.base import get_system_class

    t = config.train
    cls = get_system_class(config.system)
    opts = from_dict(cls.options_class, config.options, "options") if cls.options_class else None
    if component == "router" and opts is not None and hasattr(opts, "router_epochs"):
        return float(opts.router_epochs)
    if t.max_steps:
        return None
    if component.endswith(":phase3") and hasattr(opts, "aggregator_epochs"):
        return float(opts.aggregator_epochs)
    if ":expert:" in component and hasattr(opts, "expert_epochs"):
        return float(opts.expert_epochs or t.epochs)
    return float(t.epochs)


def seconds_per_epoch(config: RunConfig, seconds: dict[str, float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for comp, sec in seconds.items():
        ep = component_epochs(config, comp)
        out[comp] = sec / ep if ep else None
    return out
