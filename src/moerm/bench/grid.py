"""The grid of cells (system x seed): train, evaluate, measure; resumable cell by cell.

    OUT/bench.yaml                     the resolved bench config (a rerun must match it but for the grid's extent
                                       and the measurement settings: presets.REUSABLE_KEYS)
    OUT/data/                          the same sampled pairs for every cell (see bench/data.py)
    OUT/runs/<system>/seed-<n>/        a run folder (moerm.runs.train_run) + cell.json once evaluated
    OUT/inference.json                 the side-by-side throughput measurement
    OUT/runs/.../bon_rewards.json      each cell's rewards of the Best-of-N candidates (human-scored domains only)
    OUT/wall.json                      the wall time of every `moerm bench` run into OUT (the report states it)
    OUT/report.md, results.json, plots/

A cell whose cell.json exists is done and skipped. A cell with a run folder but no cell.json resumes: a finished
training (train_summary.json + model/) is only evaluated; a killed one continues from its checkpoints.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from rich.console import Console

from moerm.bench.bon import bench_best_of_n
from moerm.bench.data import Prepared, prepare
from moerm.bench.measure import (
    environment, inference_batch, seconds_per_epoch, throughput_row, timed_alone, timed_round_robin, trained_params,
)
from moerm.bench.presets import BenchConfig, check_moved_keys, run_config
from moerm.config import ConfigError, from_dict
from moerm.encoding.trunk import trunk_cache_at_inference
from moerm.eval.metrics import evaluate_system
from moerm.runs import train_run
from moerm.systems.base import SYSTEM_FILE, find_model_dir, load_system
from moerm.atomic import atomic_write_text
from moerm.train.trainer import TrainingInterrupted

CELL_FILE = "cell.json"


@dataclass(frozen=True)
class Cell:
    system: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.system}/seed-{self.seed}"

    def dir(self, out: Path) -> Path:
        return out / "runs" / self.system / f"seed-{self.seed}"


class _TqdmFile(io.TextIOBase):
    """Rich output routed through tqdm.write, so lines print above the progress bars instead of through them."""

    def write(self, s: str) -> int:
        from tqdm.auto import tqdm

        if s.strip():
            tqdm.write(s.rstrip("\n"))
        return len(s)


def check_bench_folder(cfg: BenchConfig, out: Path) -> None:
    """Write OUT/bench.yaml; a folder holding another bench (other data, backbone or budget) is refused."""
    path = out / "bench.yaml"
    if path.exists():
        saved = yaml.safe_load(path.read_text()) or {}
        try:
            check_moved_keys(saved)
            old = from_dict(BenchConfig, saved).fingerprint()
        except ConfigError as e:
            raise ConfigError(f"{out} holds a bench of an older moerm that this one cannot compare ({path}: {e}); "
                              "use another --out") from None
        new = cfg.fingerprint()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ConfigError(f"{out} holds a bench with different settings ({', '.join(diff)}); finished cells "
                              f"would not be comparable: use another --out, or the settings in {path}")
    atomic_write_text(path, cfg.to_yaml())


def run_cell(cfg: BenchConfig, cell: Cell, prepared: Prepared, out: Path, progress: bool = True,
             console: Console | None = None, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) one cell, evaluate it on the held-out pairs, write cell.json atomically."""
    d = cell.dir(out)
    t0 = time.perf_counter()
    extra = prepared.extra_options(cell.system)
    if cell.system == "ensemble" and cfg.ensemble_members_from:
        extra = {**extra, "member_runs": member_cells(cfg, cell, out)}
    rc = run_config(cfg, cell.system, cell.seed, prepared.backbone, prepared.train_paths(cell.system),
                    feature_cache=str((out / "cache" / "features").resolve()),
                    extra_options=extra,
                    trunk_cache=str((out / "cache" / "trunk").resolve()))
    trained = (d / "train_summary.json").exists() and (d / "model" / SYSTEM_FILE).exists()
    resumed = (d / "config.yaml").exists() and not trained
    if trained:
        summary = json.loads((d / "train_summary.json").read_text())
    else:
        if resumed and console is not None:
            console.print(f"[yellow]{cell.name}:[/] resuming its killed training from the checkpoints", highlight=False)
        summary = train_run(rc, d, command=f"moerm bench (cell {cell.name})", resume=resumed, progress=progress,
                            console=None if resumed else console, stop_after_steps=stop_after_steps)
    t_train = time.perf_counter() - t0
    params_path = d / "params_trained.json"  # computed once: the checkpoints may be pruned after the cell
    if params_path.exists():
        params = json.loads(params_path.read_text())
    else:
        params = trained_params(d)
        atomic_write_text(params_path, json.dumps(params, indent=2))
    model_dir = find_model_dir(d)
    system = load_system(model_dir, device=cfg.resolved_device())
    with trunk_cache_at_inference(system) if cfg.eval_trunk_cache else nullcontext():  # top tuning: the trunk once
        evals = evaluate_cell(cfg, system, prepared.test_pairs(cell.system))
    info = system.describe(model_dir)
    if info.get("backbone") == prepared.backbone:  # the backbone as the bench config names it, not this machine's path
        info["backbone"] = cfg.backbone
    seconds = summary["seconds_per_component"]
    per_epoch = seconds_per_epoch(seconds, summary.get("epochs_per_component", {}))
    result = {
        "system": cell.system, "seed": cell.seed, "run_dir": str(d.relative_to(out)),
        "inference_mode": system.default_mode,
        "routed": bool(system.routed),
        **evals,
        "size": info,
        "params_trained": params,
        "train_seconds": summary["train_seconds"],
        "seconds_per_component": seconds,
        "seconds_per_epoch": per_epoch,
        "train_seconds_per_epoch": sum(v for v in per_epoch.values() if v is not None),
        "train_metrics": summary.get("metrics", {}),
        "learning": learning_curves(d),
        "resumed_training": resumed,
        "wall_seconds": {"train": t_train, "total": time.perf_counter() - t0},
    }
    atomic_write_text(d / CELL_FILE, json.dumps(result, indent=2))
    if cfg.prune_checkpoints:
        for ckpt in [p for p in d.rglob("checkpoints") if p.is_dir()]:
            shutil.rmtree(ckpt, ignore_errors=True)
    return result


def member_cells(cfg: BenchConfig, cell: Cell, out: Path) -> list[str]:
    """The finished cells (run folders) an ensemble cell combines (`ensemble_members_from`)."""
    src = str(cfg.ensemble_members_from)
    cells = [Cell(src, s) for s in cfg.ensemble_member_seeds(cell.seed)]
    missing = [c.name for c in cells if not (c.dir(out) / "model" / SYSTEM_FILE).exists()]
    if missing:
        raise RuntimeError(f"the ensemble of seed {cell.seed} combines the cells {', '.join(c.name for c in cells)}; "
                           f"{', '.join(missing)} did not finish")
    return [str(c.dir(out).resolve()) for c in cells]


def evaluate_cell(cfg: BenchConfig, system: Any, pairs: list[Any]) -> dict[str, Any]:
    """The cell's evaluations, each pair scored once the way its group is scored (plus the oracle upper bound).

    `eval`: the pairs of domains scored as deployed (routed systems route with their own router);
    `eval_domain_given`: the pairs of `domain_given` groups, each pair's domain passed to `score` (every system; one
    that does not route ignores it); `eval_oracle_routing` (with `oracle_routing`, routed systems): the `eval` pairs
    again with their true domain given, the upper bound that isolates the domain RMs from routing errors.
    """
    given = set(cfg.given_domains())
    own = [p for p in pairs if p.domain not in given]
    told = [p for p in pairs if p.domain in given]
    bs = cfg.eval_batch_size
    out: dict[str, Any] = {}
    if own:
        out["eval"] = evaluate_system(system, own, batch_size=bs)
    if told:
        out["eval_domain_given"] = evaluate_system(system, told, batch_size=bs, oracle_domains=True)
    if own and cfg.oracle_routing and system.routed:
        out["eval_oracle_routing"] = evaluate_system(system, own, batch_size=bs, oracle_domains=True)
    return out


def learning_curves(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per trained component, its mean training accuracy in its first and in its last epoch (from metrics.jsonl).

    The report's budget ablation: a component still gaining in its last epoch was stopped by the budget.
    """
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(run_dir).rglob("metrics.jsonl")):
        by_epoch: dict[int, dict[int, float]] = {}
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "accuracy" in row and "epoch" in row and "step" in row:  # eval lines carry other keys
                by_epoch.setdefault(int(row["epoch"]), {})[int(row["step"])] = float(row["accuracy"])
        if not by_epoch:
            continue
        first, last = min(by_epoch), max(by_epoch)
        mean = {e: sum(v.values()) / len(v) for e, v in by_epoch.items()}
        name = str(path.parent.relative_to(run_dir)) if path.parent != Path(run_dir) else "."
        out[name] = {"epochs": last - first + 1, "first_epoch_accuracy": mean[first],
                     "last_epoch_accuracy": mean[last]}
    return out


def _score_fn(system: Any, prompts: list[str], responses: list[str], batch_size: int, mode: str | None) -> Callable[[], Any]:
    if mode is None:
        return lambda: system.score(prompts, responses, batch_size=batch_size)
    return lambda: system.score(prompts, responses, batch_size=batch_size, mode=mode)


def inference_rows(cfg: BenchConfig, runs: dict[str, Path], default_modes: dict[str, str | None]
                   ) -> list[tuple[str, str, str]]:
    """(row, system, mode): each system in its default mode; with `inference.all_modes`, a row per other mode of its
    `inference_modes` too, named "<system> (<mode>)"."""
    from moerm.systems.base import get_system_class

    rows: list[tuple[str, str, str]] = []
    for s, path in runs.items():
        modes = get_system_class(s).inference_modes
        default = default_modes.get(s) or load_system(path, device="cpu").default_mode  # a cell.json from before
        rows.append((s, s, default))
        if cfg.inference.all_modes:
            rows += [(f"{s} ({m})", s, m) for m in modes if m != default]
    return rows


def measure_inference(cfg: BenchConfig, out: Path, runs: dict[str, Path], prepared: Prepared,
                      console: Console | None = None, default_modes: dict[str, str | None] | None = None
                      ) -> dict[str, Any]:
    """Every system scores the same mixed-domain batch; the median of interleaved repeats per row."""
    inf = cfg.inference
    rows = inference_rows(cfg, runs, default_modes or {})
    batch = inference_batch(prepared.test_pairs(), inf.pairs, inf.seed)
    n = len(batch)
    key = {"rows": [[r[0], r[2]] for r in rows], "runs": {s: _shown(p, out) for s, p in runs.items()}, "pairs": n,
           "batch_size": inf.batch_size, "repeats": inf.repeats, "interleave": inf.interleave, "seed": inf.seed,
           "device": cfg.resolved_device(), "threads": torch.get_num_threads()}
    path = out / "inference.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
    if console is not None:
        console.print(f"inference: {len(rows)} rows on the same {n} pairs ({2 * n} sequences), "
                      f"{inf.repeats} repeats{' interleaved' if inf.interleave else ''}", highlight=False)
    prompts = [p.prompt for p in batch] * 2
    responses = [p.chosen for p in batch] + [p.rejected for p in batch]
    device = cfg.resolved_device()
    times: dict[str, list[float]] = {}
    if inf.interleave:
        loaded = {s: load_system(p, device=device) for s, p in runs.items()}
        fns = {row: _score_fn(loaded[s], prompts, responses, inf.batch_size, mode) for row, s, mode in rows}
        times = timed_round_robin(fns, inf.repeats)
        del loaded, fns
    else:
        for s, p in runs.items():
            system = load_system(p, device=device)
            for row, sys_name, mode in rows:
                if sys_name == s:
                    times[row] = timed_alone(_score_fn(system, prompts, responses, inf.batch_size, mode), inf.repeats)
            del system
    table = {row: {"system": s, "mode": mode, **throughput_row(times[row], n)} for row, s, mode in rows}
    base = table.get("baseline", {}).get("seconds")
    for row in table.values():
        row["time_vs_baseline"] = row["seconds"] / base if base else None
    result = {"key": key, "pairs": n, "sequences": 2 * n, "domains": sorted({p.domain for p in batch}),
              "batch_size": inf.batch_size, "repeats": inf.repeats, "interleave": inf.interleave,
              "rows": table, "environment": environment(key["device"])}
    atomic_write_text(path, json.dumps(result, indent=2))
    return result


def _shown(path: Path, out: Path) -> str:
    """A path inside the bench folder as results.json records it: relative to OUT."""
    try:
        return str(Path(path).relative_to(out))
    except ValueError:
        return str(path)


def record_wall(out: Path, started: float, seconds: float) -> dict[str, Any]:
    """Append this run's wall time to OUT/wall.json; the bench's wall time is the sum over the runs into OUT."""
    path = out / "wall.json"
    runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    runs.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "seconds": seconds})
    wall = {"seconds": sum(r["seconds"] for r in runs), "this_run_seconds": seconds, "runs": runs}
    atomic_write_text(path, json.dumps(wall, indent=2))
    return wall


def run_bench(cfg: BenchConfig, out: Path, progress: bool = True, console: Console | None = None, command: str = "",
              stop_after_steps: int | None = None) -> dict[str, Any]:
    """Run (or resume) the whole grid, measure inference, and write report.md, results.json and the plots."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(cfg, Path(out), progress, console, command, stop_after_steps)
    finally:
        torch.set_num_threads(threads)


def _run_bench(cfg: BenchConfig, out: Path, progress: bool, console: Console | None, command: str,
               stop_after_steps: int | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from moerm.bench.report import build_results, write_report

    started, w0 = time.time(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    check_bench_folder(cfg, out)
    if command:
        atomic_write_text(out / "command.txt", command + "\n")
    if console is not None and progress:
        console = Console(file=_TqdmFile(), soft_wrap=True, highlight=False)  # type: ignore[arg-type]
    prepared = prepare(cfg, out)
    skipped = prepared.skipped  # systems whose bench plan keeps them out (e.g. no labels they need)
    cells = [Cell(s, seed) for s in cfg.systems if s not in skipped for seed in cfg.seeds]
    done = {c: json.loads((c.dir(out) / CELL_FILE).read_text()) for c in cells if (c.dir(out) / CELL_FILE).exists()}
    failed: dict[str, str] = {}
    bar = tqdm(total=len(cells), initial=len(done), desc="bench", unit="cell", disable=not progress or None,
               dynamic_ncols=True, position=0)
    t0 = time.perf_counter()
    try:
        for cell in cells:
            if cell in done:
                continue
            bar.set_postfix_str(cell.name)
            try:
                done[cell] = run_cell(cfg, cell, prepared, out, progress=progress, console=console,
                                      stop_after_steps=stop_after_steps)
            except (TrainingInterrupted, KeyboardInterrupt):
                raise
            except Exception as e:  # one broken cell must not cost the others; its error is in the report
                failed[cell.name] = f"{type(e).__name__}: {e}"
                cell.dir(out).mkdir(parents=True, exist_ok=True)
                atomic_write_text(cell.dir(out) / "error.txt", traceback.format_exc())
                if console is not None:
                    console.print(f"[red]{cell.name} failed:[/] {failed[cell.name]}", highlight=False)
            bar.update(1)
    finally:
        bar.close()
    runs: dict[str, Path] = {}
    modes: dict[str, str | None] = {}  # each timed cell's default inference mode
    for s in cfg.systems:  # the first finished seed of each system is timed
        for seed in cfg.seeds:
            if Cell(s, seed) in done:
                runs[s] = Cell(s, seed).dir(out)
                modes[s] = done[Cell(s, seed)].get("inference_mode")
                break
    inference = measure_inference(cfg, out, runs, prepared, console, modes) if runs else {}
    best_of_n = bench_best_of_n(cfg, prepared.test_pairs(), {s: [c.dir(out) for c in cells if c.system == s and c in done]
                                                             for s in cfg.systems}, prepared.plans, console)
    finished = {c.name: {**done[c], "run_dir": _shown(c.dir(out), out)} for c in cells if c in done}  # relative to OUT
    results = build_results(cfg, finished, inference, prepared, skipped, failed)
    if best_of_n is not None:  # the held-out pairs hold human-scored domains
        results["best_of_n"] = best_of_n
    results["command"] = command
    results["grid_seconds_this_run"] = time.perf_counter() - t0
    results["wall"] = record_wall(out, started, time.perf_counter() - w0)
    paths = write_report(out, results)
    return {"results": results, "failed": failed, **paths}
