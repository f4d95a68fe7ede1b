"""`moerm import-hf | export`: Hugging Face sequence-classification reward models in, moerm reward models out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moerm.cli.common import command_line, console, quiet_hf, run_guarded


def import_hf(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="local folder of an AutoModelForSequenceClassification reward model "
                                "(num_labels 1, safetensors weights)"),
    out: Path = typer.Option(..., "--out", help="run folder to create (must not exist, or be empty)"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="tokens per prompt+response (default: "
                                             "the model's positions, at most 512)"),
) -> None:
    """Make a baseline run from a Hugging Face reward model, keeping its trained score head exactly."""
    from moerm.hub.hf_import import import_hf as do_import

    quiet_hf()
    command = command_line(ctx)

    def go() -> None:
        s = do_import(path, out, max_length=max_length, command=command)
        console.print(f"[green]imported[/] {s['architecture']} ({s['params']:,} parameters; {s['pooling']} pooling, "
                      f"head {s['head']}, max_length {s['max_length']}) -> {out}", highlight=False)

    run_guarded(go)


def export(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="run folder or saved model folder (baseline, baselora; rodos with --domain)"),
    out: Path = typer.Option(..., "--out", help="folder to write (must not exist, or be empty)"),
    domain: Optional[str] = typer.Option(None, "--domain", help="rodos: export this domain's RM"),
) -> None:
    """Write a reward model as a folder AutoModelForSequenceClassification.from_pretrained loads (same rewards)."""
    from moerm.hub.hf_export import export_run

    quiet_hf()
    command = command_line(ctx)

    def go() -> None:
        s = export_run(run, out, domain=domain, command=command)
        how = ("AutoModelForSequenceClassification.from_pretrained(DIR)" if s["format"] == "native" else
               "AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)")
        console.print(f"[green]exported[/] {s['system']}{' domain ' + repr(domain) if domain else ''} ({s['format']} "
                      f"format, {s['pooling']} pooling, head {s['head']}; max |diff| on probes "
                      f"{s['max_abs_diff_on_probes']:.1e}) -> {out}", highlight=False)
        console.print(f"load it with {how}", highlight=False)
        if s.get("openrlhf"):
            extra = " with --normalize_reward (config.json mean/std hold the head's bias)" if s["format"] == "code" else ""
            console.print(f"OpenRLHF: --reward_pretrain {out} --value_head_prefix score{extra}", highlight=False)

    run_guarded(go)


def register(app: typer.Typer) -> None:
    app.command("import-hf")(import_hf)
    app.command()(export)
