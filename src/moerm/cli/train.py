"""`moerm train | eval | info | score | add-domain`: train a reward system, evaluate it, describe it, use it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand

from moerm.cli.common import (
    OnInvalid, command_line, console, data_option, fail, on_invalid_option, parse_seeds, quiet_hf, run_guarded,
    set_option,
)


def systems_overview() -> tuple[list[str], tuple[str, ...], str]:
    """The registered systems, the tuning modes, and a help paragraph with each system's modes and default."""
    import moerm.systems  # noqa: F401 - importing the package registers the built-in systems
    from moerm.encoding.tuning import TUNING_MODES
    from moerm.systems.base import REGISTRY

    lines = ["Systems (--system) and the tuning modes each honours (--tuning; auto means its default):"]
    for name, cls in REGISTRY.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        what = f" - {doc[0]}" if doc else ""
        lines.append(f"  {name}: {' | '.join(cls.tunings)}, default {cls.default_tuning}{what}")
    return list(REGISTRY), TUNING_MODES, "\n".join(lines)


class TrainCommand(TyperCommand):
    """`moerm train`, whose --help lists the systems and tuning modes from the registry, read only when shown
    (importing every system loads torch; the rest of the CLI should not wait for that)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        names, tunings, overview = systems_overview()
        for p in self.params:
            if p.name == "system":
                p.help = f"reward system: {' | '.join(names)} (default: the config's, else baseline)"
            elif p.name == "tuning":
                p.help = f"backbone tuning: {' | '.join(tunings)} | auto (default auto: the system's own; see below)"
        self.epilog = overview
        super().format_help(ctx, formatter)


def train(
    ctx: typer.Context,
    data: list[str] = data_option("training files or folders (train* files in folders)"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    system: Optional[str] = typer.Option(None, "--system", help="reward system (listed below)"),
    tuning: Optional[str] = typer.Option(None, "--tuning", help="full | lora | frozen | top | auto (default: the system's)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="HF model path/name, or 'minilm'"),
    eval_data: Optional[list[str]] = typer.Option(None, "--eval-data", help="held-out files or folders (default: test* files in the --data folders)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/)"),
    set_: Optional[list[str]] = set_option(),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated integer seeds: one run per seed in OUT/seed-N"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run from its last checkpoint"),
    allow_data_change: bool = typer.Option(False, "--allow-data-change", help="with --resume: continue even though "
                                           "the data differs from what the run started on"),
    no_eval: bool = typer.Option(False, "--no-eval", help="no held-out evaluation during training (run `moerm eval` after)"),
    on_invalid: Optional[OnInvalid] = on_invalid_option(None, "stop at the first invalid record (error) or skip it "
                                                        "(default: the config's data.on_invalid, error)"),
    drop_hf_head: bool = typer.Option(False, "--drop-hf-head", help="train on a backbone that is a sequence-"
                                      "classification reward model, dropping its trained head (else refused; "
                                      "`moerm import-hf` keeps the head)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a reward system and save it to OUT/model."""
    from moerm.config import load_config
    from moerm.runs import train_run

    quiet_hf()
    command = command_line(ctx)
    overrides = list(set_ or [])
    for key, value in (("system", system), ("model.tuning", tuning), ("model.backbone", backbone),
                       ("data.on_invalid", on_invalid.value if on_invalid else None)):
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides.append("data.train=" + json.dumps(data))
    if eval_data:
        overrides.append("data.eval=" + json.dumps(eval_data))
    if no_eval:
        overrides.append("data.eval_during_training=false")

    def go() -> None:
        from moerm.train import distributed

        seed_list: list[int | None] = list(parse_seeds(seeds) or [None])
        main = distributed.is_main()  # under torchrun / accelerate launch only the main process talks
        cfg = load_config(config, overrides)
        check_backbone_head(cfg.model.backbone, drop_hf_head, main)
        for seed in seed_list:
            run_dir = out if seed is None else out / f"seed-{seed}"
            run_cfg = cfg if seed is None else load_config(config, overrides + [f"train.seed={seed}"])
            summary = train_run(run_cfg, run_dir, command=command, resume=resume, progress=progress and main,
                                allow_data_change=allow_data_change,
                                console=console if main else None)
            if not main:
                continue
            parts = summary["seconds_per_component"]
            if len(parts) > 1:  # e.g. each domain RM and the router, as in the router paper's Table 3
                console.print("training time per component: " + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items()),
                              highlight=False)
            console.print(f"[green]saved[/] {summary['model_dir']}  ({summary['train_seconds']:.0f} s)")

    run_guarded(go, run_dir=out)


def check_backbone_head(backbone: str, drop_hf_head: bool, main: bool = True) -> None:
    """A backbone folder that is a *ForSequenceClassification RM would silently lose its trained head: refused
    unless --drop-hf-head, and then said loudly."""
    from moerm.hub.hf_import import backbone_head_warning

    message = backbone_head_warning(backbone)
    if message is None:
        return
    if not drop_hf_head:
        fail(f"{message}; to fine-tune its body with a new head anyway, pass --drop-hf-head")
    if main:
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False)


def eval_(
    runs: list[Path] = typer.Argument(..., help="run folders (a folder with seed-* runs is aggregated)"),
    data: list[str] = data_option("held-out files or folders (test* files in folders)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write eval.json and eval.md (default RUN/eval)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    on_invalid: OnInvalid = on_invalid_option(),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    oracle_domains: bool = typer.Option(False, "--oracle-domains", help="hand routed systems each pair's true domain "
                                        "instead of routing (an upper bound; default: their own router)"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="none | int8: int8 dynamic quantization of the "
                                           "backbone after loading (CPU only; default: the saved model.quantize)"),
) -> None:
    """Pairwise accuracy per domain and overall, reward statistics and latency; mean +- std over seeds."""
    from moerm.runs import evaluate_runs

    quiet_hf()

    def go() -> None:
        result = evaluate_runs(runs, data, out, batch_size=batch_size, on_invalid=on_invalid.value,
                               oracle_domains=oracle_domains, quantize=quantize)
        if as_json:
            console.print_json(json.dumps(result["json"]))
        else:
            console.print(result["markdown"], highlight=False)
            console.print(f"\nwritten: {result['written']}", highlight=False)

    run_guarded(go)


def info(run: Path = typer.Argument(..., help="run folder or saved model folder"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Parameters (total, trainable) and bytes on disk, per component."""
    from moerm.eval.report import info_table
    from moerm.systems.base import find_model_dir, load_system

    quiet_hf()

    def go() -> None:
        path = find_model_dir(run)
        d = load_system(path).describe(path)
        if as_json:
            console.print_json(json.dumps(d))
        else:
            console.print(f"system [bold]{d['system']}[/], backbone {d['backbone']}, tuning {d['tuning']}", highlight=False)
            console.print(info_table(d), highlight=False)

    run_guarded(go)


def finite_or_none(value: Any) -> Any:
    """The same JSON-ready value with every non-finite float (NaN, inf) replaced by None (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def score(
    run: Path = typer.Argument(..., help="run folder or saved model folder"),
    prompt: Optional[str] = typer.Option(None, "--prompt"),
    response: Optional[str] = typer.Option(None, "--response"),
    domain: Optional[str] = typer.Option(None, "--domain"),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="JSON Lines with prompt, response[, domain]"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON Lines out (default: stdout)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="none | int8: int8 dynamic quantization of the "
                                           "backbone after loading (CPU only; default: the saved model.quantize)"),
) -> None:
    """Score one prompt/response pair, or a JSON Lines file of them; each result explains itself."""
    from moerm.runs import read_score_requests
    from moerm.systems.base import load_system

    quiet_hf()

    def go() -> None:
        items: list[dict[str, Any]]
        if input is not None:
            items = read_score_requests(input)
        elif prompt is not None and response is not None:
            items = [{"prompt": prompt, "response": response, "domain": domain}]
        else:
            fail("give --prompt and --response, or --input FILE")
        system = load_system(run, quantize=quantize)
        res = system.score([i["prompt"] for i in items], [i["response"] for i in items],
                           [i.get("domain") for i in items], batch_size=batch_size)
        # JSON has no NaN: a non-finite reward (a broken model) is written as null, never as a bare NaN
        lines = [json.dumps(finite_or_none({"reward": r, **({"id": i["id"]} if "id" in i else {}), "details": d}),
                            allow_nan=False) for i, r, d in zip(items, res.rewards, res.details)]
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("".join(ln + "\n" for ln in lines))
            console.print(f"scored {len(lines)} items -> {output}")
        else:
            for ln in lines:
                print(ln)

    run_guarded(go)


def add_domain(
    run: Path = typer.Argument(..., help="run folder of a routed system (rodos, arliss)"),
    data: list[str] = data_option("the new domain's pairs (one domain); with --from-hf only their prompts are used, "
                                  "to train the router"),
    from_hf: Optional[Path] = typer.Option(None, "--from-hf", help="rodos: use this Hugging Face sequence-"
                                           "classification reward model as the new domain's RM (imported, not "
                                           "trained; its own backbone, tokenizer and max_length)"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="with --from-hf: tokens per prompt+response "
                                             "for the imported RM (default: the run's model.max_length, at most "
                                             "the model's positions)"),
    on_invalid: OnInvalid = on_invalid_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the new domain's RM (or import one, --from-hf) and retrain the router only; the other RMs' files are
    left untouched."""
    from moerm.data.readers import load_pairs
    from moerm.systems.base import FitContext, find_model_dir, load_system
    from moerm.systems.routing import domain_dir

    quiet_hf()

    def go() -> None:
        pairs, report = load_pairs(data, split="train", on_invalid=on_invalid.value)
        if report.n_invalid:
            console.print(f"[yellow]{report.summary()}[/]", highlight=False)
        model_dir = find_model_dir(run)
        system = load_system(model_dir, quantize="none")  # it trains and saves: always the fp32 weights
        domain = pairs[0].domain if pairs else "?"
        # the folder comes from the same safe name the systems use, never from the raw domain string
        ctx = FitContext(Path(run) / "add-domain" / domain_dir(domain), progress=progress)
        if from_hf is not None:
            result = add_hf_domain(system, from_hf, max_length, pairs, ctx, model_dir)
        else:
            result = system.add_domain(pairs, ctx, model_dir)
        for name, sec in result.seconds_per_component.items():
            console.print(f"trained {name} in {sec:.1f} s", highlight=False)
        console.print(f"[green]added[/] domain {domain!r} ({len(pairs)} pairs) to {model_dir}", highlight=False)

    run_guarded(go, run_dir=run)


def add_hf_domain(system: Any, path: Path, max_length: int | None, pairs: list, ctx: Any, model_dir: Path) -> Any:
    """`add-domain --from-hf`: import the HF reward model at `path` as the new domain's RM of a rodos system."""
    from moerm.encoding import load_config
    from moerm.encoding.pairs import max_positions
    from moerm.errors import UnsupportedError
    from moerm.hub.hf_import import inspect_hf_rm, load_hf_reward_model
    from moerm.systems.routing import new_domain_of

    if not hasattr(system, "add_domain_rm"):
        raise UnsupportedError(f"--from-hf adds a ready-made RM to a rodos system; this is a {system.name} system "
                               "(ARLISS's domains are LoRA adapters of one shared base, not whole RMs)")
    new_domain_of(pairs, system.domains)  # before the import: a wrong --data fails fast
    if max_length is None:
        limit = max_positions(load_config(str(inspect_hf_rm(path).path)))
        max_length = min(system.config.model.max_length, limit) if limit else system.config.model.max_length
    rm = load_hf_reward_model(path, max_length, seed=system.config.train.seed)
    console.print(f"imported {path} as the RM of domain {pairs[0].domain!r} (max_length {max_length})", highlight=False)
    return system.add_domain_rm(rm, pairs, ctx, model_dir)


def register(app: typer.Typer) -> None:
    app.command(cls=TrainCommand)(train)
    app.command("eval")(eval_)
    app.command()(info)
    app.command()(score)
    app.command("add-domain")(add_domain)
