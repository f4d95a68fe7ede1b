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
        from moerm.train import distributed

        main = distributed.is_main()  # under torchrun / accelerate launch only the main process talks
        cfg = load_config(config, overrides)
        seed_list = [int(s) for s in seeds.split(",")] if seeds else [None]
        for seed in seed_list:
            run_dir = out if seed is None else out / f"seed-{seed}"
            run_cfg = cfg if seed is None else load_config(config, overrides + [f"train.seed={seed}"])
            summary = train_run(run_cfg, run_dir, command=command, resume=resume, progress=progress and main,
                                console=console if main else None)
            if not main:
                continue
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
    oracle_domains: bool = typer.Option(False, "--oracle-domains", help="hand routed systems each pair's true domain "
                                        "instead of routing (an upper bound; default: their own router)"),
) -> None:
    """Pairwise accuracy per domain and overall, reward statistics and latency; mean +- std over seeds."""
    from moerm.runs import evaluate_runs

    _quiet_hf()

    def go() -> None:
        result = evaluate_runs(runs, data, out, batch_size=batch_size, on_invalid=on_invalid,
                               oracle_domains=oracle_domains)
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


@app.command()
def serve(
    run: Path = typer.Argument(..., help="run folder or saved model folder"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_batch: int = typer.Option(64, "--max-batch", help="most items scored together"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="how long a request may wait for others to join"),
    no_batching: bool = typer.Option(False, "--no-batching", help="score each request alone"),
    max_queue: int = typer.Option(1024, "--max-queue", help="most items waiting; past it: 503 + Retry-After"),
    max_items: int = typer.Option(256, "--max-items", help="most items per request (413 past it)"),
    max_chars: int = typer.Option(32000, "--max-chars", help="most characters per text (413 past it)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="bearer token required on every request but "
                                          "/health (default: $MOERM_API_KEY; none: no auth)"),
    query_template: str = typer.Option("chatml", "--query-template", help="OpenRLHF query split: chatml | llama3 | "
                                       "hh, or a string with {prompt} then {response}"),
    batch_size: int = typer.Option(64, "--batch-size", help="forward batch size inside one scoring call"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    torch_threads: Optional[int] = typer.Option(None, "--torch-threads", help="torch CPU threads (default: torch's)"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a reward system over HTTP (POST /v1/score, OpenRLHF's /get_reward) with dynamic batching."""
    from moerm.serve.config import ServeConfig
    from moerm.serve.server import run_server
    from moerm.systems.base import find_model_dir

    _quiet_hf()

    def go() -> None:
        find_model_dir(run)  # a wrong folder fails here, not after the server is up
        cfg = ServeConfig(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, batching=not no_batching,
                          max_queue=max_queue, max_items_per_request=max_items, max_chars_per_text=max_chars,
                          api_key=api_key, query_template=query_template, batch_size=batch_size, device=device,
                          torch_threads=torch_threads)
        run_server(str(run), cfg, log_level=log_level)

    _run_guarded(go)


@app.command()
def bench(
    out: Path = typer.Option(..., "--out", help="output folder (rerun the same command to resume)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="smoke | cpu-small | paper (configs/bench/)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="bench YAML, applied over the preset"),
    systems: Optional[str] = typer.Option(None, "--systems", help="comma-separated subset, e.g. baseline,rodos"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds (default: the preset's)"),
    data: Optional[list[str]] = typer.Option(None, "--data", help="training files or folders (instead of the preset's)"),
    eval_data: Optional[list[str]] = typer.Option(None, "--eval-data", help="held-out files or folders"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. --set train.lr=1e-4 "
                                             "--set per_system.rodos.options.router_epochs=5"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Every system on the same data, backbone, budget and seeds: accuracy, size/cost and inference tables + plots."""
    from moerm.bench import load_bench_config
    from moerm.bench.grid import run_bench

    _quiet_hf()
    overrides = []
    if systems:
        overrides.append("systems=" + json.dumps([s for s in systems.split(",") if s]))
    if seeds:
        overrides.append("seeds=" + json.dumps([int(s) for s in seeds.split(",") if s.strip()]))
    if data:
        # your data instead of the preset's: its domains and held-out files too (--set domains=[...] to filter)
        overrides += ["data=" + json.dumps(data), "data_fallback=[]", "synthetic_data=false", "domains=null",
                      "eval_data=[]"]
    if eval_data:
        overrides.append("eval_data=" + json.dumps(eval_data))
    overrides += list(set_ or [])
    parts = ["moerm", "bench", "--out", str(out)]
    for flag, value in (("--preset", preset), ("--config", config), ("--systems", systems), ("--seeds", seeds)):
        if value is not None:
            parts += [flag, str(value)]
    parts += [a for d in data or [] for a in ("--data", d)] + [a for e in eval_data or [] for a in ("--eval-data", e)]
    parts += [a for s in set_ or [] for a in ("--set", s)]
    command = " ".join(shlex.quote(p) for p in parts)

    def go() -> None:
        cfg = load_bench_config(preset, config, overrides)
        result = run_bench(cfg, out, progress=progress, console=console, command=command)
        console.print(f"[green]report:[/] {result['report']}", highlight=False)
        if result["failed"]:
            _fail(f"{len(result['failed'])} cell(s) failed: {', '.join(result['failed'])} (rerun to retry them)")

    _run_guarded(go)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
