"""The `moerm` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from moerm.cli_data import data_app
from moerm.cli_label import label_app

app = typer.Typer(help="Train, evaluate and serve domain-robust reward models (routers and mixtures of experts).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data")
app.add_typer(label_app, name="label")
console = Console(soft_wrap=True)
err = Console(stderr=True)


def _fail(msg: str) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(1)


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _run_guarded(fn: Any) -> Any:
    """Known user errors become one red line and exit code 1, not a traceback."""
    from moerm.backbone import BackboneError
    from moerm.config import ConfigError
    from moerm.data.readers import DataError
    from moerm.data.schema import InvalidRecord

    try:
        return fn()
    except (ConfigError, DataError, InvalidRecord, BackboneError, FileNotFoundError, ValueError, NotImplementedError) as e:
        _fail(str(e))


@app.command()
def train(
    data: list[str] = typer.Option(..., "--data", help="training files or folders (train* files in folders)"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    system: Optional[str] = typer.Option(None, "--system", help="baseline | baselora | ..."),
    tuning: Optional[str] = typer.Option(None, "--tuning", help="full | lora | frozen (default: the system's)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="HF model path/name, or 'minilm'"),
    eval_data: Optional[list[str]] = typer.Option(None, "--eval-data", help="held-out files or folders (default: test* files in the --data folders)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. --set train.lr=1e-4"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds: one run per seed in OUT/seed-N"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run from its last checkpoint"),
    no_eval: bool = typer.Option(False, "--no-eval", help="no held-out evaluation during training (run `moerm eval` after)"),
    on_invalid: Optional[str] = typer.Option(None, "--on-invalid", help="error (default) | skip"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a reward system and save it to OUT/model."""
    from moerm.config import load_config
    from moerm.runs import train_run

    _quiet_hf()
    overrides = list(set_ or [])
    for key, value in (("system", system), ("model.tuning", tuning), ("model.backbone", backbone),
                       ("data.on_invalid", on_invalid)):
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides.append("data.train=" + json.dumps(data))
    if eval_data:
        overrides.append("data.eval=" + json.dumps(eval_data))
    if no_eval:
        overrides.append("data.eval_during_training=false")
    # The command as a reproducible line, rebuilt from the parsed options (argv is not ours when embedded).
    parts = ["moerm", "train", *[a for d in data for a in ("--data", d)], "--out", str(out)]
    for flag, value in (("--system", system), ("--tuning", tuning), ("--backbone", backbone), ("--config", config),
                        ("--seeds", seeds), ("--on-invalid", on_invalid)):
        if value is not None:
            parts += [flag, str(value)]
    parts += [a for e in eval_data or [] for a in ("--eval-data", e)]
    parts += [a for s in set_ or [] for a in ("--set", s)]
    parts += ["--resume"] if resume else []
    parts += ["--no-eval"] if no_eval else []
    command = " ".join(shlex.quote(p) for p in parts)

    def go() -> None:
        cfg = load_config(config, overrides)
        seed_list = [int(s) for s in seeds.split(",")] if seeds else [None]
        for seed in seed_list:
            run_dir = out if seed is None else out / f"seed-{seed}"
            run_cfg = cfg if seed is None else load_config(config, overrides + [f"train.seed={seed}"])
            summary = train_run(run_cfg, run_dir, command=command, resume=resume, progress=progress, console=console)
            parts = summary["seconds_per_component"]
            if len(parts) > 1:  # e.g. each domain RM and the router, as in the router paper's Table 3
                console.print("training time per component: " + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items()),
                              highlight=False)
            console.print(f"[green]saved[/] {summary['model_dir']}  ({summary['train_seconds']:.0f} s)")

    _run_guarded(go)


@app.command("eval")
def eval_(
    runs: list[Path] = typer.Argument(..., help="run folders (a folder with seed-* runs is aggregated)"),
    data: list[str] = typer.Option(..., "--data", help="held-out files or folders (test* files in folders)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write eval.json and eval.md (default RUN/eval)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    on_invalid: str = typer.Option("error", "--on-invalid"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Pairwise accuracy per domain and overall, reward statistics and latency; mean +- std over seeds."""
    from moerm.runs import evaluate_runs

    _quiet_hf()

    def go() -> None:
        result = evaluate_runs(runs, data, out, batch_size=batch_size, on_invalid=on_invalid)
        if as_json:
            console.print_json(json.dumps(result["json"]))
        else:
            console.print(result["markdown"], highlight=False)
            console.print(f"\nwritten: {result['written']}", highlight=False)

    _run_guarded(go)


@app.command()
def info(run: Path = typer.Argument(..., help="run folder or saved model folder"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Parameters (total, trainable) and bytes on disk, per component."""
    from moerm.eval.report import info_table
    from moerm.systems.base import find_model_dir, load_system

    _quiet_hf()

    def go() -> None:
        path = find_model_dir(run)
        d = load_system(path).describe(path)
        if as_json:
            console.print_json(json.dumps(d))
        else:
            console.print(f"system [bold]{d['system']}[/], backbone {d['backbone']}, tuning {d['tuning']}", highlight=False)
            console.print(info_table(d), highlight=False)

    _run_guarded(go)


@app.command()
def score(
    run: Path = typer.Argument(..., help="run folder or saved model folder"),
    prompt: Optional[str] = typer.Option(None, "--prompt"),
    response: Optional[str] = typer.Option(None, "--response"),
    domain: Optional[str] = typer.Option(None, "--domain"),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="JSON Lines with prompt, response[, domain]"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON Lines out (default: stdout)"),
    batch_size: int = typer.Option(32, "--batch-size"),
) -> None:
    """Score one prompt/response pair, or a JSON Lines file of them; each result explains itself."""
    from moerm.runs import read_score_requests
    from moerm.systems.base import load_system

    _quiet_hf()

    def go() -> None:
        if input is not None:
            items = read_score_requests(input)
        elif prompt is not None and response is not None:
            items = [{"prompt": prompt, "response": response, "domain": domain}]
        else:
            raise ValueError("give --prompt and --response, or --input FILE")
        system = load_system(run)
        res = system.score([i["prompt"] for i in items], [i["response"] for i in items],
                           [i.get("domain") for i in items], batch_size=batch_size)
        lines = [json.dumps({"reward": r, **({"id": i["id"]} if "id" in i else {}), "details": d})
                 for i, r, d in zip(items, res.rewards, res.details)]
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("".join(ln + "\n" for ln in lines))
            console.print(f"scored {len(lines)} items -> {output}")
        else:
            for ln in lines:
                print(ln)

    _run_guarded(go)


@app.command("add-domain")
def add_domain(
    run: Path = typer.Argument(..., help="run folder of a routed system (rodos, arliss)"),
    data: list[str] = typer.Option(..., "--data", help="the new domain's pairs (one domain)"),
    on_invalid: str = typer.Option("error", "--on-invalid"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the new domain's RM and retrain the router only; the other RMs' files are left untouched."""
    from moerm.data.readers import load_pairs
    from moerm.systems.base import FitContext, find_model_dir, load_system

    _quiet_hf()

    def go() -> None:
        pairs, report = load_pairs(data, split="train", on_invalid=on_invalid)
        if report.n_invalid:
            console.print(f"[yellow]{report.summary()}[/]", highlight=False)
        model_dir = find_model_dir(run)
        system = load_system(model_dir)
        domain = pairs[0].domain if pairs else "?"
        ctx = FitContext(Path(run) / "add-domain" / domain, progress=progress)
        result = system.add_domain(pairs, ctx, model_dir)
        for name, sec in result.seconds_per_component.items():
            console.print(f"trained {name} in {sec:.1f} s", highlight=False)
        console.print(f"[green]added[/] domain {domain!r} ({len(pairs)} pairs) to {model_dir}", highlight=False)

    _run_guarded(go)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
