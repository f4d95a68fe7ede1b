"""Run folders: train a configured system into one, evaluate saved runs, read scoring requests.

A run folder holds `config.yaml` (resolved), `command.txt`, `data.json` (what was read, what was invalid),
`metrics.jsonl`, `checkpoints/`, `model/` (the saved system) and `train_summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import yaml
from accelerate.utils import set_seed
from rich.console import Console

from moerm.config import ConfigError, RunConfig, from_dict
from moerm.data.grouping import count_prompts, sample_round_robin
from moerm.data.readers import DataError, load_pairs, resolve_data_paths
from moerm.data.schema import PreferencePair
from moerm.eval.metrics import aggregate_runs, compare_runs, evaluate_system, pair_index
from moerm.eval.report import accuracy_table, aggregate_table, comparison_table
from moerm.systems.base import FitContext, build_system, find_model_dir, load_system
from moerm.train import distributed
from moerm.train.checkpoint import atomic_write_text


def cap_per_domain(pairs: Sequence[PreferencePair], cap: int | None, seed: int) -> list[PreferencePair]:
    """At most `cap` pairs per domain, drawn with a fixed seed (order within the sample kept)."""
    if cap is None:
        return list(pairs)
    by: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by[p.domain].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for idx in by.values():
        keep.update(idx if len(idx) <= cap else rng.sample(idx, cap))
    return [p for i, p in enumerate(pairs) if i in keep]


def _domain_counts(pairs: Sequence[PreferencePair]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for p in pairs:
        counts[p.domain] += 1
    return dict(sorted(counts.items()))


def held_out_overlap(train: Sequence[PreferencePair], evals: Sequence[PreferencePair]) -> int:
    """How many held-out pairs the training data holds too (the same id, or the same prompt, chosen and rejected)."""
    ids = {p.id for p in train}
    texts = {(p.prompt, p.chosen, p.rejected) for p in train}
    return sum(p.id in ids or (p.prompt, p.chosen, p.rejected) in texts for p in evals)


def data_fingerprint(train: Sequence[PreferencePair], evals: Sequence[PreferencePair]) -> str:
    """A hash of exactly the pairs a run trains and evaluates on (texts, domains, margins, order)."""
    h = hashlib.sha256()
    for split, pairs in (("train", train), ("eval", evals)):
        h.update(f"{split}:{len(pairs)}".encode())
        for p in pairs:
            h.update(json.dumps([p.id, p.domain, p.prompt, p.chosen, p.rejected, p.margin], ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def default_eval_paths(train_paths: Sequence[str]) -> list[str]:
    """When every --data path is a folder, its test* files are the held-out set."""
    if not train_paths or not all(Path(p).is_dir() for p in train_paths):
        return []
    try:
        return [str(p) for p in resolve_data_paths(train_paths, split="test")]
    except DataError:
        return []


def load_run_data(cfg: RunConfig, console: Console | None = None) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
    """Read, validate and cap the training and held-out pairs of a run."""
    d = cfg.data
    if not d.train:
        raise ConfigError("no training data: pass --data PATH")
    train, train_report = load_pairs(d.train, split="train", on_invalid=d.on_invalid, column_map=d.column_map)
    eval_paths = (list(d.eval) or default_eval_paths(d.train)) if d.eval_during_training else []
    evals, eval_report = (load_pairs(eval_paths, split="test", on_invalid=d.on_invalid, column_map=d.column_map)
                          if eval_paths else ([], None))
    for name, rep in (("train", train_report), ("eval", eval_report)):
        if rep is not None and rep.n_invalid and console is not None:
            console.print(f"[yellow]{name} data:[/] {rep.summary()}", highlight=False)
    train = cap_per_domain(train, d.max_train_pairs_per_domain, cfg.train.seed)
    evals = sample_round_robin(evals, d.max_eval_pairs_per_domain, cfg.train.seed)  # one pair per prompt in turn
    overlap = held_out_overlap(train, evals)
    if overlap and console is not None:
        console.print(f"[yellow]warning:[/] {overlap} of {len(evals)} held-out pairs also appear in the training data "
                      "(same id, or same prompt and replies): held-out accuracy will be optimistic", highlight=False)
    info = {
        "fingerprint": data_fingerprint(train, evals),
        "train_files": [str(p) for p in resolve_data_paths(d.train, split="train")],
        "eval_files": eval_paths,
        "train_pairs": _domain_counts(train),
        "eval_pairs": _domain_counts(evals),
        "train_prompts": count_prompts(train),
        "eval_prompts": count_prompts(evals),
        "train_invalid": train_report.summary() if train_report.n_invalid else None,
        "eval_invalid": eval_report.summary() if eval_report is not None and eval_report.n_invalid else None,
    }
    return train, evals, info


def train_run(cfg: RunConfig, run_dir: Path, command: str = "", resume: bool = False, progress: bool = True,
              console: Console | None = None, stop_after_steps: int | None = None,
              allow_data_change: bool = False) -> dict[str, Any]:
    """Train `cfg` into `run_dir` (or resume it) and save the system to run_dir/model."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    # Every process looks before any process writes: they all see the same folder, so they agree on the outcome.
    existed = cfg_path.exists()
    distributed.barrier()
    if existed:
        if not resume:
            raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
        saved = from_dict(RunConfig, yaml.safe_load(cfg_path.read_text()))
        if _differs(saved, cfg) and console is not None:
            console.print("[yellow]resuming with the run's saved config.yaml (command-line changes ignored)[/]")
        cfg = saved
    train, evals, data_info = load_run_data(cfg, console)
    saved_data = run_dir / "data.json"
    if existed and saved_data.exists() and not allow_data_change:
        before = json.loads(saved_data.read_text()).get("fingerprint")
        if before is not None and before != data_info["fingerprint"]:
            raise ConfigError(f"{run_dir}: the training or held-out data changed since this run started (data "
                              f"fingerprint {before} -> {data_info['fingerprint']}); resuming would mix two datasets. "
                              "Restore the data, train into a new --out, or pass --allow-data-change")
    if console is not None:
        world = distributed.world_size()
        console.print(f"[bold]{cfg.system}[/] ({cfg.model.tuning}, {cfg.model.backbone}): "
                      f"{len(train)} training pairs ({sum(data_info['train_prompts'].values())} prompts) in "
                      f"{len(data_info['train_pairs'])} domains, {len(evals)} held-out pairs"
                      + (f" ({sum(data_info['eval_prompts'].values())} prompts)" if evals else "") + (f", {world} processes" if world > 1 else ""), highlight=False)
    # Seed before anything random is built (heads, routers, adapters): this torch build seeds randomly at import,
    # so without it the same command twice trains different weights.
    set_seed(cfg.train.seed)
    system = build_system(cfg)
    cfg = system.config  # the system resolves `auto` fields
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_path, cfg.to_yaml())
        atomic_write_text(run_dir / "command.txt", command + "\n")
        atomic_write_text(run_dir / "data.json", json.dumps(data_info, indent=2))
    distributed.barrier()
    result = system.fit(train, evals or None, FitContext(run_dir, resume=resume, progress=progress,
                                                          stop_after_steps=stop_after_steps))
    model_dir = run_dir / "model"
    summary = {"system": cfg.system, "model_dir": str(model_dir), "metrics": result.metrics,
               "seconds_per_component": result.seconds_per_component,
               "epochs_per_component": result.epochs_per_component,
               "train_seconds": sum(result.seconds_per_component.values()),
               "processes": distributed.world_size()}
    if distributed.is_main():  # one save, by one process; the others wait until it is complete
        system.save(model_dir)
        atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2))
    distributed.barrier()
    return summary


def _differs(saved: RunConfig, given: RunConfig) -> bool:
    """Whether the command line asked for something else than the saved run: `auto` fields the system resolved at
    build time (model.tuning), and DMoERM's tasks file written inline, are not differences."""
    a, b = saved.to_dict(), given.to_dict()
    if b["model"].get("tuning") == "auto":
        b["model"]["tuning"] = a["model"].get("tuning")
    for key in ("lr", "head_lr"):  # unset: the tuning mode's default, which the saved config records
        if b["train"].get(key) is None and given.train.lr is None:
            b["train"][key] = a["train"].get(key)
    if b["options"].get("tasks_file") and a["options"].get("tasks") and not a["options"].get("tasks_file"):
        b["options"] = {**b["options"], "tasks": a["options"]["tasks"], "tasks_file": None}
    return a != b


def _expand_runs(runs: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """Each argument is a run, or a folder of seed-* runs (aggregated together)."""
    groups = []
    for r in runs:
        seeds = sorted(p for p in Path(r).glob("seed-*") if p.is_dir())
        if seeds:
            groups.append((str(r), seeds))
        else:
            find_model_dir(r)  # fail early with a clear message
            groups.append((str(r), [Path(r)]))
    return groups


def evaluate_runs(runs: Sequence[Path], data: Sequence[str], out: Path | None = None, batch_size: int = 32,
                  on_invalid: str = "error", oracle_domains: bool = False,
                  quantize: str | None = None) -> dict[str, Any]:
    """Evaluate every run on the same held-out pairs; write eval.json and eval.md.

    `quantize`: passed to `load_system` ("int8": CPU int8 backbones; None: each run's saved model.quantize)."""
    all_paths = [str(p) for p in data]
    split = "test" if all(Path(p).is_dir() for p in all_paths) else None
    pairs, _ = load_pairs(all_paths, split=split, on_invalid=on_invalid)
    results: dict[str, Any] = {}
    md: list[str] = []
    index = pair_index(pairs)
    scored: dict[str, list[dict[str, Any]]] = {}
    for name, members in _expand_runs(runs):
        reports = []
        for run in members:
            system = load_system(run, quantize=quantize)
            rep = evaluate_system(system, pairs, batch_size=batch_size, oracle_domains=oracle_domains)
            rep["system"] = system.name
            if getattr(system, "quantized", None):
                rep["quantized"] = system.quantized["mode"]
            reports.append(rep)
        scored[name] = reports
        if len(reports) == 1:
            results[name] = reports[0]
            md.append(accuracy_table(reports[0], f"{reports[0]['system']}: {name}"))
        else:
            agg = aggregate_runs(reports, index)
            results[name] = {"aggregate": agg, "runs": {str(m): r for m, r in zip(members, reports)}}
            md.append(aggregate_table(agg, f"{reports[0]['system']}: {name}"))
    names = list(scored)
    if len(names) > 1:  # every other run against the first, on the same pairs (paired clustered bootstrap)
        comparisons = {n: c for n in names[1:] if (c := compare_runs(scored[n], scored[names[0]], index))}
        for n, c in comparisons.items():
            results[n]["paired_difference"] = {"reference": names[0], **c}
        if comparisons:
            md.append(comparison_table(comparisons, names[0]))
    markdown = "\n\n".join(md)
    out_dir = Path(out) if out is not None else Path(runs[0]) / "eval"
    atomic_write_text(out_dir / "eval.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "eval.md", markdown + "\n")
    return {"json": results, "markdown": markdown, "written": str(out_dir)}


def read_score_requests(path: Path) -> list[dict[str, Any]]:
    """JSON Lines of {prompt, response[, domain, id]}; a bad line is reported with its number and field."""
    items = []
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a JSON Lines file of {{prompt, response[, domain, id]}}")
    with path.open("rb") as f:  # bytes, decoded line by line, so a bad byte is reported on its own line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line cannot be decoded)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object {{prompt, response, ...}} per line, got "
                                f"{type(rec).__name__}" + (" (a JSON array: write one object per line)"
                                                           if isinstance(rec, list) else ""))
            for key in ("prompt", "response"):
                if not isinstance(rec.get(key), str):
                    raise DataError(f"{path}:{n}: field '{key}': missing or not a string")
            if rec.get("domain") is not None and not isinstance(rec["domain"], str):
                raise DataError(f"{path}:{n}: field 'domain': not a string")
            items.append(rec)
    return items
