"""Forward passes filled by tokens, not by count (TEI's approach), for the server's scoring calls.

A scoring call holds whatever the batcher gathered: requests of every length. `system.score(..., batch_size=b)`
sorts them and cuts every `b` rows, so each forward pass is padded to its longest row and a pass of short rows
holds no more of them than a pass of long ones. With a token budget, the call's pairs are sorted by their token
count and cut into passes whose padded size (rows x longest row) stays within `max_batch_tokens`: many short pairs
go in one pass, few long ones in another, and no pair is padded to a much longer one. The cuts are the ones that
minimise the padded tokens plus a fixed cost per pass (`plan_passes`), not the first that fill each pass: a call of
15 demo pairs at 8 rows per pass pads 18% above its real tokens when cut every 8 rows, 2% when cut where lengths
jump (`benchmarks/padding.py`). Each pass is one `system.score` call with `batch_size` = its rows, so it runs as
one forward pass of the system's own scoring code (the rewards are the ones `score` gives each pair alone, batching
changes only the padding).

Token counts come from the system's own pair encoder (`encoder.encode(prompt, response)`: the tokens the model
reads, truncation included); a system that exposes none (a routed system's RMs may each have their own) is counted
by the encoder of its first RM, and one without any encoder by characters / 4. The server has that encoder keep its
recent encodings (`remember_encodings`), so counting a pair does not tokenize it a second time.
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


def remember_encodings(system: Any, pairs: int) -> bool:
    """Have the encoder that `length_fn` counts with keep its last `pairs` encodings, so a pair the server counts
    (the planner's lengths, an engine's `usage`) is tokenized once, not again when it is scored; whether there is
    one (a routed system's other RMs tokenize on their own)."""
    enc = _encoder_of(system)
    if enc is None or not hasattr(enc, "remember"):
        return False
    enc.remember(pairs)
    return True


# What one extra forward pass costs beyond its padded tokens, in tokens: its fixed work (the per-module dispatch of
# one call, the scoring call around it). A chosen estimate of that work for a small encoder on CPU, not a measured
# constant; the planner splits a group only where that saves more padding than a pass costs.
PASS_TOKENS = 32


def plan_passes(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None,
                pass_tokens: int = PASS_TOKENS) -> list[list[int]]:
    """Indices of `lengths` grouped into forward passes of similar lengths: sorted by length (stable), cut into
    consecutive runs that keep rows x the run's longest within `max_tokens` (and at most `max_rows` rows; a row longer
    than the budget goes alone), choosing the cuts that minimise the padded tokens plus `pass_tokens` per pass (an
    exact dynamic programme over the sorted rows)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ls = [lengths[i] for i in order]
    n = len(ls)
    best = [0.0] + [float("inf")] * n  # best[i]: the cheapest plan of the i shortest rows
    cut = [0] * (n + 1)  # cut[i]: where the last pass of that plan starts
    for i in range(1, n + 1):
        longest = ls[i - 1]  # sorted ascending: the last row of a run is its longest
        j = i - 1
        while j >= 0:
            rows = i - j
            if rows > 1 and ((max_rows is not None and rows > max_rows) or rows * longest > max_tokens):
                break
            cost = best[j] + rows * longest + pass_tokens
            if cost < best[i]:  # strictly cheaper: on a tie the plan with the shorter last pass stays
                best[i], cut[i] = cost, j
            j -= 1
    passes: list[list[int]] = []
    i = n
    while i > 0:
        passes.append(order[cut[i]:i])
        i = cut[i]
    return passes[::-1]


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
