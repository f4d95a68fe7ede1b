"""`moerm label ...`: per-capability preference pairs from aspect scores or from an LLM judge."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from moerm.cli_data import OnInvalid, Split
from moerm.data.readers import load_pairs, write_jsonl
from moerm.data.schema import PreferencePair
from moerm.labeling.aspects import available_aspects, capability_pairs
from moerm.labeling.judge import JudgeConfig, JudgeConfigError, judge_pairs

label_app = typer.Typer(help="Label preference pairs per capability (for per-capability experts).",
                        no_args_is_help=True)

_PATHS_HELP = "Files, folders, saved `datasets` folders or hf:<name>[:<split>]."


def _fail(msg: object) -> NoReturn:
    """One line on stderr and exit code 1: these are the user's to fix, a traceback would not help."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=1)


def _load(paths: list[str], split: Split | None, on_invalid: OnInvalid) -> list[PreferencePair]:
    try:
        pairs, report = load_pairs(paths, split=split.value if split else None, on_invalid=on_invalid.value)
    except (ValueError, OSError) as e:  # DataError and InvalidRecord are ValueErrors
        _fail(e)
    if report.n_invalid:
        typer.echo(report.summary(), err=True)
    if not pairs:
        _fail("no valid pairs in the input")
    return pairs


@label_app.command()
def aspects(
    paths: list[str] = typer.Argument(..., help=_PATHS_HELP),
    capability: str = typer.Option(..., "--capability", help="Aspect name in aspects_chosen/aspects_rejected."),
    out: Path = typer.Option(..., "--out", help="Output .jsonl or .jsonl.gz."),
    split: Split | None = typer.Option(None, "--split", help="Only take train or test files from folders."),
    on_invalid: OnInvalid = typer.Option(OnInvalid.error, "--on-invalid", help="Stop at the first bad record or skip."),
) -> None:
    """Orient each pair by one aspect score: the reply scored higher on it becomes `chosen`."""
    pairs = _load(paths, split, on_invalid)
    kept, report = capability_pairs(pairs, capability)
    if report["missing"] == report["total"]:
        have = ", ".join(f"{k} ({n})" for k, n in available_aspects(pairs).items()) or "none"
        _fail(f"no pair has aspect '{capability}' on both sides; aspects available: {have}")
    write_jsonl(kept, out)
    typer.echo(f"{capability}: kept {report['kept']} of {report['total']} pairs ({report['flipped']} flipped "
               f"against the overall label); dropped {report['ties']} ties, {report['missing']} missing the aspect")
    typer.echo(f"wrote {out}")


@label_app.command()
def judge(
    paths: list[str] = typer.Argument(..., help=_PATHS_HELP),
    capabilities: list[str] | None = typer.Option(None, "--capability", help="Capability to judge; repeat for "
                                                  "several (default with --task: all of the task's capabilities)."),
    tasks_file: Path | None = typer.Option(None, "--tasks-file", help="DMoERM tasks YAML (configs/tasks/): the "
                                          "capability descriptions there are shown to the judge."),
    task: str | None = typer.Option(None, "--task", help="Task in --tasks-file whose capabilities to judge."),
    out: Path = typer.Option(..., "--out", help="Output .jsonl or .jsonl.gz."),
    base_url: str | None = typer.Option(None, "--base-url", help="Chat-completions base URL (else "
                                        "env MOERM_JUDGE_BASE_URL, then OPENAI_BASE_URL)."),
    model: str | None = typer.Option(None, "--model", help="Judge model (else env MOERM_JUDGE_MODEL)."),
    api_key: str | None = typer.Option(None, "--api-key", help="Bearer key (else env MOERM_JUDGE_API_KEY, "
                                       "then OPENAI_API_KEY).", show_default=False),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Most requests in flight at once."),
    max_retries: int = typer.Option(4, "--max-retries", min=0, help="Retries on 429/5xx/connection errors."),
    timeout: float = typer.Option(60.0, "--timeout", min=0.001, help="Seconds per request."),
    cache: Path | None = typer.Option(None, "--cache", help="Answer cache, JSON Lines (default: "
                                      "OUT.judge-cache.jsonl); a rerun resumes from it."),
    split: Split | None = typer.Option(None, "--split", help="Only take train or test files from folders."),
    on_invalid: OnInvalid = typer.Option(OnInvalid.error, "--on-invalid", help="Stop at the first bad record or skip."),
) -> None:
    """Ask an LLM judge which reply is better per capability, in both orders; keep labels where both agree."""
    descriptions: dict[str, str] = {}
    if tasks_file is not None:
        from moerm.config import ConfigError
        from moerm.systems.tasks import load_tasks_file

        try:
            tasks = {t.name: t for t in load_tasks_file(tasks_file)}
        except ConfigError as e:
            _fail(e)
        if task is None or task not in tasks:
            _fail(f"--task must name a task in {tasks_file}: {', '.join(tasks)}")
        descriptions = tasks[task].capability_descriptions
        capabilities = capabilities or tasks[task].capabilities
    if not capabilities:
        _fail("give --capability (repeat for several), or --tasks-file and --task")
    try:
        config = JudgeConfig.resolve(base_url, model, api_key, concurrency=concurrency, max_retries=max_retries,
                                     timeout=timeout)
    except JudgeConfigError as e:  # before loading data: a missing URL should not wait for a large file
        _fail(e)
    pairs = _load(paths, split, on_invalid)
    cache_path = cache if cache is not None else out.with_name(out.name + ".judge-cache.jsonl")
    try:
        kept, report = judge_pairs(pairs, capabilities, config, cache_path=cache_path, descriptions=descriptions)
    except JudgeConfigError as e:
        _fail(e)
    write_jsonl(kept, out)
    typer.echo(f"kept {report['kept']} of {report['judged']} judgements ({report['flipped']} flipped against the "
               f"overall label); {report['disagreements']} disagreements between orders, {report['malformed']} "
               f"malformed, {report['failed']} failed")
    typer.echo(f"questions: {report['asked']} asked ({report['attempts']} requests), {report['cached']} from cache "
               f"{cache_path}")
    typer.echo(f"wrote {out}")
    if report["failed"] == report["judged"]:
        _fail("every judgement failed (see the warnings above); answers so far are cached, rerun to retry")
    if report["failed"]:
        typer.echo(f"{report['failed']} judgements failed; rerun the same command to retry only those", err=True)
