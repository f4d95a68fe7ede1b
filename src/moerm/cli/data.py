"""`moerm data ...`: validate, describe and convert preference data from the command line."""

from __future__ import annotations

import json
from collections import Counter
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from moerm.cli.common import OnInvalid, Split, fail, on_invalid_option, paths_argument, run_guarded, split_option
from moerm.data.readers import load_pairs, write_jsonl
from moerm.data.stats import dataset_stats, stats_markdown

data_app = typer.Typer(help="Validate, describe and convert preference-pair data.", no_args_is_help=True)


class Format(str, Enum):
    """Raw formats `convert` understands."""

    hh = "hh"
    shp = "shp"
    hellaswag = "hellaswag"
    dahoas = "dahoas"
    oasst = "oasst"
    trl = "trl"
    to_trl = "to-trl"


@data_app.command()
def validate(
    paths: list[str] = paths_argument(),
    on_invalid: OnInvalid | None = on_invalid_option(None, help="default: list every invalid record and exit 1 if "
                                                     "any; skip: list them and exit 0; error: stop at the first"),
    split: Split | None = split_option(),
) -> None:
    """Check every record against the schema; print pairs per domain, the valid/invalid counts and every invalid
    record (file, line, field); exit 1 when any record is invalid."""

    def go() -> None:
        mode = on_invalid.value if on_invalid is not None else "skip"  # by default read on, to list them all
        pairs, report = load_pairs(paths, split=split.value if split else None, on_invalid=mode)
        for domain, n in sorted(Counter(p.domain for p in pairs).items()):
            typer.echo(f"{domain}: {n}")
        typer.echo(f"{report.n_valid} valid, {report.n_invalid} invalid")
        if report.n_invalid:
            for err in report.invalid:
                typer.echo(f"  {err}")
            if on_invalid is None:
                fail(f"{report.n_invalid} invalid record(s), listed above")
        if report.n_valid == 0:
            fail("no valid pairs")

    run_guarded(go)


@data_app.command()
def stats(
    paths: list[str] = paths_argument(),
    tokenizer: str = typer.Option("minilm", "--tokenizer", help="Tokenizer name or path used to count tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a Markdown table."),
    split: Split | None = split_option(),
) -> None:
    """Token-length percentiles, length bias and aspect coverage per domain."""

    def go() -> None:
        from moerm.encoding import load_tokenizer  # lazy: transformers is slow to import and `validate` needs none

        pairs, _ = load_pairs(paths, split=split.value if split else None)
        tok = load_tokenizer(tokenizer)

        def count_tokens(text: str) -> int:
            # verbose=False: long texts are only counted here, so the "longer than max length" warning is noise.
            return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

        result = dataset_stats(pairs, count_tokens)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            Console(width=200).print(stats_markdown(result), highlight=False, soft_wrap=True)

    run_guarded(go)


@data_app.command()
def convert(
    in_path: Path = typer.Argument(..., help="Raw input file."),
    out_path: Path = typer.Argument(..., help="Output .jsonl or .jsonl.gz."),
    fmt: Format = typer.Option(..., "--format", help="Format of the input file."),
    domain: str | None = typer.Option(None, "--domain", help="Domain name for the pairs (default: the format)."),
    conversational: bool = typer.Option(False, "--conversational", help="to-trl: write TRL's conversational "
                                        "layout (messages) instead of strings"),
) -> None:
    """Convert a raw public dataset file into validated JSON Lines (`--format trl`: TRL's preference layouts, a file
    or a `datasets` save_to_disk folder); `--format to-trl` writes moerm pairs in TRL's explicit-prompt layout."""
    from moerm.data.converters import convert as run_convert

    def go() -> None:
        if fmt in (Format.trl, Format.to_trl):  # TRL's layouts (moerm.data.trl): a file or a save_to_disk folder
            from moerm.data.trl import write_trl

            pairs, _ = load_pairs([str(in_path)], default_domain=domain)
            if fmt is Format.trl:
                write_jsonl(pairs, out_path)
            else:
                write_trl(pairs, out_path, conversational=conversational)
            typer.echo(f"{len(pairs)} pairs\nwrote {out_path}")
            return
        report = run_convert(fmt.value, in_path, out_path, domain)
        typer.echo(report.summary())
        typer.echo(f"wrote {out_path}")

    run_guarded(go)
