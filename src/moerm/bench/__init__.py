"""`moerm bench`: every system on the same data, backbone, budget and seeds; accuracy, size, cost and speed tables."""

from moerm.bench.presets import PRESETS, BenchConfig, all_systems, load_bench_config

__all__ = ["PRESETS", "BenchConfig", "all_systems", "load_bench_config", "run_bench"]


def run_bench(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See moerm.bench.grid.run_bench (imported lazily: it pulls in torch and every system)."""
    from moerm.bench.grid import run_bench as _run

    return _run(*args, **kwargs)
