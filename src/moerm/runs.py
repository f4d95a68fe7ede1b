"""Run folders: train a configured system into one, evaluate saved runs, read scoring requests.

A run folder holds `config.yaml` (resolved), `backbone.json` (the backbone's identity at the start), `command.txt`,
`data.json` (what was read, what was invalid), `metrics.jsonl`, `checkpoints/`, `model/` (the saved system),
`train_summary.json` (written last: the run is complete) and `.moerm.lock` (held while a process works in it).
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
from moerm.data.readers import DataError, json_error, load_pairs, read_lines, resolve_data_paths, too_long
from moerm.data.schema import PreferencePair
from moerm.encoding.cache import backbone_id
from moerm.eval.metrics import aggregate_runs, compare_runs, evaluate_system, pair_index
from moerm.eval.report import accuracy_table, aggregate_table, comparison_table
from moerm.run_folder import RunLock, inspect_run_folder
from moerm.systems.base import SYSTEM_FILE, FitContext, build_system, find_model_dir, load_system, resolve_run_config
from moerm.train import distributed
from moerm.atomic import atomic_write_text

BACKBONE_FILE = "backbone.json"  # the identity of the backbone the run started on, checked by --resume
SUMMARY_FILE = "train_summary.json"


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
    if not train:
        files = ", ".join(str(p) for p in resolve_data_paths(d.train, split="train"))
        skipped = f" ({train_report.n_invalid} invalid records skipped)" if train_report.n_invalid else ""
        raise DataError(f"{files}: no training pairs in the training data{skipped}; nothing was written")
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
    """Train `cfg` into `run_dir` (or resume it) and save the system to run_dir/model.

    Everything the user gave (the folder, config, backbone, data) is checked before anything is written; the main
    process then holds the folder's lock (`moerm.run_folder.RunLock`) until the model is saved. Resuming a finished
    run checks the same things and rewrites nothing."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    # Every process looks before any process writes: they all see the same folder, so they agree on the outcome.
    kind = inspect_run_folder(run_dir)
    distributed.barrier()
    cfg = resolve_run_config(cfg)  # checked before anything is read or written
    if kind == "run":
        if not resume:
            raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
        saved = from_dict(RunConfig, yaml.safe_load(cfg_path.read_text()))
        if saved.to_dict() != cfg.to_dict() and console is not None:
            console.print("[yellow]resuming with the run's saved config.yaml (command-line changes ignored)[/]")
        cfg = saved
        check_resumed_backbone(run_dir, cfg)
    identity = backbone_id(cfg.model.backbone, cfg.model.dtype)
    train, evals, data_info = load_run_data(cfg, console)
    saved_data = run_dir / "data.json"
    if kind == "run" and saved_data.exists() and not allow_data_change:
        before = json.loads(saved_data.read_text()).get("fingerprint")
        if before is not None and before != data_info["fingerprint"]:
            raise ConfigError(f"{run_dir}: the training or held-out data changed since this run started (data "
                              f"fingerprint {before} -> {data_info['fingerprint']}); resuming would mix two datasets. "
                              "Restore the data, train into a new --out, or pass --allow-data-change")
    model_dir = run_dir / "model"
    if kind == "run" and finished(run_dir):  # nothing left to train: the saved model is never rewritten
        if console is not None:
            console.print(f"{run_dir}: this run is complete; nothing to resume", highlight=False)
        return {**json.loads((run_dir / SUMMARY_FILE).read_text()), "model_dir": str(model_dir)}
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
    lock = RunLock(run_dir) if distributed.is_main() else None
    try:
        if lock is not None:
            lock.acquire()
            # Looked at again under the lock: another start may have taken the folder since the first look
            if (inspect_run_folder(run_dir) == "run") != (kind == "run"):
                raise ConfigError(f"{run_dir}: another moerm process started a run in this folder meanwhile; "
                                  "pass --resume to continue it, or choose another --out")
            if kind != "run":  # the backbone's identity first: config.yaml, written next, makes the folder a run
                atomic_write_text(run_dir / BACKBONE_FILE, json.dumps(
                    {"backbone": cfg.model.backbone, "backbone_id": identity}, indent=2))
                atomic_write_text(cfg_path, cfg.to_yaml())
            atomic_write_text(run_dir / "command.txt", command + "\n")
            atomic_write_text(run_dir / "data.json", json.dumps(data_info, indent=2))
        distributed.barrier()
        result = system.fit(train, evals or None, FitContext(run_dir, resume=resume, progress=progress,
                                                              stop_after_steps=stop_after_steps))
        summary = {"system": cfg.system, "model_dir": str(model_dir), "metrics": result.metrics,
                   "seconds_per_component": result.seconds_per_component,
                   "epochs_per_component": result.epochs_per_component,
                   "train_seconds": sum(result.seconds_per_component.values()),
                   "processes": distributed.world_size()}
        if lock is not None:  # one save, by one process; the others wait until it is complete
            system.save(model_dir)
            atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        distributed.barrier()
    finally:
        if lock is not None:
            lock.release()
    return summary


def finished(run_dir: Path) -> bool:
    """A run whose model was saved completely (its summary is written after the save)."""
    return (run_dir / SUMMARY_FILE).is_file() and (run_dir / "model" / SYSTEM_FILE).is_file()


def check_resumed_backbone(run_dir: Path, cfg: RunConfig) -> None:
    """The backbone a resume would load must be the one the run started on (as `load_system` checks a saved model):
    an edited config.yaml `model.backbone`, or weights replaced in the backbone's folder, are refused."""
    recorded: list[tuple[str, str]] = []  # (where, backbone_id)
    for where, path in ((BACKBONE_FILE, run_dir / BACKBONE_FILE), (f"model/{SYSTEM_FILE}", run_dir / "model" / SYSTEM_FILE)):
        try:
            saved_id = json.loads(path.read_text()).get("backbone_id") if path.is_file() else None
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise ConfigError(f"{path}: not readable JSON; the run folder was edited or damaged") from None
        if isinstance(saved_id, str):
            recorded.append((where, saved_id))
    if not recorded:
        return  # a run started before backbones were recorded, never saved: nothing to compare with
    now = backbone_id(cfg.model.backbone, cfg.model.dtype)
    for where, saved_id in recorded:
        if saved_id != now:
            raise ConfigError(f"{run_dir}: cannot resume: the backbone {cfg.model.backbone!r} (config.yaml "
                              f"model.backbone) is not the one this run was trained on ({where}: {saved_id}, now "
                              f"{now}); its name was edited or its weights, config or tokenizer changed. Restore the "
                              "original backbone and config.yaml, or train into a new --out")




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
        for n, raw in read_lines(f):
            if raw is None:
                raise DataError(f"{path}:{n}: {too_long()}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line cannot be decoded)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path}:{n}: {json_error(e)}") from None
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
