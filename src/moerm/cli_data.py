"""`moerm data ...`: validate, describe and convert preference data from the command line."""

from __future__ import annotations

import json
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from moerm.data.readers import load_pairs
from moerm.data.stats import dataset_stats, stats_markdown

data_app = typer.Typer(help="Validate, describe and convert preference-pair data.", no_args_is_help=True)


class OnInvalid(str, Enum):
    """What to do with an invalid record."""

    error = "error"
    skip = "skip"


class Split(str, Enum):
    """Which files a folder contributes (by file name prefix)."""

    train = "train"
    test = "test"


class Format(str, Enum):
    """Raw formats `convert` understands."""

    hh = "hh"
    shp = "shp"
    hellaswag = "hellaswag"
    dahoas = "dahoas"
    oasst = "oasst"


def _fail(err: Exception) -> NoReturn:
    """One clear line on stderr and exit code 1: data errors are the user's to fix, a traceback would not help."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=1)


@data_app.command()
def validate(
    paths: list[str] = typer.Argument(..., help="Files, folders, saved `datasets` folders or hf:<name>[:<split>]."),
    on_invalid: OnInvalid = typer.Option(OnInvalid.error, "--on-invalid", help="Stop at the first bad record or skip."),
    split: Split | None = typer.Option(None, "--split", help="Only take train or test files from folders."),
) -> None:
    """Check every record against the schema; print pairs per domain and the valid/invalid counts."""
    try:
        pairs, report = load_pairs(paths, split=split.value if split else None, on_invalid=on_invalid.value)
    except (ValueError, OSError) as e:  # DataError and InvalidRecord are ValueErrors
        _fail(e)
    for domain, n in sorted(Counter(p.domain for p in pairs).items()):
        typer.echo(f"{domain}: {n}")
    typer.echo(f"{report.n_valid} valid, {report.n_invalid} invalid")
    if report.n_invalid:
        typer.echo(report.summary())
    if report.n_valid == 0:
        _fail(ValueError("no valid pairs"))


@data_app.command()
def stats(
    paths: list[str] = typer.Argument(..., help="Files, folders, saved `datasets` folders or hf:<name>[:<split>]."),
    tokenizer: str = typer.Option("minilm", "--tokenizer", help="Tokenizer name or path used to count tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a Markdown table."),
    split: Split | None = typer.Option(None, "--split", help="Only take train or test files from folders."),
) -> None:
    """Token-length percentiles, length bias and aspect coverage per domain."""
    from moerm.backbone import load_tokenizer  # lazy: transformers is slow to import and `validate` needs none of it

    try:
        pairs, _ = load_pairs(paths, split=split.value if split else None)
        tok = load_tokenizer(tokenizer)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: BackboneError for a missing tokenizer
        _fail(e)

    def count_tokens(text: str) -> int:
        # verbose=False: long texts are only counted here, so the "longer than max length" warning is noise.
        return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    result = dataset_stats(pairs, count_tokens)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        Console(width=200).print(stats_markdown(result), highlight=False, soft_wrap=True)


@data_app.command()
def convert(
    in_path: Path = typer.Argument(..., help="Raw input file."),
    out_path: Path = typer.Argument(..., help="Output .jsonl or .jsonl.gz."),
    fmt: Format = typer.Option(..., "--format", help="Format of the input file."),
    domain: str | None = typer.Option(None, "--domain", help="Domain name for the pairs (default: the format)."),
) -> None:
    """Convert a raw public dataset file into validated JSON Lines."""
    from moerm.data.converters import convert as run_convert

    try:
        report = run_convert(fmt.value, in_path, out_path, domain)
    except (ValueError, OSError, EOFError) as e:  # EOFError: a truncated .gz input
        _fail(e)
    typer.echo(report.summary())
    typer.echo(f"wrote {out_path}")
