"""Pairs grouped by prompt: the one prompt key, round-robin samples over prompts, prompt-disjoint splits.

Several pairs often share a prompt (summeval: 16 summaries of one article; alpaca_eval: many model pairs per
instruction). They are not independent: a sample, a split or an interval that treats them as such overstates what
the data says. Everything that groups pairs by prompt (the bench's held-out sample, validation and calibration
splits, the clustered bootstrap's clusters, the prompt counts in reports) uses `prompt_key`.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Sequence

from moerm.data.schema import PreferencePair

_SPACE = re.compile(r"\s+")
_TURN = re.compile(r"\n\s*\n\s*(?:Human|Assistant)\s*:")


def prompt_key(prompt: str) -> str:
    """The key a pair is grouped by: the first Human turn of a multi-turn prompt (`Human: ...\\n\\nAssistant: ...`),
    else the whole prompt (a summarisation prompt holds its article, HellaSwag's its context, qa_feedback's its
    question and passages), lowercased with whitespace collapsed: the key `../shared/data` was split by."""
    text = prompt.strip()
    if text.startswith("Human:"):
        text = _TURN.split(text[len("Human:"):], maxsplit=1)[0]
    return _SPACE.sub(" ", text).strip().lower()


def pair_keys(pairs: Sequence[PreferencePair]) -> list[str]:
    """`prompt_key` of every pair, computed once per distinct prompt text."""
    cache: dict[str, str] = {}
    out = []
    for p in pairs:
        if p.prompt not in cache:
            cache[p.prompt] = prompt_key(p.prompt)
        out.append(cache[p.prompt])
    return out


def count_prompts(pairs: Sequence[PreferencePair]) -> dict[str, int]:
    """Distinct prompt keys per domain, domains sorted."""
    keys: dict[str, set[str]] = defaultdict(set)
    for p, k in zip(pairs, pair_keys(pairs)):
        keys[p.domain].add(k)
    return {d: len(v) for d, v in sorted(keys.items())}


def sample_round_robin(pairs: Sequence[PreferencePair], cap: int | None, seed: int) -> list[PreferencePair]:
    """At most `cap` pairs per domain, taken one prompt at a time: every prompt gives one pair (prompts in a seeded
    order, each prompt's pairs shuffled) before any gives a second, so the sample covers as many prompts as it can
    and no prompt holds more than one pair above any other. File order is kept in the result; None: every pair."""
    if cap is None:
        return list(pairs)
    keys = pair_keys(pairs)
    by: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (p, k) in enumerate(zip(pairs, keys)):
        by[p.domain][k].append(i)
    keep: set[int] = set()
    for domain in sorted(by):
        groups = by[domain]
        if sum(map(len, groups.values())) <= cap:
            keep.update(i for g in groups.values() for i in g)
            continue
        rng = random.Random(f"{seed}-{domain}")
        queues = [list(groups[k]) for k in sorted(groups)]
        rng.shuffle(queues)
        for q in queues:
            rng.shuffle(q)
        taken = 0
        while taken < cap:
            for q in queues:
                if q and taken < cap:
                    keep.add(q.pop())
                    taken += 1
    return [p for i, p in enumerate(pairs) if i in keep]


def split_by_prompt(pairs: Sequence[PreferencePair], share: float, seed: int
                    ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split (A, B) with no prompt on both sides: per domain (sorted), whole prompts in a seeded shuffle go to A
    while that brings A closer to round(`share` x the domain's pairs) (exactly that when every prompt has one pair:
    then the split is a plain seeded shuffle of the pairs); the rest to B. A prompt that several domains share is on
    the same side in all of them (A only where every domain put it in A). Both keep file order. Used wherever
    training data is split for validation, model selection, thresholds, calibration or a later training phase."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1]; got {share}")
    keys = pair_keys(pairs)
    sizes: dict[str, dict[str, int]] = defaultdict(dict)  # domain -> key -> pairs, keys in first-seen order
    for p, k in zip(pairs, keys):
        sizes[p.domain][k] = sizes[p.domain].get(k, 0) + 1
    rng = random.Random(seed)
    side: dict[str, bool] = {}  # key -> in A
    for domain in sorted(sizes):
        groups = sizes[domain]
        target = round(share * sum(groups.values()))
        order = list(groups)
        rng.shuffle(order)
        count = 0
        for k in order:
            n = groups[k]
            take = abs(count + n - target) < abs(count - target)
            count += n if take else 0
            side[k] = side.get(k, True) and take
    a = [p for p, k in zip(pairs, keys) if side[k]]
    b = [p for p, k in zip(pairs, keys) if not side[k]]
    return a, b
