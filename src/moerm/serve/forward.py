"""Forward passes filled by tokens, not by count (TEI's approach), for the server's scoring calls.

A scoring call holds whatever the batcher gathered: requests of every length. `system.score(..., batch_size=b)`
sorts them and cuts every `b` rows, so each forward pass is padded to its longest row and a pass of short rows
holds no more of them than a pass of long ones. With a token budget, the call's pairs are sorted by their token
count and cut into passes whose padded size (rows x longest row) stays within `max_batch_tokens`: many short pairs
go in one pass, few long ones in another, and no pair is padded to a much longer one. Each pass is one
`system.score` call with `batch_size` = its rows, so it runs as one forward pass of the system's own scoring code
(the rewards are the ones `score` gives each pair alone, batching changes only the padding).

Token counts come from the system's own pair encoder (`encoder.encode(prompt, response)`: the tokens the model
reads, truncation included); a system that exposes none (a routed system's RMs may each have their own) is counted
by the encoder of its first RM, and one without any encoder by characters / 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from moerm.systems.base import ScoreOutput

LengthFn = Callable[[Sequence[str], Sequence[str]], list[int]]


def _encoder_of(system: Any) -> Any:
    enc = getattr(system, "encoder", None)
    if enc is not None and hasattr(enc, "encode"):
        return enc
    for name in ("rms", "experts"):
        group = getattr(system, name, None)
        if isinstance(group, dict):
            for member in group.values():
                enc = getattr(member, "encoder", None)
                if enc is not None and hasattr(enc, "encode"):
                    return enc
    return None


def length_fn(system: Any) -> tuple[LengthFn, bool]:
    """(pairs -> token counts, whether they are exact token counts of the system's encoder)."""
    enc = _encoder_of(system)
    if enc is None:
        return (lambda ps, rs: [max(1, (len(p) + len(r)) // 4) for p, r in zip(ps, rs)]), False
    return (lambda ps, rs: [len(enc.encode(p, r)["input_ids"]) for p, r in zip(ps, rs)]), True


def plan_passes(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped into forward passes: sorted by length (stable), each pass as many rows as keep
    rows x its longest within `max_tokens` (and at most `max_rows`); a row longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    passes: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted ascending: the newcomer is the longest
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or (len(current) + 1) * longest > max_tokens):
            passes.append(current)
            current = []
        current.append(i)
    if current:
        passes.append(current)
    return passes


def budget_score(score: Callable[..., ScoreOutput], lengths: LengthFn, max_tokens: int,
                 max_rows: int | None = None) -> Callable[..., ScoreOutput]:
    """`score(prompts, responses, domains, batch_size=...)` run as token-budget forward passes, in input order."""

    def run(prompts: list[str], responses: list[str], domains: list[str | None] | None,
            batch_size: int = 0) -> ScoreOutput:
        n = len(prompts)
        rewards: list[Any] = [None] * n
        details: list[Any] = [None] * n
        for idx in plan_passes(lengths(prompts, responses), max_tokens, max_rows):
            out = score([prompts[i] for i in idx], [responses[i] for i in idx],
                        [domains[i] for i in idx] if domains is not None else None, batch_size=len(idx))
            if len(out.rewards) != len(idx) or len(out.details) != len(idx):
                return out  # miscounted: the batcher reports it
            for k, i in enumerate(idx):
                rewards[i], details[i] = out.rewards[k], out.details[k]
        return ScoreOutput(rewards, details)

    return run
