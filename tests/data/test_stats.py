"""dataset_stats / stats_markdown with a whitespace token counter (no tokenizer needed)."""

from __future__ import annotations

import pytest

from moerm.data.schema import PreferencePair
from moerm.data.stats import dataset_stats, stats_markdown


def words(text: str) -> int:
    return len(text.split())


PAIRS = [
    PreferencePair("1", "a", "one two", "x x x", "y", aspects_chosen={"f": 1.0}),
    PreferencePair("2", "a", "one two three four", "x", "y y"),
    PreferencePair("3", "b", "p", "long long reply", "short"),
]


def test_per_domain_and_overall() -> None:
    s = dataset_stats(PAIRS, words)
    assert list(s["domains"]) == ["a", "b"]
    a = s["domains"]["a"]
    assert a["n_pairs"] == 2 and a["n_prompts"] == 2 and s["overall"]["n_prompts"] == 3
    assert a["prompt_tokens"] == {"p50": 3.0, "p90": pytest.approx(3.8), "p99": pytest.approx(3.98), "max": 4.0}
    assert a["chosen_longer"] == 0.5 and a["with_aspects"] == 0.5
    o = s["overall"]
    assert o["n_pairs"] == 3 and o["chosen_longer"] == pytest.approx(2 / 3)
    assert o["rejected_tokens"]["max"] == 2.0 and o["with_aspects"] == pytest.approx(1 / 3)


def test_equal_length_is_not_longer_and_texts_counted_once() -> None:
    calls: list[str] = []

    def counting(text: str) -> int:
        calls.append(text)
        return 1

    s = dataset_stats([PreferencePair("1", "a", "p", "c", "r"), PreferencePair("2", "a", "p", "c2", "r2")], counting)
    assert s["overall"]["chosen_longer"] == 0.0
    assert calls.count("p") == 1  # the shared prompt is tokenised once


def test_markdown_table() -> None:
    md = stats_markdown(dataset_stats(PAIRS, words))
    lines = md.splitlines()
    assert lines[0].startswith("| domain | pairs |") and len(lines) == 2 + 3
    assert lines[2] == "| a | 2 | 2 | 3 / 4 / 4 / 4 | 2 / 3 / 3 / 3 | 2 / 2 / 2 / 2 | 50% | 50% |"
    assert lines[-1].startswith("| **overall** | 3 |")


def test_empty() -> None:
    s = dataset_stats([], words)
    assert s["domains"] == {} and s["overall"]["n_pairs"] == 0 and s["overall"]["chosen_longer"] is None
    assert "| **overall** | 0 | 0 | - | - | - | - | - |" in stats_markdown(s)
