"""`moerm label ...`: per-capability preference pairs from aspect scores or from an LLM judge."""

from __future__ import annotations

from pathlib import Path

import typer

from moerm.cli.common import OnInvalid, Split, fail, on_invalid_option, paths_argument, run_guarded, split_option
from moerm.data.readers import load_pairs, write_jsonl
from moerm.data.schema import PreferencePair
from moerm.labeling.aspects import available_aspects, capability_pairs
from moerm.labeling.judge import JudgeConfig, judge_pairs

label_app = typer.Typer(help="Label preference pairs per capability (for per-capability experts).",
                        no_args_is_help=True)


def _load(paths: list[str], split: Split | None, on_invalid: OnInvalid) -> list[PreferencePair]:
    pairs, report = load_pairs(paths, split=split.value if split else None, on_invalid=on_invalid.value)
    if report.n_invalid:
        typer.echo(report.summary(), err=True)
    if not pairs:
        fail("no valid pairs in the input")
    return pairs


@label_app.command()
def aspects(
    paths: list[str] = paths_argument(),
    capability: str = typer.Option(..., "--capability", help="Aspect name in aspects_chosen/aspects_rejected."),
    out: Path = typer.Option(..., "--out", help="Output .jsonl or .jsonl.gz."),
    split: Split | None = split_option(),
    on_invalid: OnInvalid = on_invalid_option(),
) -> None:
    """Orient each pair by one aspect score: the reply scored higher on it becomes `chosen`."""

    def go() -> None:
        pairs = _load(paths, split, on_invalid)
        kept, report = capability_pairs(pairs, capability)
        if report["missing"] == report["total"]:
            have = ", ".join(f"{k} ({n})" for k, n in available_aspects(pairs).items()) or "none"
            fail(f"no pair has aspect '{capability}' on both sides; aspects available: {have}")
        write_jsonl(kept, out)
        typer.echo(f"{capability}: kept {report['kept']} of {report['total']} pairs ({report['flipped']} flipped "
                   f"against the overall label); dropped {report['ties']} ties, {report['missing']} missing the aspect")
        typer.echo(f"wrote {out}")

    run_guarded(go)


@label_app.command()
def judge(
    paths: list[str] = paths_argument(),
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
    split: Split | None = split_option(),
    on_invalid: OnInvalid = on_invalid_option(),
) -> None:
    """Ask an LLM judge which reply is better per capability, in both orders; keep labels where both agree."""

    def go() -> None:
        caps = capabilities
        descriptions: dict[str, str] = {}
        if tasks_file is not None:
            from moerm.systems.tasks import load_tasks_file

            tasks = {t.name: t for t in load_tasks_file(tasks_file)}
            if task is None or task not in tasks:
                fail(f"--task must name a task in {tasks_file}: {', '.join(tasks)}")
            descriptions = tasks[task].capability_descriptions
            caps = caps or tasks[task].capabilities
        if not caps:
            fail("give --capability (repeat for several), or --tasks-file and --task")
        # before loading data: a missing URL should not wait for a large file
        config = JudgeConfig.resolve(base_url, model, api_key, concurrency=concurrency, max_retries=max_retries,
                                     timeout=timeout)
        pairs = _load(paths, split, on_invalid)
        cache_path = cache if cache is not None else out.with_name(out.name + ".judge-cache.jsonl")
        kept, report = judge_pairs(pairs, caps, config, cache_path=cache_path, descriptions=descriptions)
        write_jsonl(kept, out)
        typer.echo(f"kept {report['kept']} of {report['judged']} judgements ({report['flipped']} flipped against the "
                   f"overall label); {report['disagreements']} disagreements between orders, {report['malformed']} "
                   f"malformed, {report['failed']} failed")
        typer.echo(f"questions: {report['asked']} asked ({report['attempts']} requests), {report['cached']} from "
                   f"cache {cache_path}")
        typer.echo(f"wrote {out}")
        if report["failed"] == report["judged"]:
            fail("every judgement failed (see the warnings above); answers so far are cached, rerun to retry")
        if report["failed"]:
            typer.echo(f"{report['failed']} judgements failed; rerun the same command to retry only those", err=True)

    run_guarded(go)
