"""`moerm bench`: every system on the same data, backbone, budget and seeds, with tables and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moerm.cli.common import command_line, console, fail, parse_seeds, quiet_hf, run_guarded, set_option


def bench(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="output folder (rerun the same command to resume)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="smoke | cpu-small | cpu-medium | paper (configs/bench/)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="bench YAML, applied over the preset"),
    systems: Optional[str] = typer.Option(None, "--systems", help="comma-separated subset, e.g. baseline,rodos"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated integer seeds (default: the preset's)"),
    data: Optional[list[str]] = typer.Option(None, "--data", help="training files or folders (instead of the preset's)"),
    eval_data: Optional[list[str]] = typer.Option(None, "--eval-data", help="held-out files or folders"),
    set_: Optional[list[str]] = set_option("--set train.lr=1e-4 --set per_system.rodos.options.router_epochs=5"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Every system on the same data, backbone, budget and seeds: accuracy, size/cost and inference tables + plots."""
    from moerm.bench import load_bench_config
    from moerm.bench.grid import run_bench

    quiet_hf()
    command = command_line(ctx)

    def go() -> None:
        overrides = []
        if systems:
            overrides.append("systems=" + json.dumps([s for s in systems.split(",") if s]))
        seed_list = parse_seeds(seeds)
        if seed_list is not None:
            overrides.append("seeds=" + json.dumps(seed_list))
        if data:
            # your data instead of the preset's: its domains and held-out files too (--set domains=[...] to filter)
            overrides.extend(["data=" + json.dumps(data), "data_fallback=[]", "synthetic_data=false", "domains=null",
                              "eval_data=[]"])
        if eval_data:
            overrides.append("eval_data=" + json.dumps(eval_data))
        overrides.extend(set_ or [])
        cfg = load_bench_config(preset, config, overrides)
        result = run_bench(cfg, out, progress=progress, console=console, command=command)
        console.print(f"[green]report:[/] {result['report']}", highlight=False)
        if result["failed"]:
            fail(f"{len(result['failed'])} cell(s) failed: {', '.join(result['failed'])} (rerun to retry them)")

    run_guarded(go, run_dir=out)


def register(app: typer.Typer) -> None:
    app.command()(bench)
