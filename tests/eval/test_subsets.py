"""Accuracy per subset (RM-Bench sources and styles, AlpacaEval sources, HHH categories), by hand: in the eval report,
its Markdown, the seed aggregate and `evaluate_system`."""

import pytest

from moerm.data.schema import PreferencePair
from moerm.eval.metrics import (
    NO_SUBSET, aggregate_runs, evaluate_system, pairwise_report, subset_groups,
)
from moerm.eval.report import accuracy_table, aggregate_table
from moerm.systems.base import ScoreOutput


def test_per_subset_accuracy_by_hand():
    # rm: 3 RM-Bench-style subsets (source/style) and a domain without subsets
    chosen = [1, 1, 0, 1, 0, 0, 1, 1]
    rejected = [0, 0, 1, 0, 1, 1, 0, 0]
    domains = ["rm"] * 6 + ["plain", "plain"]
    subsets = ["a/style0", "a/style0", "a/style1", "b/style0", "b/style1", None, None, None]
    rep = pairwise_report(chosen, rejected, domains, subsets)
    assert set(rep["per_subset"]) == {"rm"}  # "plain" has no subsets: no table for it
    assert rep["per_subset"]["rm"] == {
        "a/style0": {"accuracy": 1.0, "pairs": 2}, "a/style1": {"accuracy": 0.0, "pairs": 1},
        "b/style0": {"accuracy": 1.0, "pairs": 1}, "b/style1": {"accuracy": 0.0, "pairs": 1},
        NO_SUBSET: {"accuracy": 0.0, "pairs": 1}}
    # roll-ups: per source over its styles, per style over its sources
    assert rep["per_subset_group"]["rm"] == {
        "*/style0": {"accuracy": 1.0, "pairs": 3, "subsets": 2}, "*/style1": {"accuracy": 0.0, "pairs": 2, "subsets": 2},
        "a/*": {"accuracy": pytest.approx(2 / 3), "pairs": 3, "subsets": 2},
        "b/*": {"accuracy": 0.5, "pairs": 2, "subsets": 2}}
    assert rep["per_domain"]["rm"] == {"accuracy": 0.5, "pairs": 6}  # the domain rows are as before
    assert "per_subset" not in pairwise_report(chosen, rejected, domains)  # no subsets given: nothing added
    assert "per_subset" not in pairwise_report(chosen, rejected, domains, [None] * 8)


def test_subset_groups_keep_only_groups_that_merge_some_but_not_all():
    assert subset_groups(["helpful", "harmless"]) == {}  # HHH's flat categories: no roll-up
    assert subset_groups(["alpacaeval/style0", "alpacaeval/style1"]) == {}  # one source: its group is the domain
    assert subset_groups(["L/Adv/x", "L/Adv/y", "L/Nat", "C/z"]) == {
        "L/*": ["L/Adv/x", "L/Adv/y", "L/Nat"], "L/Adv/*": ["L/Adv/x", "L/Adv/y"]}


class _Length:
    def score(self, prompts, responses, domains=None, batch_size=32):
        return ScoreOutput([float(len(r)) for r in responses], [{} for _ in responses])


def _pair(i, subset, chosen, rejected):
    return PreferencePair(id=str(i), domain="hhh", prompt="p", chosen=chosen, rejected=rejected, subset=subset)


def test_evaluate_system_reports_subsets_and_the_tables_show_them():
    pairs = [_pair(0, "helpful", "longer", "short"), _pair(1, "helpful", "x", "yy"), _pair(2, "harmless", "abc", "a")]
    rep = evaluate_system(_Length(), pairs)
    assert rep["per_subset"] == {"hhh": {"harmless": {"accuracy": 1.0, "pairs": 1},
                                         "helpful": {"accuracy": 0.5, "pairs": 2}}}
    md = accuracy_table(rep)
    assert "| hhh | helpful | 2 | 50.0 |" in md and "| hhh | harmless | 1 | 100.0 |" in md
    # seeds: mean +- std per subset
    other = {**rep, "per_subset": {"hhh": {"harmless": {"accuracy": 0.0, "pairs": 1},
                                           "helpful": {"accuracy": 0.5, "pairs": 2}}}}
    agg = aggregate_runs([rep, other])
    assert agg["per_subset"]["hhh"]["harmless"] == {"mean": 0.5, "std": pytest.approx(0.7071, abs=1e-4), "n": 2,
                                                    "pairs": 1}
    assert "| hhh | harmless | 1 | 50.0 ± 70.7 |" in aggregate_table(agg)
    assert "per_subset" not in aggregate_runs([{k: v for k, v in rep.items() if k != "per_subset"}])
