"""The evidence rule of route selection (`moerm.systems.routing.selection`): the general RM takes a domain's route only
when the held-back slice resolves it as better."""

import pytest

from moerm.eval.intervals import paired_clustered_diff_ci
from moerm.systems.routing.selection import SelectionRule, select_route


def _slice(prompts: int, per_prompt: int, domain_right: int, general_right: int) -> tuple[list, list, list]:
    """`prompts` prompts of `per_prompt` pairs; on each prompt the domain RM gets `domain_right` pairs right and the
    general RM `general_right`."""
    d, g, keys = [], [], []
    for k in range(prompts):
        d += [1.0] * domain_right + [0.0] * (per_prompt - domain_right)
        g += [1.0] * general_right + [0.0] * (per_prompt - general_right)
        keys += [f"p{k}"] * per_prompt
    return d, g, keys


def test_a_tie_keeps_the_domain_rm():
    d, g, keys = _slice(40, 2, 1, 1)
    sel = select_route("a", d, g, keys, SelectionRule())
    assert sel["served_by"] == "a" and sel["domain_rm"] == sel["general_rm"] == 0.5
    assert sel["general_minus_domain"]["point"] == 0.0 and sel["reason"] == "general RM not better"


def test_a_clear_win_on_enough_prompts_goes_to_the_general_rm():
    d, g, keys = _slice(30, 2, 0, 2)  # the general RM right on every pair, the domain RM on none
    sel = select_route("a", d, g, keys, SelectionRule(min_prompts=10, level=0.9))
    assert sel["served_by"] == "general"
    assert sel["general_minus_domain"]["low"] == pytest.approx(1.0)  # every resample: 1 - 0


def test_too_few_prompts_keep_the_domain_rm_however_large_the_gap():
    d, g, keys = _slice(1, 2, 0, 2)  # the conflict suite's case: one held-back prompt, the general RM 2 of 2
    sel = select_route("a", d, g, keys, SelectionRule(min_prompts=10))
    assert sel["served_by"] == "a" and sel["prompts"] == 1 and "general_minus_domain" not in sel
    assert sel["reason"] == "1 held-back prompts (< 10)"


def test_a_gap_the_slice_cannot_resolve_keeps_the_domain_rm():
    # 96 prompts, general right on 58 and the domain RM on 52 (hellaswag's held-back slice in the 1,000-pair run):
    # the interval of the difference straddles 0 at 90%
    d = [1.0] * 52 + [0.0] * 44
    g = [0.0] * 6 + [1.0] * 46 + [1.0] * 12 + [0.0] * 32  # wrong on 6 where d is right, right on 12 where d is not
    keys = [f"p{k}" for k in range(96)]
    assert sum(g) == 58 and len(g) == 96
    sel = select_route("a", d, g, keys, SelectionRule(min_prompts=10, level=0.9))
    diff = paired_clustered_diff_ci(g, d, keys, level=0.9)
    assert sel["general_minus_domain"]["low"] == pytest.approx(diff.low)
    assert diff.low < 0 < diff.point  # the general RM looks better but the slice does not resolve it
    assert sel["served_by"] == "a" and sel["reason"] == "general RM better, not resolved"


def test_a_domain_with_nothing_held_back_keeps_its_rm():
    d, g, keys = _slice(1, 4, 0, 4)
    sel = select_route("a", d, g, keys, SelectionRule(min_prompts=1), held_back=False)
    assert sel["served_by"] == "a" and sel["reason"] == "single prompt: nothing held back"
