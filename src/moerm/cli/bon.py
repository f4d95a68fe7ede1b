"""`moerm bon`: Best-of-N of saved reward systems against the human gold scores of the pair data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moerm.cli.common import (
    OnInvalid, Split, check_batch_size, console, data_option, on_invalid_option, parse_seeds, quiet_hf, run_guarded,
)
from moerm.errors import UserError


def parse_gold(items: list[str] | None) -> dict[str, str]:
    """['topical_chat=overall', 'mine=mean'] -> {domain: criterion}; a malformed or repeated one is a UserError."""
    out: dict[str, str] = {}
    for item in items or []:
        domain, sep, criterion = item.partition("=")
        domain, criterion = domain.strip(), criterion.strip()
        if not sep or not domain or not criterion:
            raise UserError(f"--gold {item!r}: expected DOMAIN=ASPECT or DOMAIN=mean, e.g. --gold topical_chat=overall")
        if domain in out:
            raise UserError(f"--gold: domain {domain!r} is given twice")
        out[domain] = criterion
    return out


def bon(
    runs: list[Path] = typer.Argument(..., help="run folders (a folder with seed-* runs is one system, its runs averaged)"),
    data: list[str] = data_option("files or folders of pairs with human aspect scores (summeval, newsroom, "
                                  "topical_chat, d2t_nlg); other domains are skipped with the reason"),
    split: Split = typer.Option(Split.test, "--split", help="which files folders contribute"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write bon.json, bon.md, bon.png (default RUN/bon)"),
    gold: Optional[list[str]] = typer.Option(None, "--gold", help="DOMAIN=ASPECT|mean: the gold score of a domain's "
                                             "candidates (default: the criterion its pairs were formed by; mean of the "
                                             "aspects for unknown domains)"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples over prompts for the 95% intervals"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap"),
    batch_size: int = typer.Option(32, "--batch-size"),
    oracle_domains: bool = typer.Option(False, "--oracle-domains", help="hand routed systems each candidate's true "
                                        "domain instead of routing"),
    on_invalid: OnInvalid = on_invalid_option(),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Best-of-N against human gold: the gold score of the RM's pick among N candidates, with random and oracle, per
    domain and pooled over the domains (gold as per-domain z-scores), and the Spearman rank correlation of the
    rewards with the gold. Any saved system; routed ones route with their own router unless --oracle-domains."""
    from moerm.eval.bon import evaluate_bon_runs

    quiet_hf()

    def go() -> None:
        check_batch_size(batch_size)
        parse_seeds(str(seed), "--seed")  # within what numpy's seeding takes
        result = evaluate_bon_runs(runs, data, out, split=split.value, criteria=parse_gold(gold),
                                   batch_size=batch_size, on_invalid=on_invalid.value, oracle_domains=oracle_domains,
                                   resamples=bootstrap, seed=seed,
                                   progress=None if as_json else (lambda m: console.print(m, highlight=False)))
        if as_json:
            console.print_json(json.dumps(result["json"]))
        else:
            console.print(result["markdown"], highlight=False)
            console.print(f"\nwritten: {', '.join(result['files'])}", highlight=False)

    run_guarded(go)


def register(app: typer.Typer) -> None:
    app.command()(bon)
