"""Pairs grouped by prompt: the key, round-robin samples over prompts, prompt-disjoint splits."""

from collections import Counter

import pytest

from moerm.data.grouping import count_prompts, pair_keys, prompt_key, sample_round_robin, split_by_prompt
from moerm.data.schema import PreferencePair


def _pairs(spec):
    """spec: (domain, prompt, n pairs) -> pairs with distinct ids, in that order."""
    out = []
    for domain, prompt, n in spec:
        out += [PreferencePair(id=f"{domain}-{prompt}-{j}", domain=domain, prompt=prompt, chosen=f"c{j}",
                               rejected=f"r{j}") for j in range(n)]
    return out


def test_prompt_key_is_the_first_human_turn_or_the_whole_prompt():
    multi = "Human: How do I  bake BREAD?\n\nAssistant: With flour.\n\nHuman: And yeast?"
    assert prompt_key(multi) == "how do i bake bread?"
    assert prompt_key("Human: how do i bake bread?\n\nAssistant: Knead it.") == prompt_key(multi)
    assert prompt_key("Summarize the article.\n\n  The  Cat sat.\n") == "summarize the article. the cat sat."
    assert prompt_key("Human: only one turn") == "only one turn"
    pairs = _pairs([("a", multi, 2), ("a", "Human: how do i bake bread?\n\nAssistant: no", 1), ("b", "x", 3)])
    assert count_prompts(pairs) == {"a": 1, "b": 1}
    assert len(set(pair_keys(pairs))) == 2


def test_round_robin_covers_every_prompt_before_any_twice():
    # the first 10 records all share one prompt: a cap of 8 taken from the top would see one prompt
    pairs = _pairs([("d", "big", 10), ("d", "s1", 1), ("d", "s2", 1), ("d", "s3", 1), ("d", "mid", 5),
                    ("e", "only", 3)])
    got = sample_round_robin(pairs, 8, seed=0)
    per = Counter(p.prompt for p in got if p.domain == "d")
    assert sum(per.values()) == 8 and set(per) == {"big", "s1", "s2", "s3", "mid"}
    assert per["s1"] == per["s2"] == per["s3"] == 1 and sorted([per["big"], per["mid"]]) == [2, 3]
    assert [p for p in got if p.domain == "e"] == pairs[-3:]  # under the cap: every pair
    assert got == [p for p in pairs if p in got]  # file order kept
    assert sample_round_robin(pairs, 8, seed=0) == got and sample_round_robin(pairs, None, 0) == pairs
    # evenly: 4 prompts of 6 pairs, cap 10 -> 3, 3, 2, 2
    even = _pairs([("d", f"p{i}", 6) for i in range(4)])
    assert sorted(Counter(p.prompt for p in sample_round_robin(even, 10, seed=5)).values()) == [2, 2, 3, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_never_puts_one_prompt_on_both_sides(seed):
    # domains x and y share the prompts "shared*" (as the dsp_* domains share their queries)
    spec = [("x", f"p{i}", 1 + i % 4) for i in range(20)] + [("x", f"shared{i}", 2) for i in range(6)]
    spec += [("y", f"shared{i}", 3) for i in range(6)] + [("y", f"q{i}", 1) for i in range(10)]
    pairs = _pairs(spec)
    a, b = split_by_prompt(pairs, 0.8, seed)
    assert len(a) + len(b) == len(pairs) and not {p.id for p in a} & {p.id for p in b}
    keys_a, keys_b = {prompt_key(p.prompt) for p in a}, {prompt_key(p.prompt) for p in b}
    assert not keys_a & keys_b and keys_a and keys_b
    assert a == [p for p in pairs if p in a]  # file order kept
    assert split_by_prompt(pairs, 0.8, seed) == (a, b)


def test_split_of_single_pair_prompts_hits_the_share_exactly():
    pairs = _pairs([("d", f"p{i}", 1) for i in range(40)] + [("e", f"q{i}", 1) for i in range(25)])
    a, b = split_by_prompt(pairs, 0.6, 0)
    assert Counter(p.domain for p in a) == {"d": 24, "e": 15}
    assert split_by_prompt(pairs, 0.6, 1)[0] != a  # the seed picks which prompts
    with pytest.raises(ValueError):
        split_by_prompt(pairs, 1.5, 0)


def test_split_of_single_pair_prompts_is_the_seeded_shuffle_it_replaced():
    # DMoERM's A/B split was a per-domain seeded shuffle of pairs; with one pair per prompt it is unchanged
    import random

    pairs = _pairs([(d, f"{d}{i}", 1) for d in "xyz" for i in range(37)])
    random.Random(1).shuffle(pairs)
    for seed in range(3):
        rng, in_a = random.Random(seed), set()
        for d in "xyz":
            idx = [i for i, p in enumerate(pairs) if p.domain == d]
            rng.shuffle(idx)
            in_a.update(idx[: round(0.6 * len(idx))])
        assert split_by_prompt(pairs, 0.6, seed)[0] == [p for i, p in enumerate(pairs) if i in in_a]
